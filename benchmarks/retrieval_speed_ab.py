"""Interleaved A/B of two retrieval models' inference cost in one process, for a shared machine whose absolute
speed drifts: index-build throughput (embed_files) and text query latency over 10,000 vectors, alternating the
models round by round. Writes benchmarks/results/retrieval_speed_ab.json.

    python benchmarks/retrieval_speed_ab.py --old OLD_MODEL_DIR [--new flickr8k-retrieval]
    (e.g. OLD_MODEL_DIR from: git show c58b4fe:vlfuse/pretrained/flickr8k-retrieval/<file>)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def main(argv=None):
    from vlfuse.data.captions import read_captions
    from vlfuse.tasks.retrieval.pipeline import Retriever

    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True)
    p.add_argument("--new", default="flickr8k-retrieval")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/retrieval_speed_ab.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    val = read_captions(args.data, split="val")
    paths, queries = val.images[:args.images], [c[0] for c in val.captions[100:100 + 6 * args.rounds]]
    models = {"old": Retriever.from_pretrained(args.old), "new": Retriever.from_pretrained(args.new)}
    vecs = np.random.default_rng(0).standard_normal((10000, 256)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    build = {n: [] for n in models}
    text = {n: [] for n in models}
    for rnd in range(args.rounds):
        for name, r in models.items():
            t = time.perf_counter()
            list(r.embed_files(paths))
            build[name].append(len(paths) / (time.perf_counter() - t))
            for q in queries[rnd::args.rounds]:
                t = time.perf_counter()
                scores = vecs @ r.embed_texts([q])[0]
                np.argpartition(-scores, 10)[:10]
                text[name].append(1000 * (time.perf_counter() - t))
    out = {"args": vars(args), "model_ids": {n: r.model_id for n, r in models.items()},
           "build_images_per_second_median": {n: statistics.median(v) for n, v in build.items()},
           "text_query_ms_median": {n: statistics.median(v) for n, v in text.items()},
           "raw": {"build_images_per_second": build, "text_query_ms": text}}
    out["build_ratio_new_over_old"] = (out["build_images_per_second_median"]["new"]
                                       / out["build_images_per_second_median"]["old"])
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "raw"}, indent=1))


if __name__ == "__main__":
    main()
