"""Elastic serving on Ray Serve: ``create_app``'s app — the same routes, auth, limits, ``/metrics`` and web page as
``vlfuse serve`` — in each of several replicas, which Ray Serve adds and removes between ``min_replicas`` and
``max_replicas`` to keep about ``target_ongoing_requests`` requests in flight per replica.

- ``ServiceReplica`` is one replica: it loads the models once (``load_models()``, the same call the single-process
  server makes) and hands Ray Serve the app over them (``serve.ingress``, built in the replica: the app holds
  threads and the loaded models, which are not shipped between processes). Requests are batched inside the
  replica by the service's own batchers (``batching.py``), exactly as in one process: Ray Serve's proxy sends a
  replica up to ``max_ongoing_requests`` at once, and those it holds together share batches.
- ``deployment()`` builds the Ray Serve application; ``serve_forever()`` starts Ray (or joins a cluster), runs it
  on ``host:port`` and stops it on SIGTERM/SIGINT.

Only ``vlfuse serve --engine ray`` (and the benchmarks and tests) import this module; it imports ray.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Dict, Optional

from ray import serve

from ..errors import ConfigError
from .app import create_app
from .memory import MALLOC_ARENAS, MALLOC_MMAP_THRESHOLD, release_free_heap
from .models import ServiceModels
from .settings import APIKeys, ServeSettings

log = logging.getLogger(__name__)

APP_NAME = "vlfuse"  # the Ray Serve application (and its one deployment)


@dataclasses.dataclass
class Scaling:
    """How many replicas, and how each is sized. Ray Serve's autoscaler aims at ``target_ongoing_requests``
    requests (in flight and queued) per replica; it adds replicas after the load has stayed above that for
    ``upscale_delay_s`` and removes them after it has stayed below for ``downscale_delay_s``."""

    min_replicas: int = 1
    max_replicas: int = 8
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    # a replica holds this many requests at once (more wait in Ray Serve's queue): its batches can grow to it
    max_ongoing_requests: int = 16
    replica_cpus: float = 1.0      # Ray CPUs reserved per replica (fractional: several replicas per core)
    threads: int = 1               # torch threads in a replica

    def __post_init__(self):
        if self.min_replicas < 0:
            raise ConfigError(f"min_replicas must be at least 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(f"max_replicas must be at least 1 and at least min_replicas ({self.min_replicas}), "
                              f"got {self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"target_ongoing_requests must be positive, got {self.target_ongoing_requests}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ConfigError("upscale and downscale delays must be >= 0 seconds")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests must be at least 1, got {self.max_ongoing_requests}")
        if self.replica_cpus <= 0:
            raise ConfigError(f"replica_cpus must be positive, got {self.replica_cpus}")
        if self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")

    def autoscaling_config(self) -> Dict[str, float]:
        """Ray Serve's ``autoscaling_config`` of the deployment."""
        return {"min_replicas": self.min_replicas, "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas, "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}


class ServiceReplica:
    """One replica: the models, loaded once when Ray Serve starts it, and ``create_app``'s app over them."""

    def __init__(self, load_models: Callable[[], ServiceModels], settings: ServeSettings, keys: APIKeys,
                 threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.models = load_models()
        release_free_heap()  # as `vlfuse serve` does after loading
        if not any(self.models.loaded().values()):
            reasons = "; ".join(f"{t}: {why}" for t, why in self.models.problems.items())
            raise ConfigError(f"no model could be loaded ({reasons})")
        self.settings, self.keys = settings, keys
        self.service = None  # (``app``, the name one would use, is Ray Serve's: the ASGI app it wraps)

    def __serve_build_asgi_app__(self):
        """Called by Ray Serve once the replica is constructed; it then runs the app's lifespan (the batchers)."""
        app = create_app(self.models, self.settings, self.keys)
        self.service = app.state.service
        return app

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose batchers stopped is replaced."""
        if self.service is not None and not self.service.ready:
            raise RuntimeError("the service's batchers are not running")


def replica_env() -> Dict[str, str]:
    """Environment of the replicas: they import vlfuse from the tree this process imported it from (a source
    checkout or site-packages; on other nodes of a cluster, vlfuse must be installed at the same version), and
    glibc's malloc is tuned from the process' start as ``memory.tune_malloc`` tunes `vlfuse serve`'s (a replica's
    process already runs Ray's threads when its code starts)."""
    import vlfuse

    root = str(Path(vlfuse.__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
            "MALLOC_ARENA_MAX": str(MALLOC_ARENAS), "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD)}


def deployment(load_models: Callable[[], ServiceModels], settings: ServeSettings, keys: APIKeys,
               scaling: Scaling = Scaling()):
    """The Ray Serve application: the ``vlfuse`` deployment of ``ServiceReplica`` with ``scaling``'s autoscaling.
    ``load_models`` is called once in each replica (it is pickled: a ``functools.partial`` of
    ``ServiceModels.load``, say); only the keys' SHA-256 digests travel to the replicas."""
    replica = serve.ingress()(ServiceReplica)  # the app is built in the replica (__serve_build_asgi_app__)
    return serve.deployment(
        replica, name=APP_NAME, autoscaling_config=scaling.autoscaling_config(),
        max_ongoing_requests=scaling.max_ongoing_requests,
        ray_actor_options={"num_cpus": scaling.replica_cpus, "runtime_env": {"env_vars": replica_env()}},
        # the requests in flight finish before a replica that is scaled down stops
        graceful_shutdown_timeout_s=settings.request_timeout_s + 5,
    ).bind(load_models, settings, keys, scaling.threads)


def start(app, host: str, port: int) -> None:
    """Run the application ``app`` (``deployment()``) under Ray Serve's HTTP proxy on ``host:port``; returns once
    its first replicas are ready. Ray must be initialised (``ray.init``)."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")


def replica_count() -> Dict[str, int]:
    """The replicas of the application by state (``RUNNING``, ``STARTING``, ``STOPPING``, ...)."""
    status = serve.status().applications.get(APP_NAME)
    if status is None:
        return {}
    return {str(getattr(state, "value", state)): n
            for dep in status.deployments.values() for state, n in dep.replica_states.items()}


def serve_forever(app, host: str, port: int, address: Optional[str] = None, num_cpus: Optional[int] = None,
                  on_ready: Callable[[], None] = lambda: None) -> None:
    """Start Ray (or join the cluster at ``address``), run ``app`` on ``host:port`` and block until SIGTERM or
    SIGINT; then delete the application (and stop the Ray this call started)."""
    from ..scale.cluster import init_ray

    joined = address is not None
    ray = init_ray(address, num_cpus, configure_logging=False)  # the service keeps its own logging
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        start(app, host, port)
        on_ready()
        while not stop.wait(1.0):
            pass
    finally:
        log.info("stopping: deleting the %s application", APP_NAME)
        # bounded: where the signal reached Ray's own processes too (a whole process group stopped), Serve can no
        # longer answer, and waiting for it would hang the exit
        _within(serve.delete if joined else serve.shutdown, 30.0, *((APP_NAME,) if joined else ()))
        ray.shutdown()


def _within(fn, seconds: float, *args) -> bool:
    """Call ``fn(*args)`` in a thread and wait at most ``seconds``; True if it returned."""
    worker = threading.Thread(target=fn, args=args, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        log.warning("%s did not return within %g s; going on", getattr(fn, "__name__", fn), seconds)
    return not worker.is_alive()
