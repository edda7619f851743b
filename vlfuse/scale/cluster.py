"""Ray, where it is installed: ``require_ray`` (or a ConfigError saying how to install it) and ``ray_session``
(connected to a cluster for the length of a job)."""
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


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None) -> Iterator[object]:
    """Ray, connected for the body of a ``with``: to the cluster at ``address`` (``HOST:PORT`` of a
    ``ray start --head``), else a local one started for the job (``num_cpus`` CPUs, default all) and stopped after
    it. A process already connected (``ray.init`` called by the caller) keeps its connection and its cluster."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=num_cpus, **options)
    try:
        yield ray
    finally:
        ray.shutdown()
