"""Consensus reranking settings on Flickr8k val, each over several sampling seeds (the chosen caption depends on
the samples drawn): candidates (samples besides the greedy caption), neighbours, BLEU and log-prob weights.

    python benchmarks/caption_rerank.py [--model flickr8k-caption] [--seeds 4]
Writes benchmarks/results/caption_rerank.json: BLEU-4 / CIDEr mean, min and max over the seeds per setting.
Candidates and neighbours come from the Captioner's own ``rerank_candidates`` (each photo's samples seeded from its
pixels and the seed), drawn once per seed for the largest setting; every setting scores a prefix of them (a
photo's first 8 samples are the ones 8 candidates draw, up to the int8 decoding step's rounding).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"candidates": 16, "neighbours": 50, "bleu_weight": 2.0, "logprob_weight": 0.5}
SETTINGS = [SHIPPED, {**SHIPPED, "candidates": 0}]  # the shipped default first, then the greedy caption alone
SETTINGS += [{**SHIPPED, "candidates": k, "neighbours": n, "bleu_weight": b}
             for k in (4, 6, 8, 12, 16) for n, b in ((50, 2.0), (40, 2.0), (50, 0.0), (40, 0.0))
             if (k, n, b) != (16, 50, 2.0)]
SETTINGS += [{**SHIPPED, "neighbours": 25}, {**SHIPPED, "bleu_weight": 3.0}, {**SHIPPED, "logprob_weight": 0.0},
             {**SHIPPED, "logprob_weight": 1.0}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flickr8k-caption")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/caption_rerank.json"))
    args = ap.parse_args()
    from tqdm import tqdm

    from vlfuse.data.captions import read_captions
    from vlfuse.metrics.caption import score_captions
    from vlfuse.metrics.consensus import ConsensusScorer
    from vlfuse.tasks.caption.pipeline import Captioner

    cap = Captioner.from_pretrained(args.model)
    reranker = cap.reranker
    data = read_captions(args.data, split="val")
    decode = cap.decode_config(strategy="rerank", candidates=max(s["candidates"] for s in SETTINGS))
    reranker.config = dataclasses.replace(reranker.config, neighbours=max(s["neighbours"] for s in SETTINGS))

    # per seed, per image: its candidates (text, mean log-prob per word), the greedy caption first; its neighbours
    candidates = {seed: [] for seed in range(args.seeds)}
    neighbours = []
    for s in tqdm(range(0, len(data), 32), desc="candidates", unit="batch"):
        pixels = cap.preprocess(data.images[s:s + 32])
        for seed in range(args.seeds):
            drawn, near, _ = cap.rerank_candidates(pixels, decode.override(seed=seed))
            candidates[seed] += [[(" ".join(r.tokens), r.score / max(1, len(r.tokens))) for r in options]
                                 for options in drawn]
        neighbours += near

    refs = {str(i): caps for i, caps in enumerate(data.captions)}
    rows = []
    cider = reranker.scorer.cider
    for setting in SETTINGS:  # the reranker itself, with this setting's weights
        reranker.config = dataclasses.replace(reranker.config, bleu_weight=setting["bleu_weight"],
                                              logprob_weight=setting["logprob_weight"])
        reranker.scorer = ConsensusScorer(cider, setting["bleu_weight"])
        per_seed = []
        for seed in range(args.seeds if setting["candidates"] else 1):
            hyps = {}
            for i in range(len(data)):
                options = {}
                for text, logprob in candidates[seed][i][:setting["candidates"] + 1]:
                    options.setdefault(text, logprob)  # as the Captioner: the greedy caption first, repeats once
                texts = list(options)
                best = reranker.choose(texts, neighbours[i][:setting["neighbours"]], [options[t] for t in texts])
                hyps[str(i)] = texts[best]
            m = score_captions(refs, hyps, metrics=("BLEU", "CIDEr"))
            per_seed.append({"BLEU-4": m["BLEU-4"], "CIDEr": m["CIDEr"]})
        row = {**setting, "seeds": len(per_seed)}
        for key in ("BLEU-4", "CIDEr"):
            values = [p[key] for p in per_seed]
            row[key] = {"mean": round(statistics.mean(values), 4), "min": round(min(values), 4),
                        "max": round(max(values), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": args.model, "split": "val", "images": len(data), "temperature": decode.temperature,
              "top_p": decode.top_p, "settings": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
