"""Serving reliability suite, single-process (`vlfuse serve`) and Ray Serve (`vlfuse serve --engine ray`) alike;
loopback only, every loop bounded in count and time.

1. Schemathesis against the service's own OpenAPI schema (tests/schemathesis_hooks.py: real photos in the upload
   fields, a HAR of every request): >= 1,000 generated requests, 0 responses 5xx, every 4xx with the JSON error body.
2. Soak: --soak-requests (20,000) mixed requests — caption, VQA, text search, tags, and bad ones (not an image,
   a question over the limit, no API key, a thumbnail outside the index, k out of range) — at --concurrency:
   every response must have the status its kind should get; the server's RSS (Ray: each replica's) after the
   warm-up (the first 10 %) and at the end; p50/p99 latency by kind.
3. Kill -9 (Ray Serve, 2 replicas): SIGKILL one replica while good requests flow; the requests that failed, and
   how long until Ray Serve had replaced it. (`vlfuse serve` is one process with no workers to kill: killing it
   ends the service until a supervisor restarts it; see docs/serving.md.)

    python benchmarks/serve_reliability.py            -> benchmarks/results/serve_reliability.json
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from serve_load import DATA, HOST, QUESTIONS, QUERIES, _exchange, _multipart, build_index, current_rss_mb, free_port, \
    wait_ready

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Schemathesis hooks and the HAR verdict, shared with the CI test
from schemathesis_hooks import run_schemathesis  # noqa: E402

MODELS = {"caption": "flickr8k-caption", "vqa": "flickr8k-vqa", "retrieval": "flickr8k-retrieval",
          "tagging": "efficientnet-lite0"}
KINDS = ["caption", "vqa", "search", "tags", "caption", "vqa", "search", "bad_image", "long_question", "no_key",
         "not_indexed", "bad_k"]  # two thirds good requests, one third bad ones


def soak_request(kind: str, i: int, photos: list, key: str, host: str):
    """(the whole HTTP request as bytes, the status it must get)."""
    photo = ("photo.jpg", photos[i % len(photos)], "image/jpeg")
    method, path, ctype, body, status = "POST", "", "", b"", 200
    if kind in ("caption", "bad_image"):
        path = "/v1/caption"
        if kind == "bad_image":
            photo, status = ("photo.jpg", b"this is not a photo " * 20, "image/jpeg"), 415
        ctype, body = _multipart({}, {"image": photo})
    elif kind in ("vqa", "long_question"):
        question = QUESTIONS[i % len(QUESTIONS)] if kind == "vqa" else "why " * 60
        status = 200 if kind == "vqa" else 422
        path, (ctype, body) = "/v1/vqa", _multipart({"question": question}, {"image": photo})
    elif kind == "tags":
        path, (ctype, body) = "/v1/tags", _multipart({"top": "3"}, {"image": photo})
    elif kind in ("search", "no_key", "bad_k"):
        path, ctype = "/v1/search", "application/json"
        body = json.dumps({"text": QUERIES[i % len(QUERIES)], "k": 5 if kind != "bad_k" else 500}).encode()
        status = {"search": 200, "no_key": 401, "bad_k": 422}[kind]
    else:  # not_indexed
        method, path, status = "GET", "/v1/thumbnail?path=%2Fetc%2Fpasswd", 404
    auth = "" if kind == "no_key" else f"X-API-Key: {key}\r\n"
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}"
    if body:
        head += f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body, status


async def drive(port: int, requests: list, concurrency: int, on_progress=None, deadline_s: float = 3600.0,
                results: list = None) -> list:
    """Send ``requests`` ([(bytes, expected status, kind)]) over ``concurrency`` keep-alive connections, for at
    most ``deadline_s``; one (kind, status or exception name, expected, seconds, end time) per request, in
    completion order, appended to ``results`` (which others may watch grow)."""
    results = [] if results is None else results
    counter = iter(range(len(requests)))
    stop_at = time.time() + deadline_s

    async def worker():
        conn = [None, None]
        try:
            for i in counter:
                if time.time() > stop_at:
                    return
                data, expected, kind = requests[i]
                start = time.perf_counter()
                try:
                    status = await asyncio.wait_for(_exchange(conn, HOST, port, data), 120)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    status = type(exc).__name__
                    if conn[1] is not None:
                        conn[1].close()
                    conn[0] = conn[1] = None
                results.append((kind, status, expected, time.perf_counter() - start, time.time()))
                if on_progress is not None:
                    on_progress(len(results))
        finally:
            if conn[1] is not None:
                conn[1].close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def latency_summary(seconds) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "mean_ms": round(float(ms.mean()), 1)}


def soak(port: int, key: str, photos: list, total: int, concurrency: int, rss) -> dict:
    """``total`` mixed requests; ``rss()`` -> {process: MiB} sampled after the warm-up, every 2,000 requests and
    at the end."""
    requests = []
    for i in range(total):
        kind = KINDS[i % len(KINDS)]
        data, expected = soak_request(kind, i, photos, key, f"{HOST}:{port}")
        requests.append((data, expected, kind))
    warmup = total // 10
    samples = []

    def progress(done):
        if done == warmup or done % 2000 == 0:
            samples.append({"after_requests": done, "rss_mb": rss()})
            print(f"  soak: {done} / {total}, RSS {samples[-1]['rss_mb']}", flush=True)

    start = time.perf_counter()
    results = asyncio.run(drive(port, requests, concurrency, progress))
    wall = time.perf_counter() - start
    samples.append({"after_requests": len(results), "rss_mb": rss()})
    unexpected = [r for r in results if r[1] != r[2]]
    by_kind = {}
    for kind in dict.fromkeys(KINDS):
        rows = [r for r in results if r[0] == kind]
        by_kind[kind] = {"requests": len(rows), "status": rows[0][2], **latency_summary([r[3] for r in rows])}
    warm = next(s for s in samples if s["after_requests"] >= warmup)["rss_mb"]
    end = samples[-1]["rss_mb"]
    growth = {p: round(100.0 * (end[p] - warm[p]) / warm[p], 2) for p in warm if p in end}
    return {"requests": len(results), "concurrency": concurrency, "wall_s": round(wall, 1),
            "requests_per_s": round(len(results) / wall, 1), "unexpected": len(unexpected),
            "unexpected_examples": [{"kind": k, "got": s, "expected": e} for k, s, e, _, _ in unexpected[:10]],
            "latency_all": latency_summary([r[3] for r in results]),
            "latency_good": latency_summary([r[3] for r in results if r[2] == 200]), "by_kind": by_kind,
            "rss_mb_after_warmup": warm, "rss_mb_end": end, "rss_growth_after_warmup_pct": growth,
            "rss_growth_max_pct": max(growth.values()), "rss_samples": samples}


# -- the two engines ------------------------------------------------------------------------------------------
class LocalServer:
    """`python -m vlfuse serve` (all four models) as a subprocess on a free loopback port."""

    name = "local"

    def __init__(self, key_file: Path, index: str):
        self.port = free_port()
        cmd = [sys.executable, "-m", "vlfuse", "serve", "--host", HOST, "--port", str(self.port),
               "--api-keys-file", str(key_file), "--log-level", "warning", "--index", index,
               "--caption-model", MODELS["caption"], "--vqa-model", MODELS["vqa"],
               "--retrieval-model", MODELS["retrieval"], "--tagging-model", MODELS["tagging"]]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_ready(f"http://{HOST}:{self.port}", self.proc)

    def rss(self) -> dict:
        return {"server": round(current_rss_mb(self.proc.pid), 1)}

    def describe(self) -> dict:
        return {"engine": "local", "command": "vlfuse serve (one process, uvicorn; 2 inference workers)"}

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


class RayServer:
    """Ray Serve on a local Ray of ``cpus`` CPUs: ``replicas`` replicas of 0.5 CPU, each loading the four models."""

    name = "ray"

    def __init__(self, key: str, index: str, replicas: int, cpus: int):
        import ray

        from vlfuse.runtime import RuntimeOptions
        from vlfuse.serving import ray_app
        from vlfuse.serving.models import ModelChoice, ServiceModels
        from vlfuse.serving.settings import APIKeys, ServeSettings

        self.ray, self.ray_app = ray, ray_app
        os.environ["PYTHONPATH"] = str(REPO)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        load = functools.partial(ServiceModels.load, ModelChoice(MODELS["caption"]), ModelChoice(MODELS["vqa"]),
                                 ModelChoice(MODELS["retrieval"]), index=index, runtime=RuntimeOptions(),
                                 tagging=ModelChoice(MODELS["tagging"]))
        self.scaling = ray_app.Scaling(min_replicas=replicas, max_replicas=replicas, replica_cpus=0.5)
        self.port = free_port()
        ray_app.start(ray_app.deployment(load, ServeSettings(inference_workers=1), APIKeys([key]), self.scaling),
                      HOST, self.port)

    def pids(self) -> dict:
        """{replica actor name: pid} of the replicas that answer."""
        out = {}
        for actor in self.ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(f"SERVE_REPLICA::{self.ray_app.APP_NAME}#"):
                handle = self.ray.get_actor(actor["name"], namespace=actor["namespace"])
                try:
                    out[actor["name"]] = self.ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()),
                                                      timeout=10)
                except Exception:  # noqa: BLE001 — dead or starting: not counted
                    pass
        return out

    def rss(self) -> dict:
        out = {}
        for name, pid in sorted(self.pids().items()):
            try:
                out["replica " + name.rsplit("#", 1)[-1]] = round(current_rss_mb(pid), 1)
            except (OSError, AttributeError):
                pass
        return out

    def describe(self) -> dict:
        return {"engine": "ray", "ray": self.ray.__version__, "replicas": self.scaling.min_replicas,
                "replica_cpus": self.scaling.replica_cpus, "inference_workers_per_replica": 1}

    def kill_one_replica(self, key: str, photos: list, concurrency: int, seconds: float = 40.0) -> dict:
        """Good requests (caption, VQA, search) for ``seconds``; 5 s in, SIGKILL one replica. Bounded."""
        before = self.pids()
        kinds = ["caption", "vqa", "search", "tags"]
        requests = []
        for i in range(20000):
            data, expected = soak_request(kinds[i % len(kinds)], i, photos, key, f"{HOST}:{self.port}")
            requests.append((data, expected, kinds[i % len(kinds)]))
        events = {}

        async def run():
            loop = asyncio.get_running_loop()
            load = asyncio.ensure_future(drive(self.port, requests, concurrency, deadline_s=seconds))
            await asyncio.sleep(5.0)
            victim = sorted(before.values())[0]
            os.kill(victim, signal.SIGKILL)
            events.update(victim_pid=victim, killed_at=time.time())
            timeline = []
            while not load.done():
                await asyncio.sleep(1.0)
                counts = await loop.run_in_executor(None, self.ray_app.replica_count)
                pids = await loop.run_in_executor(None, self.pids)
                timeline.append({"t_s": round(time.time() - events["killed_at"], 1), "replicas": counts,
                                 "answering_pids": sorted(pids.values())})
                if "back_after_s" not in events and len(pids) == len(before) and victim not in pids.values() \
                        and counts.get("RUNNING") == len(before):
                    events["back_after_s"] = round(time.time() - events["killed_at"], 1)
            events["timeline"] = timeline
            return await load

        results = asyncio.run(run())
        killed_at = events["killed_at"]
        failed = [r for r in results if r[1] != r[2]]
        after = [r for r in results if r[4] > killed_at]
        return {"replicas": len(before), "concurrency": concurrency, "requests": len(results),
                "requests_after_kill": len(after), "answered_after_kill": sum(r[1] == 200 for r in after),
                "failed": len(failed), "failed_statuses": sorted({str(r[1]) for r in failed}),
                "killed_replica_back_after_s": events.get("back_after_s"),
                "requests_per_s": round(len(results) / seconds, 1),
                "latency_good": latency_summary([r[3] for r in results if r[1] == 200]),
                "replica_timeline": events["timeline"]}

    def close(self):
        from ray import serve

        serve.shutdown()
        self.ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="local,ray")
    p.add_argument("--soak-requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--schemathesis-examples", type=int, default=250, help="per API operation (and phase)")
    p.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (0.5 CPU each)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--index-images", type=int, default=200)
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_reliability.json"))
    args = p.parse_args(argv)

    names = (DATA / "val.txt").read_text().split()[: args.photos]
    photos = [(DATA / "images" / n).read_bytes() for n in names]
    key = secrets.token_urlsafe(24)
    report = {"what": __doc__.split("\n\n")[0], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "load_average_at_start": os.getloadavg()},
              "models": MODELS, "engines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "keys.txt"
        key_file.write_text(key + "\n")
        index = build_index(MODELS["retrieval"], args.index_images, Path(tmp))
        for engine in args.engines.split(","):
            print(f"== {engine}", flush=True)
            server = LocalServer(key_file, index) if engine == "local" else \
                RayServer(key, index, args.replicas, args.ray_cpus)
            out = {"server": server.describe()}
            try:
                out["rss_mb_after_start"] = server.rss()
                st = run_schemathesis(f"http://{HOST}:{server.port}", key, args.schemathesis_examples,
                                      Path(tmp) / f"schemathesis-{engine}", seed=24, timeout_s=1800)
                st.pop("summary")
                out["schemathesis"] = st
                print(f"  schemathesis: {st['requests']} requests, {st['server_errors']} 5xx, "
                      f"{st['non_json_4xx']} 4xx without the JSON body, {st['seconds']} s", flush=True)
                out["soak"] = soak(server.port, key, photos, args.soak_requests, args.concurrency, server.rss)
                s = out["soak"]
                print(f"  soak: {s['requests']} requests, {s['unexpected']} unexpected, {s['requests_per_s']} req/s, "
                      f"p50 {s['latency_all']['p50_ms']} ms, p99 {s['latency_all']['p99_ms']} ms, RSS growth "
                      f"{s['rss_growth_after_warmup_pct']} %", flush=True)
                if engine == "ray":
                    out["kill_one_replica"] = server.kill_one_replica(key, photos, args.concurrency)
                    k = out["kill_one_replica"]
                    print(f"  kill -9: {k['failed']} of {k['requests']} requests failed, replica back after "
                          f"{k['killed_replica_back_after_s']} s", flush=True)
                else:
                    out["kill_one_replica"] = "not applicable: one process, no workers (docs/serving.md)"
            finally:
                server.close()
            report["engines"][engine] = out
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["targets"] = {
        engine: {"schemathesis_ge_1000_requests": e["schemathesis"]["requests"] >= 1000,
                 "schemathesis_no_5xx": e["schemathesis"]["server_errors"] == 0,
                 "schemathesis_4xx_all_json": e["schemathesis"]["non_json_4xx"] == 0,
                 "soak_no_unexpected": e["soak"]["unexpected"] == 0,
                 "soak_rss_growth_lt_5_pct": e["soak"]["rss_growth_max_pct"] < 5.0}
        for engine, e in report["engines"].items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"]), "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
