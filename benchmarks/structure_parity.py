"""Fingerprint what the shipped models output, through the command line only (so it runs unchanged on any
version of the code): captions of 200 Flickr8k val photos with every decoding path (greedy, beam 3, the model's
default, greedy on the TorchScript and the eager float32 paths), retrieval recall@K on val, easy-VQA accuracy.

    python benchmarks/structure_parity.py --out benchmarks/results/structure_parity_before.json   # old code
    python benchmarks/structure_parity.py --compare benchmarks/results/structure_parity_before.json
    python benchmarks/structure_parity.py --compare ... --captions-only   # the captions alone, while iterating

With ``--compare`` it writes ``structure_parity.json``: this run, and per output how many differ from the
earlier run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k"
CAPTION_RUNS = {
    "greedy": ["--beam", "1"],
    "beam3": ["--beam", "3"],
    "default": [],
    "greedy_torchscript": ["--beam", "1", "--no-onnx"],
    "greedy_float32": ["--beam", "1", "--float32", "--no-onnx"],
}


def vlfuse(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "vlfuse", *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"vlfuse {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def val_photos(n: int) -> list:
    names = (DATA / "val.txt").read_text().split()[:n]
    return [str(DATA / "images" / name) for name in names]


def caption_runs(photos: list) -> dict:
    runs = {}
    for name, extra in CAPTION_RUNS.items():
        t = time.perf_counter()
        lines = vlfuse("caption", *photos, "--json", *extra).splitlines()
        runs[name] = {Path(r["image"]).name: r["caption"] for r in map(json.loads, lines)}
        print(f"{name}: {len(runs[name])} captions in {time.perf_counter() - t:.1f} s", flush=True)
    return runs


def metrics(task: str, *args: str) -> dict:
    text = vlfuse("evaluate", "--task", task, *args)
    return json.loads(text[text.index("{"):])


def numbers(report: dict) -> dict:
    """The report's measured numbers (not its timings)."""
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) and "second" not in k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=200)
    p.add_argument("--out", default=None)
    p.add_argument("--compare", default=None, help="an earlier run's JSON to compare with")
    p.add_argument("--captions-only", action="store_true", help="skip the retrieval and VQA evaluations")
    args = p.parse_args()
    result = {"captions": caption_runs(val_photos(args.photos))}
    if not args.captions_only:
        ret = metrics("retrieval", "--data", str(DATA), "--split", "val")
        result["retrieval_val"] = numbers(ret)
        vqa = metrics("vqa", "--model", "easyvqa", "--data", "easy-vqa", "--split", "test")
        result["easyvqa_test"] = numbers(vqa)
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        result["differs_from_before"] = {
            "captions": {name: sum(before["captions"][name].get(k) != v for k, v in caps.items())
                         for name, caps in result["captions"].items() if name in before["captions"]},
            **{part: {k: round(v - before[part].get(k, float("nan")), 6) for k, v in result[part].items()}
               for part in ("retrieval_val", "easyvqa_test") if part in result},
        }
        print(json.dumps(result["differs_from_before"], indent=2))
    out = Path(args.out or ROOT / "benchmarks/results/structure_parity.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
