"""Questions about real photos: every fusion module against a question-only and an answer-prior baseline, same
encoders and training budget, scored on the Flickr8k val questions (per question type) and on the everyday photos
of coco_ood_dev.

    vlfuse data make-qa --data ../shared/data/flickr8k --split train --out data/qa/flickr8k/train.jsonl
    vlfuse data make-qa --data ../shared/data/flickr8k --split val --out data/qa/flickr8k/val.jsonl
    vlfuse data make-qa --data ../shared/data/coco_ood_dev --split val --out data/qa/coco_ood_dev/val.jsonl
    python benchmarks/vqa_photo.py --epochs 8 data.path=data/qa/flickr8k   # every fusion + both baselines
    python benchmarks/vqa_photo.py --config configs/flickr8k_vqa.yaml --epochs 8 --runs config question-only \
        answer-prior --out benchmarks/results/vqa_photo.json           # the shipped model beside its baselines
    (``--trained DIR``: the "config" run is the one `vlfuse train --config` already wrote to DIR, scored, not
    trained again)

Each fusion run trains ``--config`` (default configs/flickr8k_vqa_fusions.yaml) with one fusion module (settings
below) for ``--epochs`` epochs, selects on val and scores the best checkpoint; "config" trains the config as it is.
"question-only" is the config's own fusion with ``model.blind`` (the fusion sees a constant image: what the
questions alone give away); "answer-prior" answers every question with the most frequent training answer of its
type (no model). Results go to ``--out`` (default benchmarks/results/vqa_photo_fusions.json) after every run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# one budget for all: ~512-wide fusion, attention modules with 2 layers of 4 heads at 256 (as in vqa_fusions.py)
FUSIONS = {
    "concat": {"name": "concat", "dim": 512},
    "mul": {"name": "mul", "dim": 512},
    "mutan": {"name": "mutan", "dim": 512, "hidden_dim": 310, "rank": 5},
    "bilinear": {"name": "bilinear", "dim": 512, "rank": 1024},
    "soft-attention": {"name": "soft-attention", "dim": 512, "attn_dim": 512},
    "cross-attention": {"name": "cross-attention", "dim": 256, "num_layers": 2, "num_heads": 4},
    "joint": {"name": "joint", "dim": 256, "num_layers": 2, "num_heads": 4},
}
BASELINES = ("question-only", "answer-prior")
AS_IS = "config"


def answer_prior(train, data) -> list:
    """Each question's answer: the most frequent training answer of its type."""
    by_type = {}
    for q in train.questions:
        by_type.setdefault(q.qtype, Counter())[q.answers[0]] += 1
    overall = Counter(q.answers[0] for q in train.questions).most_common(1)[0][0]
    best = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    return [best.get(q.qtype, overall) for q in data.questions]


def main(argv=None) -> int:
    from vlfuse.config import Part, apply_overrides, read_config_file, save_json
    from vlfuse.data.vqa import read_vqa
    from vlfuse.evaluation.vqa import predict_set, score_answers
    from vlfuse.tasks.vqa import QuestionAnswerer
    from vlfuse.tasks.vqa.model import VQAModel, VQAModelConfig
    from vlfuse.training.vqa import prepare_images, train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="*", default=None,
                   help=f"default: {', '.join([*FUSIONS, *BASELINES])}; '{AS_IS}': the config unchanged")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--config", default=str(ROOT / "configs/flickr8k_vqa_fusions.yaml"))
    p.add_argument("--ood", default=str(ROOT.parent / "shared/data/coco_ood_dev"),
                   help="everyday-photo questions: a JSONL file, or a captioned folder whose val questions are made")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vqa_photo_fusions.json"))
    p.add_argument("--run-dir", default="runs/vqa_photo", help="where checkpoints go")
    p.add_argument("--trained", metavar="DIR", help=f"for run '{AS_IS}': score the config as already trained into "
                   "DIR (its train.out_dir: summary.json and best/, e.g. by `vlfuse train --config ...`) instead "
                   "of training it again")
    p.add_argument("--resume", action="store_true", help="continue each run from its checkpoints (an ensemble's "
                   "finished members are not trained again)")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for every run")
    args = p.parse_args(argv)
    names = args.runs or [*FUSIONS, *BASELINES]
    unknown = [n for n in names if n not in FUSIONS and n not in BASELINES and n != AS_IS]
    if unknown:
        p.error(f"unknown runs {unknown}; choose from {[*FUSIONS, *BASELINES, AS_IS]}")
    base = read_config_file(args.config)
    apply_overrides(base, args.overrides)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("runs", {})
    results.update({"benchmark": "photo VQA (questions made from Flickr8k captions): val accuracy per fusion module "
                                 "and baselines, same encoders and budget",
                    "config": str(Path(args.config).resolve().relative_to(ROOT)), "epochs": args.epochs,
                    "overrides": args.overrides,
                    "command": "python benchmarks/vqa_photo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"})

    data = base["data"]
    train_set = read_vqa(data["path"], data.get("train_split", "train"))
    sets = {"val": read_vqa(data["path"], data["val_split"])}
    if Path(args.ood).exists():
        sets["coco_ood_dev"] = read_vqa(args.ood, "val")
    # stem outputs once per set (the feature cache), shared by every run: encoders are the same in all of them
    probe = VQAModel(VQAModelConfig(vision=Part.from_dict(base["model"]["vision"]), num_answers=1, vocab_size=8))
    acts = {}
    for name, s in sets.items():
        a, _, kept = prepare_images(probe, s, progress=True, cache_dir=data.get("cache_dir", "cache/features"))
        acts[name], sets[name] = a, kept

    for name in names:
        t0 = time.time()
        record = {}
        if name == "answer-prior":
            for split, s in sets.items():
                record[split] = _scores(score_answers(s, answer_prior(train_set, s)))
        else:
            raw = json.loads(json.dumps(base))
            fusion = FUSIONS.get(name, base["model"]["fusion"])
            raw["model"]["fusion"] = fusion
            if name == "question-only":
                raw["model"]["blind"] = True
            apply_overrides(raw, [f"train.epochs={args.epochs}", f"train.out_dir={args.run_dir}/{name}",
                                  "train.patience=0"])
            if name == AS_IS and args.trained:
                summary = json.loads((Path(args.trained) / "summary.json").read_text())
                record["trained_by"] = f"vlfuse train --config {args.config} (out_dir {args.trained})"
            else:
                summary = train(raw, resume=args.resume)
            model = QuestionAnswerer.from_pretrained(summary["best_dir"])
            for split, s in sets.items():
                answers = predict_set(model, s, acts[split])
                record[split] = _scores(score_answers(s, [a.answer for a in answers], [a.probability for a in answers]))
            record.update({"fusion": fusion, "parameters": summary["parameters"], "epochs": args.epochs,
                           "train_minutes": round(summary["train_minutes"], 2), "calibration": summary["calibration"]})
            if "members" in summary:  # an ensemble (AnswerEnsemble): each member's own run
                record["members"] = {m: {"best_val_accuracy": s["best_val_accuracy"], "best_epoch": s["best_epoch"],
                                         "val_accuracy_per_epoch": _val_history(Path(s["best_dir"]).parent)}
                                     for m, s in summary["members"].items()}
            else:
                record.update({"best_epoch": summary["best_epoch"],
                               "val_accuracy_per_epoch": _val_history(Path(summary["best_dir"]).parent)})
        record["total_minutes"] = round((time.time() - t0) / 60, 2)
        results["runs"][name] = record
        out.parent.mkdir(parents=True, exist_ok=True)
        save_json(results, out)
        print(json.dumps({name: record}), flush=True)
    print(markdown_table(results["runs"]))
    return 0


def _val_history(run: Path) -> list:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [round(json.loads(line)["val_accuracy"], 4) for line in lines if line.strip()]


def _scores(metrics: dict) -> dict:
    keep = ("accuracy", "accuracy_by_type", "questions", "questions_by_type", "ece")
    return {k: metrics[k] for k in keep if k in metrics}


def markdown_table(runs: dict) -> str:
    types = sorted({t for r in runs.values() for t in r["val"].get("accuracy_by_type", {})})
    lines = ["| run | val acc | " + " | ".join(types) + " | coco_ood_dev | parameters |",
             "|---|---|" + "---|" * len(types) + "---|---|"]
    for name, r in sorted(runs.items(), key=lambda kv: -kv[1]["val"]["accuracy"]):
        per = " | ".join(f"{100 * r['val']['accuracy_by_type'].get(t, 0):.1f}" for t in types)
        ood = f"{100 * r['coco_ood_dev']['accuracy']:.1f}" if "coco_ood_dev" in r else "-"
        params = f"{r['parameters']:,}" if "parameters" in r else "-"
        lines.append(f"| {name} | {100 * r['val']['accuracy']:.1f} | {per} | {ood} | {params} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
