"""Ray, where it is installed: ``require_ray`` (or a ConfigError saying how to install it), ``init_ray`` (join a
cluster or start one's own) and ``ray_session`` (connected for the length of a job)."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

from ..errors import ConfigError

INSTALL_HINT = "pip install 'vlfuse[ray]'"


def require_ray():
    """The ``ray`` module with Ray Data, or ConfigError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data comes with the ray[data] extra)
    except ImportError as exc:
        raise ConfigError(f"the ray engine needs Ray with Ray Data, which is not installed ({exc}); "
                          f"install it with: {INSTALL_HINT}") from None
    return ray


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, **options):
    """Connect this process to the Ray cluster at ``address`` (``HOST:PORT`` of a ``ray start --head``), or start
    a Ray of its own with ``num_cpus`` CPUs (default all) — its own even where a ``ray start`` on this machine left
    its address behind, which a plain ``ray.init()`` would join (and refuse ``num_cpus`` for). ``options`` go to
    ``ray.init``. The one place batch jobs and Ray serving start Ray."""
    ray = require_ray()
    options = dict(include_dashboard=False, **options)
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(address="local", num_cpus=num_cpus, **options)
    return ray


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None) -> Iterator[object]:
    """Ray, connected for the body of a ``with`` (``init_ray``) and shut down after it. A process already
    connected (``ray.init`` called by the caller) keeps its connection and its cluster."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    init_ray(address, num_cpus, logging_level=logging.WARNING, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()
