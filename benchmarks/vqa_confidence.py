"""Does the photo VQA model know when it does not know? Calibration on the val questions and what it says to
questions unlike its training questions (other languages, questions about the world, nonsense), asked about val
photos.

    python benchmarks/vqa_confidence.py [--model flickr8k-vqa] [--data ../shared/data/flickr8k --split val] [--photos 20]

Reports, for the val questions: accuracy, expected calibration error (15 bins) with the raw scores (temperature 1)
and with the shipped temperature, the share of answers flagged unsure and the accuracy of flagged and unflagged
answers; for each group of out-of-scope questions: the share flagged unsure and the mean top probability; and
whether an empty question is refused with a clear error. Writes benchmarks/results/vqa_confidence.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OUT_OF_SCOPE = {
    "other languages": ["这只狗是什么颜色？", "图片里有几个人？", "¿de qué color es el perro?", "wie viele Hunde sind da?",
                        "quelle est la couleur du chien ?", "犬は何色ですか？"],
    "about the world, not the photo": ["what is the meaning of life?", "who is the president of france?",
                                       "what is two plus two?", "why is the sky blue?", "how old is the universe?",
                                       "what will the weather be tomorrow?", "who wrote hamlet?",
                                       "what is the capital of japan?"],
    "nonsense": ["asdf qwerty zxcv", "colorless green ideas sleep furiously?", "banana telescope quantum?",
                 "the the the the", "xyzzy plugh?", "123 456 789"],
}


def main(argv=None) -> int:
    import torch

    from vlfuse.config import save_json
    from vlfuse.data.vqa import read_vqa
    from vlfuse.errors import InputError
    from vlfuse.evaluation.vqa import logits_set, score_answers
    from vlfuse.metrics.vqa import answer_accuracy, expected_calibration_error
    from vlfuse.tasks.vqa import QuestionAnswerer
    from vlfuse.training.vqa import prepare_images

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flickr8k-vqa")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/flickr8k"),
                   help="a question JSONL file or a captioned folder (its --split questions are made)")
    p.add_argument("--split", default="val")
    p.add_argument("--photos", type=int, default=20, help="val photos each out-of-scope question is asked about")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vqa_confidence.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    model = QuestionAnswerer.from_pretrained(args.model)
    data = read_vqa(args.data, args.split)
    acts, _, data = prepare_images(model.network, data, progress=True, cache_dir="cache/features")
    logits = logits_set(model, data, acts)
    questions = [q.question for q in data.questions]
    calibrated = model.rank(model.probabilities(logits), questions, top_k=1)
    raw_probs, raw_best = logits.softmax(-1).max(-1)
    correct = [answer_accuracy(a.answer, q.answers) for a, q in zip(calibrated, data.questions)]
    raw_correct = [answer_accuracy(model.answers[b], q.answers) for b, q in zip(raw_best.tolist(), data.questions)]
    flagged = [not a.sure for a in calibrated]
    sure_acc = [c for c, f in zip(correct, flagged) if not f]
    unsure_acc = [c for c, f in zip(correct, flagged) if f]
    val = {"questions": len(data), "accuracy": score_answers(data, [a.answer for a in calibrated])["accuracy"],
           "ece_temperature_1": expected_calibration_error(raw_probs.tolist(), raw_correct),
           "ece_calibrated": expected_calibration_error([a.probability for a in calibrated], correct),
           "temperature": model.calibration.temperature, "unsure_share": sum(flagged) / len(flagged),
           "accuracy_when_sure": statistics.fmean(sure_acc) if sure_acc else None,
           "accuracy_when_unsure": statistics.fmean(unsure_acc) if unsure_acc else None,
           "mean_top_probability": statistics.fmean(a.probability for a in calibrated)}

    photos = sorted({q.image for q in data.questions})[:args.photos]
    groups = {}
    for group, asked in OUT_OF_SCOPE.items():
        images = [data.images[i] for i in photos for _ in asked]
        answers = model.predict(images, [q for _ in photos for q in asked], top_k=1)
        groups[group] = {"questions": asked, "asked": len(answers),
                         "unsure_share": sum(not a.sure for a in answers) / len(answers),
                         "mean_top_probability": statistics.fmean(a.probability for a in answers),
                         "examples": [dataclasses.asdict(a) for a in answers[:len(asked)]]}
    try:
        model.predict([data.images[photos[0]]], ["   "])
        empty = "answered (it should be refused)"
    except InputError as exc:
        empty = f"refused: {exc}"
    result = {"model": args.model, "data": str(args.data), "split": args.split, "calibration": dataclasses.asdict(model.calibration),
              "val": val, "out_of_scope": groups, "empty_question": empty,
              "command": "python benchmarks/vqa_confidence.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_json(result, args.out)
    summary = {"val": val, **{g: {k: v for k, v in r.items() if k in ("unsure_share", "mean_top_probability")}
                              for g, r in groups.items()}, "empty_question": empty}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
