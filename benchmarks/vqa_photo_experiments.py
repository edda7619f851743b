"""Collect the photo-VQA experiments that chose the shipped configuration: each run's settings that differ from
the fusion comparison's base (configs/flickr8k_vqa_fusions.yaml) and its val accuracy per epoch.

    vlfuse train --config configs/flickr8k_vqa_fusions.yaml data.path=data/qa/flickr8k model.fusion=... \\
        train.epochs=8 train.patience=0 train.threads=1 train.out_dir=runs/vqa_exp/<name>    # one per experiment
    python benchmarks/vqa_photo_experiments.py [--runs runs/vqa_exp]

``uncapped_reg_mul`` trained on data/qa/flickr8k_uncapped: train.jsonl written by
``generate_questions(read_captions(flickr8k, "train"), max_answer_share={"object": 1.0, "number": 1.0, "color": 1.0,
"location": 1.0})`` + ``write_jsonl`` (no answer-share cap: 41,174 questions) and val.jsonl the usual val set.

``minilm_reg_mul`` is the shipped ensemble's ``minilm`` member (runs/flickr8k_vqa_ens/minilm, linked), and
``minilm_mul`` is trained again as its ``minilm_light`` member.

Reads every ``<runs>/<name>/config.resolved.json`` and ``metrics.jsonl`` (a run stopped early keeps the epochs it
finished) and writes benchmarks/results/vqa_photo_experiments.json. With ``--ensembles RUN RUN ...``, also the val
accuracy of every combination of those runs' best checkpoints answering together as an ``AnswerEnsemble`` does (the
mean of the members' calibrated probabilities).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("fusion", "text", "vision", "head"):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "runs/vqa_exp"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vqa_photo_experiments.json"))
    p.add_argument("--ensembles", nargs="*", default=[], help="runs (names under --runs) to combine")
    p.add_argument("--val", default=str(ROOT / "data/qa/flickr8k"), help="where the val questions are")
    args = p.parse_args(argv)
    runs = {}
    for run in sorted(Path(args.runs).iterdir()):
        metrics, config = run / "metrics.jsonl", run / "config.resolved.json"
        if not metrics.is_file() or not config.is_file():
            continue
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        resolved = flat(json.loads(config.read_text()))
        keep = {k: v for k, v in resolved.items() if k.startswith(("data.path", "model.", "train.weight_decay", "train.epochs"))
                and not k.endswith(("vocab_size", "num_answers"))}
        best = max(history, key=lambda h: h["val_accuracy"])
        runs[run.name] = {"settings": keep, "epochs_finished": len(history),
                          "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
                          "val_accuracy_per_epoch": [round(h["val_accuracy"], 4) for h in history],
                          "train_accuracy_per_epoch": [round(h["train_acc"], 4) for h in history],
                          "minutes_per_epoch": round(sum(h["train_minutes"] for h in history) / len(history), 2)}
    result = {"benchmark": "photo VQA experiments on Flickr8k val (questions made from captions)",
              "command": "python benchmarks/vqa_photo_experiments.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": runs}
    if args.ensembles:
        result["ensembles"] = ensembles([Path(args.runs) / name / "best" for name in args.ensembles], args.val)
        for combo, acc in result["ensembles"].items():
            print(f"ensemble {combo:40s} {acc:.4f}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, r in runs.items():
        print(f"{name:16s} best {r['best_val_accuracy']:.4f} @ {r['best_epoch']}/{r['epochs_finished']}")
    return 0


def ensembles(checkpoints: list, val_path: str) -> dict:
    """Val accuracy of every combination of two or more ``checkpoints`` answering together (mean probabilities)."""
    import itertools

    import torch

    from vlfuse.data.vqa import read_vqa
    from vlfuse.evaluation.vqa import logits_set, score_answers
    from vlfuse.tasks.vqa import QuestionAnswerer
    from vlfuse.training.vqa import prepare_images

    val = read_vqa(val_path, "val")
    probs, answers = {}, None
    for path in checkpoints:
        model = QuestionAnswerer.from_pretrained(path)
        acts, _, kept = prepare_images(model.network, val, progress=False, cache_dir=str(ROOT / "cache/features"))
        if len(kept) != len(val):
            raise SystemExit(f"{len(val) - len(kept)} val questions are about unreadable images")
        if answers is not None and model.answers != answers:
            raise SystemExit(f"{path} answers from another answer list than {checkpoints[0]}")
        answers = model.answers
        probs[path.parent.name] = model.probabilities(logits_set(model, val, acts))
    out = {}
    for k in range(2, len(probs) + 1):
        for combo in itertools.combinations(probs, k):
            mean = torch.stack([probs[name] for name in combo]).mean(0)
            predicted = [answers[i] for i in mean.argmax(-1).tolist()]
            out[" + ".join(combo)] = round(score_answers(val, predicted)["accuracy"], 4)
    return out


if __name__ == "__main__":
    sys.exit(main())
