"""Fusion comparison for captioning on Flickr8k val, same budget each (the epochs in each config).

    python benchmarks/caption_fusions.py [--only NAME ...] [train.threads=1 ...overrides]
Trains every config in configs/caption_fusions/, evaluates its best checkpoint on val with beam 3 (BLEU-4,
METEOR, ROUGE-L, CIDEr), and writes benchmarks/results/caption_fusions.json (merging earlier rows).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/caption_fusions.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from vlfuse.config import apply_overrides, read_config_file
    from vlfuse.evaluation.caption import evaluate_captioner
    from vlfuse.generation import DecodeConfig
    from vlfuse.tasks.caption.pipeline import Captioner
    from vlfuse.training.caption import train

    rows = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for cfg_path in sorted((ROOT / "configs/caption_fusions").glob("*.yaml")):
        name = cfg_path.stem
        if args.only and name not in args.only:
            continue
        raw = apply_overrides(read_config_file(cfg_path), list(args.overrides))
        t0 = time.time()
        summary = train(raw)
        minutes = (time.time() - t0) / 60
        cap = Captioner.from_pretrained(summary["best_dir"])
        m = evaluate_captioner(cap, raw["data"]["path"], "val", DecodeConfig(strategy="beam", beam_size=3),
                               results_path=None)
        rows[name] = {"fusion": raw["model"]["fusion"]["name"], "decoder": raw["model"]["decoder"]["name"],
                      "epochs": raw["train"]["epochs"], **{k: round(m[k], 4) for k in
                      ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in m},
                      "parameters": summary["parameters"], "training_minutes": round(minutes, 1),
                      "config": str(cfg_path.relative_to(ROOT))}
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(rows, indent=2) + "\n")
        print(json.dumps(rows[name]))


if __name__ == "__main__":
    main()
