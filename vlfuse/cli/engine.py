"""``--engine local|ray`` and the Ray options the batch commands (caption, index build) share."""
from __future__ import annotations

import argparse

from ..errors import InputError


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: workers on a Ray cluster, each loading the model once "
                        "(needs pip install 'vlfuse[ray]'; see docs/scaling.md)")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="with --engine ray: the cluster to run on (what `ray start --head` printed; default: start "
                        "a local Ray for the job). Photos and model directories must be at the same paths there")
    p.add_argument("--actors", type=int, default=1, help="with --engine ray: workers (Ray actors), default 1")
    p.add_argument("--threads", type=int, default=1,
                   help="with --engine ray: inference threads per worker, and CPUs each asks Ray for (default 1); "
                        "the output equals the local command's run with VLFUSE_THREADS set to it")


def ray_job(args):
    """The ``RayJob`` the command line asks for."""
    from ..scale.batch import RayJob

    for name in ("actors", "threads", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return RayJob(address=args.address, actors=args.actors, threads=args.threads, batch_size=args.batch_size)
