"""VQA speed on this CPU: ms per question one at a time (image already decoded) and in batches, with the vision
encoder in PyTorch and in ONNX Runtime (``vlfuse.runtime``), measured interleaved in one process so that machine
noise hits both alike; and whether both give the same answers.

    python benchmarks/vqa_speed.py --model flickr8k-vqa --data data/qa/flickr8k/val.jsonl \
        --out benchmarks/results/vqa_photo_speed.json                     # photos (the default model)
    python benchmarks/vqa_speed.py --model easyvqa --data easy-vqa        # synthetic shapes: vqa_speed.json
The first ``--n`` questions of ``--data`` (easy-vqa: its test split) with their images, decoded beforehand.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="easyvqa")
    ap.add_argument("--data", default="easy-vqa", help="easy-vqa (its test split) or a question JSONL file")
    ap.add_argument("--n", type=int, default=200, help="questions (with their images)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/vqa_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from vlfuse.data.images import load_image
    from vlfuse.data.vqa import read_vqa
    from vlfuse.runtime import RuntimeOptions
    from vlfuse.tasks.vqa.pipeline import QuestionAnswerer

    data = read_vqa(args.data, "test").limit_questions(args.n)
    images = [load_image(data.images[q.image]) for q in data.questions]
    questions = [q.question for q in data.questions]
    models = {"torch": QuestionAnswerer.from_pretrained(args.model, runtime=RuntimeOptions(onnx=False)),
              "default": QuestionAnswerer.from_pretrained(args.model)}
    for model in models.values():
        model(images[0], questions[0])  # warm-up (and the graph exported, where it is not cached yet)

    one = {name: [] for name in models}
    batched = {name: [] for name in models}
    for _ in range(args.rounds):
        for image, question in zip(images, questions):
            for name, model in models.items():
                t = time.perf_counter()
                model(image, question)
                one[name].append(1000 * (time.perf_counter() - t))
        for name, model in models.items():
            t = time.perf_counter()
            model.predict(images, questions, batch_size=args.batch_size)
            batched[name].append(1000 * (time.perf_counter() - t) / len(questions))
    answers = {name: model.predict(images, questions) for name, model in models.items()}
    result = {
        "model": args.model, "data": args.data, "threads": args.threads, "questions": len(questions),
        "load_average_at_end": os.getloadavg()[0],
        "backends": {name: model.runtime.backends() for name, model in models.items()},
        "ms_per_question_one_at_a_time": {name: round(statistics.median(v), 3) for name, v in one.items()},
        f"ms_per_question_batch{args.batch_size}": {name: round(statistics.median(v), 3)
                                                    for name, v in batched.items()},
        f"questions_per_second_batch{args.batch_size}": {name: round(1000 / statistics.median(v), 1)
                                                         for name, v in batched.items()},
        "same_answers": sum(a.answer == b.answer for a, b in zip(answers["torch"], answers["default"])),
        "max_probability_difference": max(abs(a.probability - b.probability)
                                          for a, b in zip(answers["torch"], answers["default"])),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
