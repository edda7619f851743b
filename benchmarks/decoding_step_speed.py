"""Speed of the shipped captioner's decoding step at batch 1: ms per step of the int8 step in ONNX Runtime and in
TorchScript, and greedy caption ms per image (features given: the image encoder is not timed) with each.

    python benchmarks/decoding_step_speed.py                       # this checkout
    python benchmarks/decoding_step_speed.py --against ../wt-base  # interleaved with another checkout's code

With ``--against`` the measurement runs alternately in a subprocess on this checkout's code and on the other's
(``PYTHONPATH``), ``--rounds`` times each, so that both see the same load on a shared machine; it prints every
run and each side's fastest and median run (on a busy machine the fastest is the steadier figure). It uses only the public ``Captioner`` API, so any version of the code runs it.
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
DATA = ROOT.parent / "shared" / "data" / "flickr8k"


def measure(photos: int, repeats: int) -> dict:
    """One run on the code importable here: {"<backend>_step_ms", "<backend>_greedy_ms_per_image"}."""
    import torch

    from vlfuse import Captioner

    torch.set_num_threads(1)  # a shared 2-core machine: one thread times most steadily
    names = (DATA / "val.txt").read_text().split()[:photos]
    captioners = {"onnxruntime": Captioner.from_pretrained("flickr8k-caption"),
                  "torchscript": Captioner.from_pretrained("flickr8k-caption", onnx=False)}
    plain = captioners["torchscript"]
    with torch.inference_mode():
        features = plain.encode(plain.preprocess([DATA / "images" / n for n in names]))
        greedy = plain.decode_config(beam=1)
        out = {}
        for backend, cap in captioners.items():
            assert cap.decoding_backend == backend, cap.decoding_backend
            decoder = cap.generator
            one = [features.index_select(torch.tensor([i])) for i in range(photos)]
            tokens = [torch.tensor([[1] + cap.model.generate(f, greedy, decoder=decoder)[0][0]]) for f in one]
            step_times, caption_times = [], []
            for _ in range(repeats):
                t0, steps = time.perf_counter(), 0
                for f, seq in zip(one, tokens):
                    state = decoder.init_state(f)
                    for t in range(1, seq.shape[1] + 1):  # the greedy caption's prefixes, <eos> step included
                        _, state = decoder.step(seq[:, :t], state)
                        steps += 1
                step_times.append((time.perf_counter() - t0) / steps * 1e3)
                t0 = time.perf_counter()
                for f in one:
                    cap.caption_features(f, greedy)
                caption_times.append((time.perf_counter() - t0) / photos * 1e3)
            out[f"{backend}_step_ms"] = round(min(step_times), 4)
            out[f"{backend}_greedy_ms_per_image"] = round(min(caption_times), 3)
    return out


def interleaved(other: Path, rounds: int, photos: int, repeats: int) -> dict:
    """Alternate runs on this checkout's code and on ``other``'s; every run and the median of each side."""
    runs = {"this": [], "other": []}
    for i in range(rounds):
        for side, root in (("this", ROOT), ("other", other))[::1 if i % 2 == 0 else -1]:  # who goes first alternates
            env = dict(os.environ, PYTHONPATH=str(root))
            text = subprocess.run([sys.executable, __file__, "--photos", str(photos), "--repeats", str(repeats)],
                                  env=env, cwd=root, capture_output=True, text=True, check=True).stdout
            runs[side].append(json.loads(text.strip().splitlines()[-1]))
            print(side, runs[side][-1], flush=True)
    summary = {f"{side} {stat.__name__}": {k: round(stat(r[k] for r in rs), 4) for k in rs[0]}
               for side, rs in runs.items() for stat in (min, statistics.median)}
    return {"runs": runs, "summary": summary, "this": str(ROOT), "other": str(other)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per run; the fastest is kept")
    p.add_argument("--against", type=Path, default=None, help="another checkout to interleave runs with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.against is None:
        result = measure(args.photos, args.repeats)
    else:
        result = interleaved(args.against.resolve(), args.rounds, args.photos, args.repeats)
    print(json.dumps(result) if args.against is None else json.dumps(result["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
