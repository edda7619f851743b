"""Retrieval speed: index build throughput on real photos, query latency over a 10,000-image index, and
build/query at 1,000,000 synthetic vectors (exact NumPy vs faiss IVF). Writes benchmarks/results/retrieval_speed.json.

    python benchmarks/retrieval_speed.py [--model flickr8k-retrieval] [--data ../shared/data/flickr8k]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def percentile_ms(times, q):
    return float(np.percentile(np.asarray(times) * 1000, q))


def unit_vectors(n, d, seed):
    v = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def main(argv=None):
    from vlfuse.data.captions import read_captions
    from vlfuse.tasks.retrieval.index import ImageIndex, exact_topk
    from vlfuse.tasks.retrieval.pipeline import Retriever

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="flickr8k-retrieval")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--build-images", type=int, default=300)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/retrieval_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"args": vars(args), "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                          "load_average_at_start": os.getloadavg()[0]}}

    t0 = time.time()
    retriever = Retriever.from_pretrained(args.model)
    result["model"] = {"name": args.model, "model_id": retriever.model_id, "load_seconds": time.time() - t0}
    val = read_captions(args.data, split="val")

    # 1. index build throughput on real photos (decode + resize + EfficientNet-Lite0 + pooling + projection)
    paths = val.images[: args.build_images]
    retriever.embed_images(paths[:8])  # warm-up
    t0 = time.time()
    index = ImageIndex.build(retriever, paths, progress=False)
    secs = time.time() - t0
    result["index_build"] = {"images": len(index), "seconds": secs, "images_per_second": len(index) / secs,
                             "target_images_per_second": 50}

    # 2. query latency over a 10,000-image index: the real vectors above + synthetic unit vectors to fill up
    base = index
    filler = unit_vectors(10_000 - len(base), base.dim, 0)
    big = ImageIndex(base.model_id, base.dim, base.paths + [f"synthetic/{i}.jpg" for i in range(len(filler))],
                     np.concatenate([base.sizes, np.zeros(len(filler), np.int64)]),
                     np.concatenate([base.mtimes, np.zeros(len(filler))]), np.concatenate([base.vectors, filler]))
    queries = [c[0] for c in val.captions[: args.queries]]
    retriever.embed_texts(queries[:4])
    text_times, search_times = [], []
    hits_at_1 = 0
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        vec = retriever.embed_texts([q])
        t1 = time.perf_counter()
        hits = big.search(vec, 10)[0]
        t2 = time.perf_counter()
        text_times.append(t2 - t0)
        search_times.append(t2 - t1)
        hits_at_1 += hits[0].path == str(Path(val.images[i]).resolve())
    image_times = []
    for path in val.images[: 20]:
        t0 = time.perf_counter()
        big.search(retriever.embed_images([path]), 10)
        image_times.append(time.perf_counter() - t0)
    result["query_10k"] = {
        "index_size": len(big), "real_vectors": len(base), "synthetic_vectors": len(filler), "k": 10,
        "text_query_ms_median": percentile_ms(text_times, 50), "text_query_ms_p95": percentile_ms(text_times, 95),
        "search_only_ms_median": percentile_ms(search_times, 50),
        "image_query_ms_median": percentile_ms(image_times, 50),
        "text_queries": len(queries), "own_image_is_top1_percent": 100.0 * hits_at_1 / len(queries),
        "target_ms": 20}

    # 3. one million synthetic vectors: exact NumPy and faiss IVF (built when the index is saved)
    n, d = args.large, base.dim
    vecs = unit_vectors(n, d, 1)
    qs = vecs[np.random.default_rng(2).choice(n, 30, replace=False)] + 0.3 * unit_vectors(30, d, 3)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    large = ImageIndex("synthetic@0", d, [f"img{i}.jpg" for i in range(n)], np.zeros(n, np.int64), np.zeros(n),
                       vecs)
    t0 = time.time()
    large._ann = large._build_ann()
    ann_build = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        large.save(Path(tmp) / "large.idx")
        save_s = time.time() - t0
        size_mb = (Path(tmp) / "large.idx").stat().st_size / 1e6
        t0 = time.time()
        loaded = ImageIndex.load(Path(tmp) / "large.idx")
        load_s = time.time() - t0
    exact_times, ann_times, recall = [], [], []
    for q in qs:
        t0 = time.perf_counter()
        _, exact_ids = exact_topk(q[None], vecs, 10)
        t1 = time.perf_counter()
        hits = loaded.search(q[None], 10)[0]
        t2 = time.perf_counter()
        exact_times.append(t1 - t0)
        ann_times.append(t2 - t1)
        recall.append(len({f"img{j}.jpg" for j in exact_ids[0]} & {h.path for h in hits}) / 10)
    result["synthetic_1m"] = {
        "vectors": n, "dim": d, "ivf_lists": loaded._ann.nlist if loaded._ann is not None else None,
        "nprobe": loaded._ann.nprobe if loaded._ann is not None else None,
        "ivf_build_seconds": ann_build, "save_seconds": save_s, "load_seconds": load_s, "file_mb": size_mb,
        "exact_numpy_query_ms_median": percentile_ms(exact_times, 50),
        "faiss_ivf_query_ms_median": percentile_ms(ann_times, 50),
        "faiss_ivf_recall_at_10_vs_exact": float(statistics.mean(recall))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
