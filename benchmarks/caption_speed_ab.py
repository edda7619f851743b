"""Interleaved A/B of a caption model's speed between two checkouts of vlfuse, for a shared machine whose speed
drifts: round by round, one short process per checkout (its own vlfuse first on the path), alternating. Each
measures the model's default decoding and greedy decoding: the median latency of one photo at a time (load +
preprocess + encode + decode) and the throughput in batches of 32 photos decoded in memory, with the CPU time per
photo beside each (on a loaded machine, wall time measures the others' load as much as this code).

    git worktree add --detach ../vlfuse-before 92d0389
    python benchmarks/caption_speed_ab.py --before ../vlfuse-before [--after .] [--rounds 3] [--threads 2]
Writes benchmarks/results/caption_speed_ab.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(args) -> dict:
    """One side of one round, in this process's vlfuse."""
    import torch

    torch.set_num_threads(args.threads)
    from vlfuse.data.images import load_image
    from vlfuse.tasks.caption.pipeline import Captioner

    data = Path(args.data)
    paths = [data / "images" / n for n in (data / "val.txt").read_text().split()[:args.photos]]
    images = [load_image(p) for p in paths]
    cap = Captioner.from_pretrained(args.model)
    out = {}
    for name, decode in (("default", cap.decode_defaults), ("greedy", cap.decode_config(beam=1))):
        cap.caption_pixels(cap.preprocess(paths[:2]), decode)  # warm-up (and the reranker's load)
        wall, cpu = [], []
        for p in paths:
            t, c = time.perf_counter(), time.process_time()
            cap.caption_pixels(cap.preprocess([p]), decode)
            wall.append((time.perf_counter() - t) * 1000)
            cpu.append((time.process_time() - c) * 1000)
        t, c = time.perf_counter(), time.process_time()
        for s in range(0, len(images), 32):
            cap.caption_pixels(cap.preprocess(images[s:s + 32]), decode)
        seconds = time.perf_counter() - t
        out[name] = {"batch1_ms": statistics.median(wall), "batch1_cpu_ms": statistics.median(cpu),
                     "batch32_photos_per_s": len(images) / seconds,
                     "batch32_cpu_ms_per_photo": (time.process_time() - c) * 1000 / len(images)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", help="checkout measured first in each round (e.g. a worktree of an older commit)")
    ap.add_argument("--after", default=str(ROOT))
    ap.add_argument("--model", default="flickr8k-caption")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one side, in a child process
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/caption_speed_ab.json"))
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    if not args.before:
        ap.error("--before is required")
    sides = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    rounds = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, checkout in sides.items():
            r = subprocess.run([sys.executable, __file__, "--measure", "--model", args.model, "--data", args.data,
                                "--photos", str(args.photos), "--threads", str(args.threads)], cwd=checkout,
                               env={**os.environ, "PYTHONPATH": checkout}, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{side} ({checkout}) failed:\n{r.stderr}")
            rounds[side].append(json.loads(r.stdout.splitlines()[-1]))
            print(side, rounds[side][-1], flush=True)
    medians = {side: {decoding: {k: round(statistics.median(r[decoding][k] for r in runs), 1) for k in runs[0][decoding]}
                      for decoding in runs[0]} for side, runs in rounds.items()}
    result = {"model": args.model, "photos": args.photos, "threads": args.threads, "rounds": args.rounds,
              "checkouts": sides, "median_over_rounds": medians, "per_round": rounds}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
