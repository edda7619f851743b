"""Batch jobs on Ray against the plain command, same run, same photos: photos/s of ``vlfuse caption`` and
``vlfuse index build`` with the local engine and with ``--engine ray`` on 1 and 2 actors (one thread each), on a
local Ray cluster (loopback) started here, whose start-up is timed on its own. Every job is its own ``vlfuse``
process, timed from its start (Python, model load, Ray connection and actors included) to its exit; for captions
also from its first output line to its last (the steady rate). Writes benchmarks/results/scale_batch.json.

    python benchmarks/scale_batch.py [--data ../shared/data/flickr8k] [--photos 200]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray keeps 127.0.0.1 (tests/test_ray_batch.py)


def timed_job(argv, env, lines_out=True):
    """Run ``vlfuse ARGV``; (wall seconds, seconds to the first stdout line, to the last, stdout lines)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vlfuse", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    first = last = None
    lines = []
    for line in proc.stdout:
        now = time.perf_counter() - start
        first = first if first is not None else now
        last = now
        lines.append(line)
    err = proc.stderr.read()
    status = proc.wait()
    wall = time.perf_counter() - start
    if status not in (0, 2):
        raise SystemExit(f"vlfuse {' '.join(argv[:3])} failed ({status}):\n{err[-3000:]}")
    return wall, first, last, lines


def caption_result(n, wall, first, last):
    steady = (n - 1) / (last - first) if last and first is not None and last > first else None
    return {"wall_s": round(wall, 2), "photos_per_s": round(n / wall, 2), "first_line_s": round(first, 2),
            "steady_photos_per_s": round(steady, 2) if steady else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--photos", type=int, default=200, help="the first N photos of val.txt")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_batch.json"))
    args = p.parse_args(argv)

    token = Path(tempfile.mkdtemp()) / "auth_token"  # this cluster's own token (tests/test_ray_batch.py says why)
    token.write_text(secrets.token_hex(32))
    os.environ.update({**LOOPBACK_ONLY, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    import ray

    data = Path(args.data)
    names = (data / "val.txt").read_text().split()[:args.photos]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = {"what": __doc__.split("\n\n")[0].replace("\n", " "),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "ray": ray.__version__,
                          "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
              "photos": len(names), "decoding": "the model's default (flickr8k-caption: consensus reranking)",
              "batch_size": {"caption": 16, "index": 32}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for name in names:
            os.symlink(data / "images" / name, folder / name)

        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
        result["ray_start_s"] = round(time.perf_counter() - t, 2)
        address = ray.get_runtime_context().gcs_address
        try:
            runs = {"local (default threads: 2)": ([], {}),
                    "local, VLFUSE_THREADS=1": ([], {"VLFUSE_THREADS": "1"}),
                    "ray, 1 actor x 1 thread": (["--engine", "ray", "--address", address, "--actors", "1"], {}),
                    "ray, 2 actors x 1 thread": (["--engine", "ray", "--address", address, "--actors", "2"], {})}
            captions, index, outputs = {}, {}, {}
            for label, (extra, more_env) in runs.items():
                wall, first, last, lines = timed_job(["caption", str(folder), "--json", "--no-progress", *extra]
                                                     if extra else ["caption", str(folder), "--json"],
                                                     {**env, **more_env})
                captions[label] = caption_result(len(names), wall, first, last)
                outputs[label] = lines
                print("caption", label, captions[label], flush=True)
                out = Path(tmp) / "photos.idx"
                wall, _, _, _ = timed_job(["index", "build", str(folder), "--out", str(out), "--no-progress", *extra],
                                          {**env, **more_env})
                index[label] = {"wall_s": round(wall, 2), "photos_per_s": round(len(names) / wall, 2)}
                print("index", label, index[label], flush=True)
        finally:
            ray.shutdown()
    one = outputs["local, VLFUSE_THREADS=1"]
    result["caption"] = captions
    result["index_build"] = index
    result["same_output_as_local_one_thread"] = {label: lines == one for label, lines in outputs.items()}
    result["same_captions_as_local_default_threads"] = {
        label: [json.loads(x)["caption"] for x in lines] == [json.loads(x)["caption"]
                                                           for x in outputs["local (default threads: 2)"]]
        for label, lines in outputs.items()}
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
