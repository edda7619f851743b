"""``vlfuse vqa IMAGE "question" [--model M] [--json] [--top-k 3]``: answer a question about an image."""
from __future__ import annotations

import argparse
import json

DEFAULT_MODEL = "flickr8k-vqa"  # QuestionAnswerer.default_model (not imported here: the CLI loads torch lazily)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("vqa", help="answer a question about an image")
    p.add_argument("image", help="image file")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in model name or checkpoint directory (default {DEFAULT_MODEL}: photos; "
                        "easyvqa: the synthetic shapes of easy-VQA)")
    p.add_argument("--top-k", type=int, default=3, help="how many answers to list with probabilities (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    return p


def run(args) -> int:
    from ..data.images import load_image
    from ..errors import InputError
    from ..tasks.vqa.pipeline import QuestionAnswerer, check_question
    from .environment import runtime_options

    # check the cheap things before loading the model, so bad input fails fast
    check_question(args.question)
    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    image = load_image(args.image)
    model = QuestionAnswerer.from_pretrained(args.model, device=args.device, runtime=runtime_options())
    result = model(image, args.question, top_k=args.top_k)
    if args.json:
        print(json.dumps({"image": args.image, "question": args.question.strip(), "answer": result.answer,
                          "probability": round(result.probability, 4), "sure": result.sure, "doubt": result.doubt,
                          "top": [{"answer": a, "probability": round(p, 4)} for a, p in result.top]},
                         ensure_ascii=False))
    else:
        print(result.answer if result.sure else f"{result.answer} (not sure: {result.doubt})")
        for answer, prob in result.top:
            print(f"  {answer:20s} {prob:.3f}")
    return 0
