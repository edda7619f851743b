"""Compare every fusion module on easy-VQA with the same encoders and the same (small) training budget.

    nice -n 10 python benchmarks/vqa_fusions.py --epochs 1 train.max_steps=56 train.warmup_steps=15   # the table
    nice -n 10 python benchmarks/vqa_fusions.py --epochs 3            # all modules in FUSIONS, longer
    nice -n 10 python benchmarks/vqa_fusions.py --fusions mul concat   # a subset

Each run trains ``configs/easyvqa_<fusion>.yaml`` for ``--epochs`` epochs, selects on the held-out val images and
scores the best checkpoint on the easy-VQA test split. Results (accuracy overall / yes-no / other, trainable
parameters, training minutes on this machine) go to benchmarks/results/vqa_fusions.json after every run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    import vlfuse.nn  # noqa: F401  (registers the fusion modules)
    from vlfuse.config import apply_overrides, read_config_file, save_json
    from vlfuse.registry import FUSIONS
    from vlfuse.training.vqa import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fusions", nargs="*", default=None, help="default: every registered fusion module")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vqa_fusions.json"))
    p.add_argument("--runs", default="runs/vqa_fusions", help="where checkpoints go")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for every run")
    args = p.parse_args(argv)
    fusions = args.fusions or FUSIONS.names()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("runs", {})
    results.update({"benchmark": "easy-VQA test accuracy per fusion module, same encoders and budget",
                    "epochs": args.epochs, "overrides": args.overrides,
                    "command": "nice -n 10 python benchmarks/vqa_fusions.py " + " ".join(argv or sys.argv[1:]),
                    "machine": f"{platform.machine()} CPU, torch {torch.__version__}, "
                    "1 training thread on a shared 2-core machine (other jobs running)"})
    for name in fusions:
        config_path = ROOT / f"configs/easyvqa_{name}.yaml"
        raw = read_config_file(config_path)
        apply_overrides(raw, [f"train.epochs={args.epochs}", f"train.out_dir={args.runs}/{name}",
                              "train.patience=0", *args.overrides])
        t0 = time.time()
        summary = train(raw)
        test = summary["test"]
        results["runs"][name] = {
            "config": str(config_path.relative_to(ROOT)), "fusion": raw["model"]["fusion"],
            "test_accuracy": test["accuracy"], "test_yes_no_accuracy": test["yes_no_accuracy"],
            "test_other_accuracy": test["other_accuracy"], "test_questions": test["questions"],
            "best_val_accuracy": summary["best_val_accuracy"], "best_epoch": summary["best_epoch"],
            "parameters": summary["parameters"], "train_minutes": round(summary["train_minutes"], 2),
            "total_minutes": round((time.time() - t0) / 60, 2)}
        out.parent.mkdir(parents=True, exist_ok=True)
        save_json(results, out)
        print(json.dumps({name: results["runs"][name]}), flush=True)
    print(markdown_table(results["runs"]))
    return 0


def markdown_table(runs: dict) -> str:
    lines = ["| fusion | test acc | yes/no | other | parameters | train min |", "|---|---|---|---|---|---|"]
    for name, r in sorted(runs.items(), key=lambda kv: -kv[1]["test_accuracy"]):
        lines.append(f"| {name} | {100 * r['test_accuracy']:.2f} | {100 * r['test_yes_no_accuracy']:.2f} | "
                     f"{100 * r['test_other_accuracy']:.2f} | {r['parameters']:,} | {r['train_minutes']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
