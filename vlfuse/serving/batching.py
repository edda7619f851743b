"""Dynamic batching: concurrent requests for one model are gathered for a short window and run as one batch.

Requests carry a ``key`` (e.g. the decoding settings): only requests with equal keys share a batch. Batches run
in an executor (off the event loop), at most ``max_in_flight`` at once (one per inference worker); while they run,
new requests queue up, so batches grow with load. What one gathering collects is split evenly among the workers
that are idle at that moment.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

from ..errors import VlfuseError
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

BatchFn = Callable[[Hashable, Sequence[Any]], List[Any]]  # (key, items) -> one result per item


class Batcher:
    """Gather ``submit``-ted items into batches of at most ``max_batch_size`` and run ``fn`` on each."""

    def __init__(self, name: str, fn: BatchFn, executor: concurrent.futures.Executor, max_batch_size: int,
                 wait_s: float, metrics: Optional[ServiceMetrics] = None, max_in_flight: int = 1):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.name, self.fn, self.executor = name, fn, executor
        self.max_batch_size, self.wait_s, self.metrics = max_batch_size, wait_s, metrics
        self.max_in_flight = max_in_flight
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self._slots: Optional[asyncio.Semaphore] = None
        self._running: set = set()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        if self._worker is None:
            return
        await self._queue.join()
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        self._worker = None

    async def submit(self, item: Any, key: Hashable = None) -> Any:
        """Queue one item and wait for its result (or the exception its batch raised)."""
        if self._worker is None:
            raise RuntimeError(f"batcher {self.name} is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((key, item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a free inference slot first: while all are busy, requests pile up
            try:
                first = await self._queue.get()
            except BaseException:
                self._slots.release()
                raise
            pending: List[Tuple[Hashable, Any, asyncio.Future]] = [first]
            deadline = loop.time() + self.wait_s
            # gather company until the window closes or a full batch of the first request's kind is ready
            while sum(1 for p in pending if p[0] == first[0]) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0 and self._queue.empty():
                    break
                try:
                    pending.append(await asyncio.wait_for(self._queue.get(), max(timeout, 0)) if timeout > 0
                                   else self._queue.get_nowait())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            # Idle workers share what was gathered: a burst of 32 requests runs as two batches of 16 on two
            # workers, not as one batch of 32 on one while the other waits (its clients all wait on that batch).
            parts = 1
            while parts < len(pending) and not self._slots.locked():
                await self._slots.acquire()
                parts += 1
            n = len(pending)
            for i in range(parts):
                task = loop.create_task(self._run_pending(pending[i * n // parts:(i + 1) * n // parts]),
                                        name=f"batch-{self.name}")
                self._running.add(task)  # keep a reference until it is done
                task.add_done_callback(self._running.discard)

    async def _run_pending(self, pending: List[Tuple[Hashable, Any, asyncio.Future]]) -> None:
        try:
            for key, group in _group(pending, self.max_batch_size):
                await self._run_batch(key, group)
        finally:
            self._slots.release()
            for _ in pending:
                self._queue.task_done()

    async def _run_batch(self, key: Hashable, group: List[Tuple[Any, asyncio.Future]]) -> None:
        live = [(item, fut) for item, fut in group if not fut.done()]  # timed-out requests are dropped
        if not live:
            return
        items = [item for item, _ in live]
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self._call, key, items)
        except Exception as exc:  # noqa: BLE001 — handed to every waiting request
            results = [exc] * len(items)
        if self.metrics is not None:
            self.metrics.batch_size.labels(model=self.name).observe(len(items))
            self.metrics.batch_latency.labels(model=self.name).observe(time.perf_counter() - start)
        for (_, fut), res in zip(live, results):
            if fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def _call(self, key: Hashable, items: List[Any]) -> List[Any]:
        """Run one batch; if it fails on bad input, run the items one by one so only the bad one fails."""
        try:
            results = self.fn(key, items)
        except VlfuseError as exc:
            if len(items) == 1:
                return [exc]
            return [r for item in items for r in self._call(key, [item])]
        if len(results) != len(items):
            raise RuntimeError(f"batch function of {self.name} returned {len(results)} results for {len(items)} items")
        return list(results)


def _group(pending: List[Tuple[Hashable, Any, asyncio.Future]], max_size: int):
    """(key, [(item, future), ...]) chunks of at most ``max_size``, keys in order of first arrival."""
    groups: Dict[Hashable, List[Tuple[Any, asyncio.Future]]] = {}
    for key, item, fut in pending:
        groups.setdefault(key, []).append((item, fut))
    for key, members in groups.items():
        for i in range(0, len(members), max_size):
            yield key, members[i:i + max_size]
