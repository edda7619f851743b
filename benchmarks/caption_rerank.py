"""Consensus reranking settings on Flickr8k val, each over several sampling seeds (the chosen caption depends on
the samples drawn): candidates (samples besides the greedy caption), neighbours, BLEU and log-prob weights.

    python benchmarks/caption_rerank.py [--model flickr8k-caption] [--seeds 4]
Writes benchmarks/results/caption_rerank.json: BLEU-4 / CIDEr mean, min and max over the seeds per setting.
Candidates and neighbours are drawn once per seed (the largest setting) and every setting scores a prefix of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # the shipped default first
    {"candidates": 16, "neighbours": 50, "bleu_weight": 2.0, "logprob_weight": 0.5},
    {"candidates": 0, "neighbours": 50, "bleu_weight": 2.0, "logprob_weight": 0.5},  # = the greedy caption
    {"candidates": 8, "neighbours": 50, "bleu_weight": 2.0, "logprob_weight": 0.5},
    {"candidates": 12, "neighbours": 50, "bleu_weight": 2.0, "logprob_weight": 0.5},
    {"candidates": 16, "neighbours": 25, "bleu_weight": 2.0, "logprob_weight": 0.5},
    {"candidates": 16, "neighbours": 40, "bleu_weight": 2.0, "logprob_weight": 0.5},
    {"candidates": 16, "neighbours": 50, "bleu_weight": 0.0, "logprob_weight": 0.5},
    {"candidates": 16, "neighbours": 50, "bleu_weight": 3.0, "logprob_weight": 0.5},
    {"candidates": 16, "neighbours": 50, "bleu_weight": 2.0, "logprob_weight": 0.0},
    {"candidates": 16, "neighbours": 50, "bleu_weight": 2.0, "logprob_weight": 1.0},
]


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
    most_cand = max(s["candidates"] for s in SETTINGS)
    most_nb = max(s["neighbours"] for s in SETTINGS)
    decode = cap.decode_defaults.override(strategy="sample")

    def mean_logprob(ids, score):
        return score / max(1, len(ids))

    # per image: its neighbours; its greedy caption; per seed, its samples — (text, mean log-prob per word)
    neighbours, greedy, samples = [], [], {seed: [] for seed in range(args.seeds)}
    reranker.config.neighbours = most_nb
    for s in tqdm(range(0, len(data), 32), desc="candidates", unit="batch"):
        pixels = cap.preprocess(data.images[s:s + 32])
        feats = cap.encode(pixels)
        neighbours += reranker.neighbours(pixels)
        greedy += [(" ".join(r.tokens), r.score / max(1, len(r.tokens)))
                   for r in cap.caption_features(feats, decode.override(strategy="greedy"))]
        for seed in range(args.seeds):
            drawn = cap.model.generate(feats, decode.override(seed=seed), per_image=most_cand, decoder=cap.generator)
            texts = [(" ".join(cap.tokenizer.vocab[t] for t in ids), mean_logprob(ids, sc)) for ids, sc in drawn]
            samples[seed] += [texts[i:i + most_cand] for i in range(0, len(texts), most_cand)]

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
                for text, lp in [greedy[i]] + samples[seed][i][:setting["candidates"]]:
                    options.setdefault(text, lp)
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
