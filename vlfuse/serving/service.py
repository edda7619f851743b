"""What the routes share while the app runs: the loaded models, the settings, the metrics, one batcher per task
and the small pool of threads that decodes uploads."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import AsyncIterator, Awaitable, Dict, Optional, TypeVar

import anyio

from .batching import Batcher
from .errors import ServiceError
from .metrics import ServiceMetrics
from .models import ServiceModels
from .settings import ServeSettings

T = TypeVar("T")


class Service:
    """The models behind the routes, and the machinery that runs their work: ``running()`` starts the batchers
    (the app's lifespan), ``batcher(task)`` hands a route its task's batcher (503 where that model is not
    loaded), ``offload`` runs CPU work off the event loop and ``within_timeout`` bounds a request."""

    def __init__(self, models: ServiceModels, settings: ServeSettings, metrics: ServiceMetrics):
        self.models, self.settings, self.metrics = models, settings, metrics
        self.ready = False
        self._batchers: Dict[str, Batcher] = {}
        self._limiter: Optional[anyio.CapacityLimiter] = None
        self._video_limiter: Optional[anyio.CapacityLimiter] = None
        for task, ok in models.loaded().items():
            metrics.model_loaded.labels(model=task).set(1.0 if ok else 0.0)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Batchers and upload workers run inside this block; on leaving it, the batches queued are finished."""
        # inference workers: each runs one batch at a time with torch's own threads (``--threads``); several
        # workers keep several cores busy with whole batches, since small decoding steps hardly parallelise
        settings, models = self.settings, self.models
        workers = settings.inference_workers
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlfuse-infer")
        wait_s = settings.batch_wait_ms / 1000.0
        batch_functions = {"caption": models.caption_batch if models.captioner is not None else None,
                           "vqa": models.vqa_batch if models.vqa is not None else None,
                           "search": models.search_batch if models.loaded()["retrieval"] else None,
                           "tags": models.tag_batch if models.tagger is not None else None}
        self._batchers = {task: Batcher(task, fn, executor, settings.max_batch_size, wait_s, self.metrics, workers)
                          for task, fn in batch_functions.items() if fn is not None}
        for b in self._batchers.values():
            b.start()
        self._limiter = anyio.CapacityLimiter(settings.image_workers)
        self._video_limiter = anyio.CapacityLimiter(1)
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            for b in self._batchers.values():
                await b.stop()
            executor.shutdown(wait=True)

    def batcher(self, task: str) -> Batcher:
        """The batcher of ``task`` ("caption", "vqa", "search" or "tags"), or ServiceError 503 saying why there is
        none."""
        b = self._batchers.get(task)
        if b is None:
            model_task = {"search": "retrieval", "tags": "tagging"}.get(task, task)
            reason = self.models.describe()[model_task].get("reason", "not loaded")
            raise ServiceError(503, "model_not_loaded", f"the {model_task} model is not loaded: {reason}")
        return b

    async def offload(self, fn, *args):
        """Run CPU work (image decoding, preprocessing, thumbnails) in a worker thread; a few at a time, so
        bursts of uploads neither oversubscribe the cores nor multiply memory."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def offload_video(self, fn, *args):
        """Run a video's work (decoding, shots, captions: seconds of CPU) in a worker thread, one video at a time,
        so that a few uploads cannot starve the photo endpoints or multiply memory."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._video_limiter)

    async def within_timeout(self, work: Awaitable[T], seconds: Optional[float] = None) -> T:
        """``work``'s result, or ServiceError 504 once the request has taken ``seconds`` (default
        ``request_timeout_s``)."""
        seconds = seconds or self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(work, seconds)
        except asyncio.TimeoutError:
            raise ServiceError(504, "timeout", f"request took longer than {seconds:g} s and was abandoned") from None
