"""Decoding settings for a caption model, compared on Flickr8k val (cached features; PTB-tokenised metrics).

    python benchmarks/caption_decoding.py [--model flickr8k-caption]
Writes benchmarks/results/caption_decoding.json: BLEU-4 / CIDEr (+ METEOR, ROUGE-L) and ms/image per setting.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    {"strategy": "greedy"},
    {"strategy": "beam", "beam_size": 2},
    {"strategy": "beam", "beam_size": 3},
    {"strategy": "beam", "beam_size": 5},
    {"strategy": "beam", "beam_size": 3, "length_penalty": 0.5},
    {"strategy": "beam", "beam_size": 5, "length_penalty": 1.0},
    {"strategy": "beam", "beam_size": 3, "no_repeat_ngram": 0},
    {"strategy": "sample", "top_p": 0.9, "seed": 0},
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flickr8k-caption")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--cache-dir", default=str(ROOT / "cache/features"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/caption_decoding.json"))
    args = ap.parse_args()
    from vlfuse.data.captions import read_captions
    from vlfuse.generation import DecodeConfig
    from vlfuse.metrics.caption import score_captions
    from vlfuse.tasks.caption.pipeline import Captioner
    from vlfuse.training.caption import (
        cached_features,
        generate_captions,
        references_and_hypotheses,
    )
    from vlfuse.training.features import FeatureCache

    cap = Captioner.from_pretrained(args.model)
    val = read_captions(args.data, split="val")
    feats, val, _ = cached_features(FeatureCache(args.cache_dir, cap.model.vision), val, progress=True)
    rows = []
    for setting in SETTINGS:
        t = time.perf_counter()
        caps = generate_captions(cap.model, cap.tokenizer, feats, DecodeConfig(**setting))
        ms = (time.perf_counter() - t) * 1000 / len(caps)
        refs, hyps = references_and_hypotheses(val, caps)
        m = score_captions(refs, hyps)
        rows.append({**setting, **{k: round(m[k], 4) for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")},
                     "decode_ms_per_image_batch100": round(ms, 2)})
        print(json.dumps(rows[-1]))
    Path(args.out).write_text(json.dumps({"model": args.model, "split": "val", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
