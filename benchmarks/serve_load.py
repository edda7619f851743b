"""Bounded load test of `vlfuse serve` on loopback: a fixed number of requests per concurrency level.

Starts the server as a subprocess on 127.0.0.1 (never anything else), sends real Flickr8k val photos to
/v1/caption (and, where those models are loaded, /v1/vqa and /v1/search) at concurrency 1, 8 and 32, and records
requests/s, p50/p95/p99 latency, errors, the server's batch sizes and its peak RSS (VmHWM).

    python benchmarks/serve_load.py --caption-model flickr8k-caption --vqa-model easyvqa \
        --retrieval-model flickr8k-retrieval --endpoints caption,vqa,search
    -> benchmarks/results/serve_load.json  (with a retrieval model, an index over 1,000 val photos is built first)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "flickr8k"
HOST = "127.0.0.1"  # loopback only, always
QUESTIONS = ["what is in the picture?", "is there a dog?", "what color is the shirt?", "how many people are there?"]
QUERIES = ["a dog running on the grass", "children playing in the water", "a man riding a bike", "two people hiking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size of the process (VmHWM), in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def current_rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def batch_stats(metrics_text: str) -> dict:
    """Mean batch size per model from the server's Prometheus text."""
    out = {}
    for model, total in re.findall(r'vlfuse_batch_size_sum\{model="(\w+)"\} ([\d.]+)', metrics_text):
        count = re.search(rf'vlfuse_batch_size_count\{{model="{model}"\}} (\d+)', metrics_text).group(1)
        out[model] = {"batches": int(count), "requests": int(float(total)),
                      "mean_batch_size": round(float(total) / max(int(count), 1), 2)}
    return out


def _multipart(fields: dict, files: dict) -> tuple:
    boundary = "vlfuse" + secrets.token_hex(12)
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, ctype) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def encode_request(endpoint: str, i: int, photos: list, beam: Optional[int], key: str, host: str) -> bytes:
    """The whole HTTP/1.1 request (headers and body) for request number ``i``, as bytes."""
    photo = photos[i % len(photos)]
    if endpoint == "caption":
        path, (ctype, body) = "/v1/caption", _multipart({} if beam is None else {"beam": str(beam)}, {"image": ("photo.jpg", photo,
                                                                                          "image/jpeg")})
    elif endpoint == "vqa":
        path, (ctype, body) = "/v1/vqa", _multipart({"question": QUESTIONS[i % len(QUESTIONS)]},
                                                    {"image": ("photo.jpg", photo, "image/jpeg")})
    else:
        path, ctype = "/v1/search", "application/json"
        body = json.dumps({"text": QUERIES[i % len(QUERIES)] + f" {i}", "k": 5}).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _exchange(conn: list, host: str, port: int, request: bytes) -> int:
    """Send one request on the keep-alive connection ``conn`` ([reader, writer], opened on demand) and read the
    whole response; returns the status code."""
    if conn[0] is None:
        conn[0], conn[1] = await asyncio.open_connection(host, port)
    reader, writer = conn
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
    await reader.readexactly(int(headers.get("content-length", "0")))
    if headers.get("connection", "").lower() == "close":
        writer.close()
        conn[0] = conn[1] = None
    return status


async def run_level(host: str, port: int, key: str, endpoint: str, concurrency: int, total: int, photos: list,
                    beam: Optional[int]) -> dict:
    """``total`` requests over ``concurrency`` keep-alive connections. The requests are encoded before the clock
    starts and sent over bare asyncio streams: the generator shares the server's cores, so it must cost as little
    CPU as it can (an httpx client spent a sizeable part of one core at concurrency 32)."""
    requests = [encode_request(endpoint, i, photos, beam, key, f"{host}:{port}") for i in range(total)]
    latencies, errors, statuses = [], 0, {}
    counter = iter(range(total))

    async def worker():
        nonlocal errors
        conn = [None, None]
        try:
            for i in counter:
                start = time.perf_counter()
                try:
                    status = await asyncio.wait_for(_exchange(conn, host, port, requests[i]), 120)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    status = type(exc).__name__
                    if conn[1] is not None:
                        conn[1].close()
                    conn[0] = conn[1] = None
                latencies.append(time.perf_counter() - start)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status != 200:
                    errors += 1
        finally:
            if conn[1] is not None:
                conn[1].close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": total, "errors": errors, "statuses": statuses,
            "wall_s": round(wall, 3), "requests_per_s": round(total / wall, 2),
            "latency_ms": {"mean": round(float(lat.mean()), 1), "p50": round(float(np.percentile(lat, 50)), 1),
                           "p95": round(float(np.percentile(lat, 95)), 1),
                           "p99": round(float(np.percentile(lat, 99)), 1)}}


def build_index(model: str, n: int, tmp: Path) -> str:
    """An index over the first ``n`` val photos (symlinked into one folder), built with `vlfuse index build`."""
    folder = tmp / "index_photos"
    folder.mkdir()
    for name in (DATA / "val.txt").read_text().split()[:n]:
        (folder / name).symlink_to((DATA / "images" / name).resolve())
    out = tmp / "val.idx"
    subprocess.run([sys.executable, "-m", "vlfuse", "index", "build", str(folder), "--out", str(out), "--model", model,
                    "--no-progress"], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return str(out)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            r = httpx.get(base + "/readyz", timeout=2)
            if r.status_code == 200:
                return r.json()["models"]
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caption-model", default=None)
    p.add_argument("--vqa-model", default=None)
    p.add_argument("--retrieval-model", default=None)
    p.add_argument("--index", default=None, help="image index to search (default with --retrieval-model: one "
                   "built here over the first --index-images val photos)")
    p.add_argument("--index-images", type=int, default=1000)
    p.add_argument("--endpoints", default="caption", help="comma-separated: caption,vqa,search (loaded ones only)")
    # 320 = 10 rounds of 32: with 96 (three rounds) the ramp-up and the drain of the last batches, when one of
    # the two inference workers idles, weighed ~10 % of the concurrency-32 level
    p.add_argument("--requests", type=int, default=320, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--beam", type=int, default=None, help="caption beam width (default: the model's own)")
    p.add_argument("--photos", type=int, default=64, help="distinct val photos to cycle through")
    p.add_argument("--max-batch-size", type=int, default=None, help="the server's --max-batch-size (default: its own)")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="the server's --batch-wait-ms (default: its own)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server (its --threads)")
    p.add_argument("--workers", type=int, default=None, help="the server's --workers (default: its own default)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args(argv)

    names = (DATA / "val.txt").read_text().split()[: args.photos]
    photos = [(DATA / "images" / n).read_bytes() for n in names]
    key = secrets.token_urlsafe(24)
    port = free_port()
    base = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys.txt"
        keys_file.write_text(key + "\n")
        if args.retrieval_model and args.retrieval_model != "none" and not args.index:
            args.index = build_index(args.retrieval_model, args.index_images, Path(tmp))
        cmd = [sys.executable, "-m", "vlfuse", "serve", "--host", HOST, "--port", str(port), "--api-keys-file",
               str(keys_file), "--log-level", "warning", "--threads", str(args.threads)]
        for flag in ("workers", "max_batch_size", "batch_wait_ms"):  # unset: the server's own defaults
            if getattr(args, flag) is not None:
                cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
        for flag in ("caption_model", "vqa_model", "retrieval_model", "index"):
            if getattr(args, flag):
                cmd += ["--" + flag.replace("_", "-"), getattr(args, flag)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(cmd, env=env)
        try:
            loaded = wait_ready(base, proc)
            idle_rss = current_rss_mb(proc.pid)
            endpoints = [e for e in args.endpoints.split(",")
                         if loaded.get("retrieval" if e == "search" else e)]
            results = {}
            for endpoint in endpoints:
                asyncio.run(run_level(HOST, port, key, endpoint, 4, 8, photos, args.beam))  # warm-up
                levels = []
                for c in [int(x) for x in args.concurrency.split(",")]:
                    before = batch_stats(httpx.get(base + "/metrics", headers={"X-API-Key": key}).text)
                    level = asyncio.run(run_level(HOST, port, key, endpoint, c, args.requests, photos, args.beam))
                    after = batch_stats(httpx.get(base + "/metrics", headers={"X-API-Key": key}).text)
                    model = "search" if endpoint == "search" else endpoint
                    b0 = before.get(model, {"batches": 0, "requests": 0})
                    b1 = after[model]
                    level["mean_batch_size"] = round((b1["requests"] - b0["requests"]) /
                                                     max(b1["batches"] - b0["batches"], 1), 2)
                    levels.append(level)
                    print(f"{endpoint:8s} c={c:3d}: {level['requests_per_s']:7.2f} req/s  "
                          f"p50 {level['latency_ms']['p50']:7.1f} ms  p95 {level['latency_ms']['p95']:7.1f} ms  "
                          f"p99 {level['latency_ms']['p99']:7.1f} ms  errors {level['errors']}  "
                          f"batch {level['mean_batch_size']}", flush=True)
                by_c = {lv["concurrency"]: lv for lv in levels}
                results[endpoint] = {"levels": levels, "server_peak_rss_mb_so_far": round(peak_rss_mb(proc.pid), 1),
                                     "speedup_32_vs_1": round(by_c[32]["requests_per_s"] / by_c[1]["requests_per_s"],
                                                              2) if 1 in by_c and 32 in by_c else None}
            peak = peak_rss_mb(proc.pid)
            described = httpx.get(base + "/v1/models", headers={"X-API-Key": key}).json()
            models, batching = described["models"], described["batching"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    report = {
        "what": "vlfuse serve on loopback, fixed request count per concurrency level, real Flickr8k val photos",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "server": {"models": models, "torch_threads": args.threads, **batching, "beam": args.beam if args.beam is not None else "model default",
                   "exit_status": proc.returncode},
        "results": results,
        "server_rss_mb": {"idle_after_load": round(idle_rss, 1), "peak": round(peak, 1)},
        "targets": {
            "zero_errors": all(lv["errors"] == 0 for r in results.values() for lv in r["levels"]),
            "throughput_32_ge_3x_1": {e: (r["speedup_32_vs_1"] or 0) >= 3.0 for e, r in results.items()},
            "peak_rss_le_600_mb": peak <= 600,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"]), f"peak RSS {peak:.0f} MB ->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
