"""Inference speed of two checkouts of vlfuse, interleaved call by call: on a shared CPU whose speed drifts by
several times within minutes, two benchmark runs one after the other compare the machine, not the code. Here one
worker process per checkout loads the shipped models, and the parent asks them in turn to time the same call on
the same input, so that whatever load there is hits both alike.

Timed (ms, medians over the items and rounds; each worker uses ``--threads`` torch threads): the caption model's
image encoder, greedy and beam-3 captions at batch 1 and greedy over a batch of 32 (default runtime, and PyTorch +
TorchScript with ``onnx=False``), the model's own decoding default (consensus reranking) at batch 1, the retriever's embedding of one photo, and one easy-VQA question.

    python benchmarks/checkout_speed_ab.py --a ../main --b . [--n 24] [--rounds 2]
Writes benchmarks/results/checkout_speed_ab.json. Uses only the API both checkouts share.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The worker: loads the models once, then answers "CALL ITEM" lines with the milliseconds the call took.
WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from vlfuse.data.images import load_image
from vlfuse.generation import DecodeConfig
from vlfuse.tasks.caption.pipeline import Captioner
from vlfuse.tasks.retrieval.pipeline import Retriever
from vlfuse.tasks.vqa.pipeline import QuestionAnswerer
paths = json.loads(sys.argv[2])
images = [load_image(p) for p in paths]
caps = {"default": Captioner.from_pretrained("flickr8k-caption"),
        "no_onnx": Captioner.from_pretrained("flickr8k-caption", onnx=False)}
retriever, vqa = Retriever.from_pretrained("flickr8k-retrieval"), QuestionAnswerer.from_pretrained("easyvqa")
pixels = [caps["default"].preprocess([im]) for im in images]
greedy, beam3 = DecodeConfig(strategy="greedy"), DecodeConfig(strategy="beam", beam_size=3)
calls = {}
for mode, c in caps.items():
    calls[mode + "/encoder"] = lambda i, c=c: c.encode(pixels[i])
    calls[mode + "/greedy"] = lambda i, c=c: c.caption_features(c.encode(c.preprocess([images[i]])), greedy)
    calls[mode + "/beam3"] = lambda i, c=c: c.caption_features(c.encode(c.preprocess([images[i]])), beam3)
    calls[mode + "/greedy_batch32"] = lambda i, c=c: c.caption_features(c.encode(c.preprocess(images[:32])), greedy)
calls["default/rerank"] = lambda i: caps["default"].caption_pixels(caps["default"].preprocess([images[i]]),
                                                                  caps["default"].decode_defaults)
calls["retrieval/embed_photo"] = lambda i: retriever.embed_images([images[i]])
calls["vqa/question"] = lambda i: vqa(images[i].resize((64, 64)), "what color is the shape?")
for call in calls.values():
    call(0)  # warm-up (graphs exported where they are not cached yet)
print("ready", flush=True)
for line in sys.stdin:
    name, item = line.split()
    t = time.perf_counter()
    calls[name](int(item))
    print(1000 * (time.perf_counter() - t), flush=True)
"""
CALLS = ["default/encoder", "default/greedy", "default/beam3", "default/rerank", "no_onnx/encoder", "no_onnx/greedy",
         "no_onnx/beam3", "retrieval/embed_photo", "vqa/question"]
BATCH_CALLS = ["default/greedy_batch32", "no_onnx/greedy_batch32"]


def start(checkout: Path, threads: int, paths: list) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(threads), json.dumps(paths)], cwd=checkout,
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if worker.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker for {checkout} did not start")
    return worker


def timed(worker: subprocess.Popen, name: str, item: int) -> float:
    worker.stdin.write(f"{name} {item}\n")
    worker.stdin.flush()
    return float(worker.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="the first checkout (e.g. the commit before a change)")
    ap.add_argument("--b", default=str(ROOT), help="the second checkout (default: this one)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--n", type=int, default=24, help="val photos timed at batch 1 (at least 32 are loaded)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/checkout_speed_ab.json"))
    args = ap.parse_args()
    data = Path(args.data)
    names = (data / "val.txt").read_text().split()[:max(32, args.n)]
    paths = [str(data / "images" / name) for name in names]
    workers = {"a": start(Path(args.a), args.threads, paths), "b": start(Path(args.b), args.threads, paths)}
    times = {side: {name: [] for name in CALLS + BATCH_CALLS} for side in workers}
    for rnd in range(args.rounds):
        for item in range(args.n):
            for name in CALLS + (BATCH_CALLS if item % 8 == 0 else []):
                order = ("a", "b") if (rnd + item) % 2 == 0 else ("b", "a")  # neither always goes first
                for side in order:
                    times[side][name].append(timed(workers[side], name, item))
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    medians = {side: {name: round(statistics.median(v), 2) for name, v in t.items()} for side, t in times.items()}
    result = {"a": str(Path(args.a).resolve()), "b": str(Path(args.b).resolve()), "threads": args.threads,
              "photos": args.n, "rounds": args.rounds, "load_average_at_end": os.getloadavg()[0],
              "ms_median": medians,
              "b_over_a": {name: round(medians["b"][name] / medians["a"][name], 3) for name in CALLS + BATCH_CALLS}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
