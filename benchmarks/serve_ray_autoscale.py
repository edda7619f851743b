"""Ray Serve autoscaling, measured: `vlfuse serve --engine ray`'s deployment (ray_app.deployment) on a local Ray of
2 CPUs, 1 to --max-replicas replicas of --replica-cpus CPU each, captioning real Flickr8k val photos with the shipped
caption model. Idle, then --load-s seconds of --concurrency closed-loop clients over loopback, then idle again
until the replicas are back to the minimum (at most --idle-s seconds). The replica count (serve.status()) is
polled every second; requests/s and latency are reported per 5-second window and per phase.

    python benchmarks/serve_ray_autoscale.py   -> benchmarks/results/serve_ray_autoscale.json
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import secrets
import sys
import threading
import time
from pathlib import Path

from serve_load import DATA, HOST, free_port
from serve_reliability import drive, latency_summary, soak_request

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caption-model", default="flickr8k-caption")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--target-ongoing-requests", type=float, default=2.0)
    p.add_argument("--max-ongoing-requests", type=int, default=8)
    p.add_argument("--upscale-delay", type=float, default=2.0)
    p.add_argument("--downscale-delay", type=float, default=15.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warm-s", type=float, default=10.0, help="idle seconds before the load")
    p.add_argument("--load-s", type=float, default=90.0)
    p.add_argument("--max-requests", type=int, default=20000, help="at most this many requests in the load")
    p.add_argument("--idle-s", type=float, default=150.0, help="at most this long idle after the load")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_ray_autoscale.json"))
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from vlfuse.runtime import RuntimeOptions
    from vlfuse.serving import ray_app
    from vlfuse.serving.models import ModelChoice, ServiceModels
    from vlfuse.serving.settings import APIKeys, ServeSettings

    names = (DATA / "val.txt").read_text().split()[: args.photos]
    photos = [(DATA / "images" / n).read_bytes() for n in names]
    key = secrets.token_urlsafe(24)
    none = ModelChoice("none")
    load = functools.partial(ServiceModels.load, ModelChoice(args.caption_model), none, none, runtime=RuntimeOptions(),
                             tagging=none)
    scaling = ray_app.Scaling(min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                              target_ongoing_requests=args.target_ongoing_requests,
                              upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay,
                              max_ongoing_requests=args.max_ongoing_requests, replica_cpus=args.replica_cpus)
    os.environ["PYTHONPATH"] = str(REPO)
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    timeline, phase, stop = [], {"name": "starting"}, threading.Event()
    done = []  # the load's results, as they complete
    try:
        port = free_port()
        started = time.time()
        ray_app.start(ray_app.deployment(load, ServeSettings(inference_workers=1), APIKeys([key]), scaling), HOST,
                      port)
        print(f"up in {time.time() - started:.1f} s: {ray_app.replica_count()}", flush=True)
        requests = []
        for i in range(args.max_requests):  # more than --load-s can send: the deadline ends the load
            data, expected = soak_request("caption", i, photos, key, f"{HOST}:{port}")
            requests.append((data, expected, "caption"))
        t0 = time.time()

        def poll():
            while not stop.is_set():
                counts = ray_app.replica_count()
                timeline.append({"t_s": round(time.time() - t0, 1), "phase": phase["name"], "replicas": counts,
                                 "running": counts.get("RUNNING", 0), "requests_done": len(done)})
                stop.wait(1.0)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        phase["name"] = "idle before"
        time.sleep(args.warm_s)
        phase["name"] = "load"
        load_start = time.time()
        results = asyncio.run(drive(port, requests, args.concurrency, deadline_s=args.load_s, results=done))
        load_end = time.time()
        phase["name"] = "idle after"
        deadline = time.time() + args.idle_s
        while time.time() < deadline:
            time.sleep(1.0)
            if timeline and timeline[-1]["phase"] == "idle after" and \
                    timeline[-1]["replicas"] == {"RUNNING": args.min_replicas}:
                break
        time.sleep(2.0)
        stop.set()
        poller.join(5)
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()

    windows = []
    for w in range(int((load_end - load_start) // 5) + 1):
        lo, hi = load_start + 5 * w, min(load_start + 5 * (w + 1), load_end)
        rows = [r for r in results if lo <= r[4] < hi]
        if not rows or hi - lo < 1:
            continue
        running = [e["running"] for e in timeline if lo - t0 <= e["t_s"] < hi - t0]
        windows.append({"t_s": round(lo - t0, 1), "requests": len(rows),
                        "requests_per_s": round(len(rows) / (hi - lo), 1),
                        "replicas_running": max(running) if running else None,
                        **latency_summary([r[3] for r in rows])})
    load_timeline = [e for e in timeline if e["phase"] == "load"]
    after = [e for e in timeline if e["phase"] == "idle after"]
    peak = max(e["running"] for e in timeline)
    report = {
        "what": __doc__.split("\n\n")[0],
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "machine": {"cpus": os.cpu_count(), "ray_cpus": args.ray_cpus, "platform": platform.platform(),
                    "python": platform.python_version(), "ray": ray.__version__,
                    "load_average_at_end": os.getloadavg()},
        "model": args.caption_model,
        "scaling": {**scaling.autoscaling_config(), "look_back_period_s": "30 (Ray Serve's default)"},
        "replica": {"cpus": args.replica_cpus, "max_ongoing_requests": args.max_ongoing_requests,
                    "inference_workers": 1, "torch_threads": 1},
        "load": {"concurrency": args.concurrency, "seconds": round(load_end - load_start, 1),
                 "requests": len(results), "failed": sum(r[1] != r[2] for r in results),
                 "requests_per_s": round(len(results) / (load_end - load_start), 1),
                 **latency_summary([r[3] for r in results])},
        "replicas": {"at_start": timeline[0]["running"], "peak": peak,
                     # Ray Serve decided to add replicas (they were starting: loading the models) ...
                     "replicas_added_after_s": next((round(e["t_s"] - load_timeline[0]["t_s"], 1)
                                                     for e in load_timeline
                                                     if sum(e["replicas"].values()) > args.min_replicas), None),
                     # ... and the first of them answered
                     "more_replicas_running_after_s": next((round(e["t_s"] - load_timeline[0]["t_s"], 1)
                                                    for e in load_timeline if e["running"] > args.min_replicas),
                                                   None),
                     "peak_reached_after_s": next((round(e["t_s"] - load_timeline[0]["t_s"], 1)
                                                   for e in load_timeline if e["running"] == peak), None),
                     "back_to_min_after_idle_s": next((round(e["t_s"] - after[0]["t_s"], 1) for e in after
                                                      if e["replicas"] == {"RUNNING": args.min_replicas}), None),
                     "at_end": timeline[-1]["replicas"]},
        "windows_5s": windows,
        "timeline": timeline,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("load", "replicas")}, indent=1), "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
