"""``vlfuse serve``: the HTTP service and web page (FastAPI + uvicorn) over the loaded models."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="run the HTTP API and web page",
                       description="Serve captioning, VQA, tagging and image search over HTTP. Models load once "
                                   "at start; any of them may be missing (its endpoints answer 503). Give a model "
                                   "as 'none' to leave it out.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                                                       "address needs API keys)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-keys-file", metavar="FILE",
                   help="file with one API key per line (also $VLFUSE_API_KEYS_FILE; $VLFUSE_API_KEYS adds "
                        "comma-separated keys)")
    p.add_argument("--index", metavar="FILE", help="image index to search (built with `vlfuse index`)")
    p.add_argument("--caption-model", metavar="M", help="caption model name or directory (default flickr8k-caption "
                                                        "if installed)")
    p.add_argument("--caption-lang", metavar="LANGS", default="",
                   help="more caption languages, comma-separated (en,zh): each one the caption model does not write "
                        "is captioned by its built-in model (zh: flickr8k-caption-zh); requests pick one with 'lang'")
    p.add_argument("--vqa-model", metavar="M", help="VQA model name or directory (default flickr8k-vqa if installed)")
    p.add_argument("--retrieval-model", metavar="M", help="retrieval model name or directory (default "
                                                          "flickr8k-retrieval if installed)")
    p.add_argument("--tagging-model", metavar="BACKBONE",
                   help="backbone whose ImageNet classifier tags photos for /v1/tags (default efficientnet-lite0; "
                        "also efficientnet-lite1, efficientnet-lite2)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    p.add_argument("--no-onnx", action="store_true",
                   help="encode images with PyTorch and decode with TorchScript (on a CPU the default is ONNX "
                        "Runtime for every model where it is installed: faster, ~30 MB more memory)")
    p.add_argument("--caption-rerank", action="store_true",
                   help="caption with the model's consensus reranking where it is the model's default "
                        "(flickr8k-caption: better captions, ~4x the time per image, ~130 MB more memory); "
                        "without it the service decodes greedily")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10 MB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest decoded image, width*height")
    p.add_argument("--max-video-mb", type=float, default=100.0,
                   help="largest accepted video for /v1/subtitle (default 100 MB)")
    p.add_argument("--max-video-seconds", type=float, default=300.0,
                   help="longest accepted video for /v1/subtitle (default 300 s; it is subtitled within "
                        "--video-timeout)")
    p.add_argument("--video-timeout", type=float, default=300.0,
                   help="seconds before a /v1/subtitle request is abandoned (504; default 300)")
    p.add_argument("--max-question-chars", type=int, default=200)
    p.add_argument("--max-k", type=int, default=50, help="most search hits per request")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds before a request is abandoned (504)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch (default 5 ms)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for inference (default 1: HTTP handling, image decoding and inference share "
                        "the cores, and two torch threads then stall on each other; on the 2-core reference machine "
                        "a caption took 53 ms at concurrency 1 with 1 thread, 119 ms with 2)")
    p.add_argument("--workers", type=int, default=None,
                   help="inference workers: batches that run at once, each with --threads torch threads (default: "
                        "the CPU count divided by --threads, at most 4)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ray = p.add_argument_group("elastic serving on Ray Serve (--engine ray; pip install 'vlfuse[ray]')")
    ray.add_argument("--engine", default="local", choices=["local", "ray"],
                     help="local (default): one process; ray: replicas of the same app under Ray Serve, added and "
                          "removed with the load")
    ray.add_argument("--address", metavar="HOST:PORT",
                     help="the Ray cluster to join (`ray start --head` prints it); default: start Ray on this machine")
    ray.add_argument("--num-cpus", type=int, default=None,
                     help="CPUs of the Ray started on this machine without --address (default: all)")
    ray.add_argument("--min-replicas", type=int, default=1, help="replicas kept when idle (default 1)")
    ray.add_argument("--max-replicas", type=int, default=8, help="most replicas under load (default 8)")
    ray.add_argument("--target-ongoing-requests", type=float, default=4.0,
                     help="requests in flight per replica the autoscaler aims at (default 4)")
    ray.add_argument("--max-ongoing-requests", type=int, default=16,
                     help="requests a replica holds at once, the largest batch it can gather (default 16)")
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="Ray CPUs reserved per replica (default 1; 0.5 fits two replicas on a core)")
    ray.add_argument("--upscale-delay", type=float, default=5.0,
                     help="seconds the load must stay above the target before replicas are added (default 5)")
    ray.add_argument("--downscale-delay", type=float, default=60.0,
                     help="seconds the load must stay below the target before replicas are removed (default 60)")
    return p


def run(args) -> int:
    try:
        from ..serving.app import create_app  # noqa: F401  (fastapi is needed by both engines)
    except ImportError as exc:  # fastapi/uvicorn are the optional "serve" extra
        print(f"vlfuse serve: error: {exc.name} is not installed; pip install 'vlfuse[serve]'", file=sys.stderr)
        return 2
    from ..serving.settings import check_bind_allowed, load_api_keys

    if args.threads < 1:
        print(f"vlfuse serve: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    cpus = args.replica_cpus if args.engine == "ray" else (os.cpu_count() or 1)
    workers = args.workers if args.workers is not None else max(1, min(4, int(cpus // args.threads)))
    if workers < 1:
        print(f"vlfuse serve: error: --workers must be at least 1, got {workers}", file=sys.stderr)
        return 2
    keys = load_api_keys(args.api_keys_file)
    check_bind_allowed(args.host, keys)  # before loading anything: fail fast
    settings = build_settings(args, workers)
    logging.getLogger("vlfuse").setLevel(args.log_level.upper())
    if args.engine == "ray":
        return run_on_ray(args, settings, keys)
    return run_local(args, settings, keys)


def build_settings(args, workers: int):
    from ..serving.settings import ServeSettings

    return ServeSettings(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                         max_question_chars=args.max_question_chars, max_k=args.max_k,
                         request_timeout_s=args.request_timeout, batch_wait_ms=args.batch_wait_ms,
                         max_batch_size=args.max_batch_size, inference_workers=workers,
                         max_video_bytes=int(args.max_video_mb * 1024 * 1024),
                         max_video_seconds=args.max_video_seconds, video_timeout_s=args.video_timeout)


def model_loader(args, settings):
    """``ServiceModels.load`` with the models the arguments name, as a call to make (here, or in each replica)."""
    import functools

    from ..data.languages import parse_languages
    from ..serving.models import ModelChoice, ServiceModels
    from .environment import runtime_options

    return functools.partial(
        ServiceModels.load, ModelChoice(args.caption_model), ModelChoice(args.vqa_model),
        ModelChoice(args.retrieval_model), index=args.index, device=args.device,
        thumbnail_size=settings.thumbnail_size, runtime=runtime_options(no_onnx=args.no_onnx),
        caption_rerank=args.caption_rerank, tagging=ModelChoice(args.tagging_model),
        caption_langs=parse_languages(args.caption_lang) if args.caption_lang else ())


def run_local(args, settings, keys) -> int:
    from ..serving.app import create_app
    from ..serving.memory import release_free_heap, tune_malloc
    from ..serving.server import run_server

    tune_malloc()
    import torch

    torch.set_num_threads(args.threads)
    models = model_loader(args, settings)()
    release_free_heap()
    loaded = [task for task, ok in models.loaded().items() if ok]
    if not loaded:
        reasons = "; ".join(f"{t}: {why}" for t, why in models.problems.items())
        print(f"vlfuse serve: error: no model could be loaded ({reasons})", file=sys.stderr)
        return 2
    app = create_app(models, settings, keys)
    auth = f"{len(keys)} API key(s)" if keys.enabled else "no API keys (loopback only)"
    print(f"vlfuse serve: {', '.join(loaded)} loaded; {auth}; {settings.inference_workers} inference worker(s) x "
          f"{args.threads} thread(s); http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    started = run_server(app, args.host, args.port, grace_s=settings.request_timeout_s + 5,
                         log_level=args.log_level)
    if not started:
        print(f"vlfuse serve: error: could not listen on {args.host}:{args.port} (is the port in use?)",
              file=sys.stderr)
        return 2
    return 0


def run_on_ray(args, settings, keys) -> int:
    try:
        from ..serving import ray_app
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "ray":
            raise
        print("vlfuse serve: error: --engine ray needs Ray Serve; pip install 'vlfuse[ray]'", file=sys.stderr)
        return 2
    scaling = ray_app.Scaling(min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                              target_ongoing_requests=args.target_ongoing_requests,
                              upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay,
                              max_ongoing_requests=args.max_ongoing_requests, replica_cpus=args.replica_cpus,
                              threads=args.threads)
    app = ray_app.deployment(model_loader(args, settings), settings, keys, scaling)
    auth = f"{len(keys)} API key(s)" if keys.enabled else "no API keys (loopback only)"

    def ready():
        print(f"vlfuse serve: Ray Serve, {scaling.min_replicas}-{scaling.max_replicas} replica(s) of "
              f"{scaling.replica_cpus:g} CPU ({settings.inference_workers} inference worker(s) x {args.threads} "
              f"thread(s) each); {auth}; http://{args.host}:{args.port}/", file=sys.stderr, flush=True)

    try:
        ray_app.serve_forever(app, args.host, args.port, address=args.address, num_cpus=args.num_cpus,
                              on_ready=ready)
    except RuntimeError as exc:  # Ray Serve could not deploy the app (a replica failed to load the models)
        print(f"vlfuse serve: error: {exc}", file=sys.stderr)
        return 2
    return 0
