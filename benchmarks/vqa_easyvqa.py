"""Score the shipped ``easyvqa`` model on the full easy-VQA test split (and the held-out val images).

    nice -n 10 python benchmarks/vqa_easyvqa.py --summary runs/easyvqa/summary.json

``--summary`` (written by ``vlfuse train --config configs/easyvqa.yaml``) adds the measured training time.
Writes benchmarks/results/vqa_easyvqa.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from vlfuse.config import save_json
    from vlfuse.data.vqa import read_vqa
    from vlfuse.evaluation.vqa import evaluate_model
    from vlfuse.hub import resolve_model
    from vlfuse.tasks.vqa.pipeline import QuestionAnswerer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="easyvqa")
    p.add_argument("--summary", default=None, help="training summary.json to copy the training time from")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vqa_easyvqa.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = QuestionAnswerer.from_pretrained(args.model)
    directory = resolve_model(args.model)
    result = {"model": args.model, "config": json.loads((directory / "config.json").read_text())["model"],
              "size_bytes": sum(f.stat().st_size for f in directory.iterdir()),
              "parameters": sum(p.numel() for p in model.network.parameters()),
              "machine": f"{platform.machine()} CPU, torch {torch.__version__}, 1 thread on a shared 2-core machine",
              "retrain": "vlfuse train --config configs/easyvqa.yaml"}
    for split in ("test", "val"):
        result[split] = evaluate_model(model, read_vqa("easy-vqa", split))
    if args.summary:
        s = json.loads(Path(args.summary).read_text())
        result["training"] = {k: s[k] for k in ("best_val_accuracy", "best_epoch", "epochs_run", "train_minutes",
                                                 "prepare_minutes", "total_minutes", "train_questions") if k in s}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_json(result, args.out)
    print(json.dumps({k: result[k] for k in ("test", "val")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
