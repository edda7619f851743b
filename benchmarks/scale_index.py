"""IVF-PQ shards at a million vectors: build time, bytes per vector, search latency of one shard and of a query fanned
out over 4 shards, and recall@10 against exact search, on synthetic 256-d unit vectors in 1,000 clusters (uniform
random vectors have no neighbours worth the name and understate any ANN index). Writes
benchmarks/results/scale_index.json; docs/scaling.md scales these figures to 100 M photos.

    python benchmarks/scale_index.py [--n 1000000] [--queries 200]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def clustered_unit_vectors(n, d, centres, seed, chunk=100_000):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = c[rng.integers(0, centres, m)] + 0.6 * rng.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_ids(q, x, k, chunk=200_000):
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for s in range(0, len(x), chunk):
        sims = q @ x[s:s + chunk].T
        i = np.concatenate([best_i, np.argpartition(-sims, k - 1, axis=1)[:, :k] + s], axis=1)
        sc = np.concatenate([best_s, np.take_along_axis(sims, i[:, k:] - s, 1)], axis=1)
        top = np.argsort(-sc, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(sc, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def latency(index_search, q, k):
    times = []
    for row in q:
        t = time.perf_counter()
        index_search(row[None], k)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--nlist", type=int, default=1024, help="inverted lists per shard")
    p.add_argument("--m", type=int, default=32)
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_index.json"))
    args = p.parse_args(argv)

    import faiss

    from vlfuse.tasks.retrieval.shards import IVFPQParams, ShardedIndex, merge_topk, recall_at_k

    result = {"what": __doc__.split("\n\n")[0].replace("\n", " "),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "faiss": faiss.__version__, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
              "vectors": args.n, "dim": args.dim, "queries": args.queries}
    t = time.perf_counter()
    x = clustered_unit_vectors(args.n, args.dim, 1000, seed=0)
    q = x[np.random.default_rng(1).choice(args.n, args.queries, replace=False)].copy()
    q += 0.05 * np.random.default_rng(2).standard_normal(q.shape, dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    result["generate_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    exact = exact_ids(q, x, 10)
    result["exact_search_all_queries_s"] = round(time.perf_counter() - t, 2)
    paths = [str(i) for i in range(args.n)]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    for shards, m in ((1, args.m), (4, args.m), (1, 2 * args.m)):
        params = IVFPQParams(nlist=args.nlist, m=m, nprobe=16, train_size=args.train)
        t = time.perf_counter()
        index = ShardedIndex.build("synthetic@0", paths, x, shards=shards, params=params)
        entry = {"shards": shards, "nlist_per_shard": params.nlist, "m": m, "nbits": params.nbits, "train_size": args.train,
                 "build_s": round(time.perf_counter() - t, 1),
                 "bytes": sum(len(faiss.serialize_index(s)) for s in index.shards)}
        entry["bytes_per_vector"] = round(entry["bytes"] / args.n, 1)
        faiss.omp_set_num_threads(1)  # one query on one core, as a search service per core would run it
        for nprobe in (8, 16, 64):
            for s in index.shards:
                s.nprobe = nprobe
            _, ids = merge_topk(*index.search_shards(q, 100), 100)
            entry[f"nprobe_{nprobe}"] = {"recall_at_10_vs_exact": round(recall_at_k(ids[:, :10], exact), 3),
                                         # the exact top 10 among the first 100: what re-ranking 100 candidates
                                         # with the full vectors would recover
                                         "recall_10_at_100": round(float(np.mean(
                                             [len(set(a) & set(e)) / 10 for a, e in zip(ids, exact)])), 3),
                                         "top1_is_exact_top1": round(float(np.mean(ids[:, 0] == exact[:, 0])), 3),
                                         **latency(lambda v, k: index.search_shards(v, k), q, 10)}
            if shards > 1:  # each shard alone: what one shard server answers in
                entry[f"nprobe_{nprobe}"]["one_shard"] = latency(lambda v, k: index.shards[0].search(v, k), q, 10)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        result[f"{shards}_shard" + ("s" if shards > 1 else "") + f"_m{m}"] = entry
        print(shards, json.dumps(entry), flush=True)
    result["flat_bytes"] = {"fp32": args.n * args.dim * 4, "fp16": args.n * args.dim * 2}
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
