"""Caption speed on this CPU, in one run: encoder-only ms/image (batch 1), end-to-end caption ms/image at
batch 1 (greedy and beam 3), batched throughput, and `vlfuse caption one.jpg` from a cold process; for the
default (image encoder and decoding step in ONNX Runtime) and, interleaved in the same run, without ONNX Runtime
(PyTorch's image encoder, TorchScript's decoding step). Where the model's decoding default is consensus
reranking (flickr8k-caption), its batch-1 latency, batched throughput and cold CLI are measured too.

    python benchmarks/caption_speed.py [--model flickr8k-caption] [--images DIR] [--n 40] [--no-onnx]
Writes benchmarks/results/caption_speed.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sample_images(directory: str, n: int):
    d = Path(directory)
    if (d / "val.txt").is_file():
        names = (d / "val.txt").read_text().split()[:n]
        return [d / "images" / x for x in names]
    return sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]


def interleaved_ms(fns, items, repeats: int = 2):
    """Median ms per call of each fn, measured in turn on the same item (so machine noise hits all alike)."""
    for fn in fns:
        fn(items[0])  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for it in items:
            for fn, ts in zip(fns, times):
                t = time.perf_counter()
                fn(it)
                ts.append((time.perf_counter() - t) * 1000)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flickr8k-caption")
    ap.add_argument("--images", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-onnx", action="store_true", help="encode images with PyTorch, not ONNX Runtime")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/caption_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from vlfuse.data.images import load_image
    from vlfuse.generation import DecodeConfig
    from vlfuse.tasks.caption.pipeline import Captioner

    # The default image encoder (ONNX Runtime where installed) and, unless --no-onnx, PyTorch's for comparison:
    # every per-image figure is measured for both in turn on the same item (interleaved), so machine noise hits
    # both alike.
    cap = Captioner.from_pretrained(args.model, onnx=False if args.no_onnx else None)
    onnx = cap.runtime.backends()["image_encoder"] == "onnxruntime"
    caps = [cap, Captioner.from_pretrained(args.model, onnx=False)] if onnx else [cap]
    paths = sample_images(args.images, args.n)
    pixels = [cap.preprocess([p]) for p in paths]
    greedy, beam3 = DecodeConfig(strategy="greedy"), DecodeConfig(strategy="beam", beam_size=3)

    def per_image_fns(c):
        # one item = (path, pixels): encoder-only on ready pixels; end to end = load + preprocess + encode + decode
        return [
            lambda it: c.encode(it[1]),
            lambda it: c.caption_features(c.encode(c.preprocess([it[0]])), greedy),
            lambda it: c.caption_features(c.encode(c.preprocess([it[0]])), beam3),
            lambda it: c.caption_features(c.encode(it[1]), greedy),
        ]

    times = interleaved_ms([fn for c in caps for fn in per_image_fns(c)], list(zip(paths, pixels)))

    def throughput(c, decode) -> float:
        imgs = [load_image(p) for p in paths]  # decoded in memory so the figure is the model's speed
        list(c.caption_features(c.encode(c.preprocess(imgs[: args.batch_size])), decode))  # warm-up
        t = time.perf_counter()
        for s in range(0, len(imgs), args.batch_size):
            c.caption_features(c.encode(c.preprocess(imgs[s:s + args.batch_size])), decode)
        return len(imgs) / (time.perf_counter() - t)

    def measures(i, c) -> dict:
        enc_ms, greedy_ms, beam_ms, enc_greedy_ms = times[4 * i: 4 * i + 4]
        return {
            **c.runtime.backends(),  # what runs the image encoder and the decoding step
            "encoder_ms_per_image_batch1": round(enc_ms, 2),
            "caption_greedy_ms_per_image_batch1": round(greedy_ms, 2),
            "caption_beam3_ms_per_image_batch1": round(beam_ms, 2),
            "decode_only_greedy_ms_batch1": round(enc_greedy_ms - enc_ms, 2),
            "greedy_over_encoder": round(greedy_ms / enc_ms, 2),
            f"throughput_images_per_s_batch{args.batch_size}_greedy": round(throughput(c, greedy), 1),
            f"throughput_images_per_s_batch{args.batch_size}_beam3": round(throughput(c, beam3), 1),
        }

    runs = [measures(i, c) for i, c in enumerate(caps)]
    thr_greedy = runs[0][f"throughput_images_per_s_batch{args.batch_size}_greedy"]

    default = {"decoding_default": cap.decode_defaults.strategy}
    if cap.decode_defaults.strategy == "rerank":
        rerank = cap.decode_defaults
        cap.reranker  # loaded once, as any process that reranks does
        default["rerank_ms_per_image_batch1"] = round(interleaved_ms(
            [lambda it: cap.caption_pixels(cap.preprocess([it[0]]), rerank)], list(zip(paths, pixels)), 1)[0], 2)
        imgs = [load_image(p) for p in paths]
        cap.caption_pixels(cap.preprocess(imgs[: args.batch_size]), rerank)  # warm-up
        t = time.perf_counter()
        for s in range(0, len(imgs), args.batch_size):
            cap.caption_pixels(cap.preprocess(imgs[s:s + args.batch_size]), rerank)
        default[f"throughput_images_per_s_batch{args.batch_size}_rerank"] = round(
            len(imgs) / (time.perf_counter() - t), 1)

    def cold_cli(extra) -> float:
        cold = []
        for _ in range(3):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "vlfuse", "caption", str(paths[0]), "--model", args.model]
                               + (["--no-onnx"] if args.no_onnx else []) + extra, capture_output=True, text=True)
            cold.append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr
        return round(statistics.median(cold), 2)

    result = {
        "model": args.model,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "images": len(paths),
        **runs[0],
        **default,
        "cold_cli_seconds_median": cold_cli([]),  # the model's default decoding
        "cold_cli_greedy_seconds_median": cold_cli(["--beam", "1"]),
        "targets": {"greedy_over_encoder_max": 2.0, "throughput_min": 50, "cold_cli_seconds_max": 5.0},
    }
    if len(runs) > 1:
        result["same_run_without_onnx_runtime"] = runs[1]
    result["meets_targets"] = {
        "greedy_le_2x_encoder": result["greedy_over_encoder"] <= 2.0,
        "throughput_ge_50": thr_greedy >= 50,
        "cold_cli_lt_5s": result["cold_cli_seconds_median"] < 5.0,
    }
    rerank_key = f"throughput_images_per_s_batch{args.batch_size}_rerank"
    if rerank_key in result:  # the goal is met greedily; said plainly for the model's default decoding too
        result["meets_targets"]["default_decoding_throughput_ge_50"] = result[rerank_key] >= 50
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
