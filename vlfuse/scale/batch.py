"""Caption or embed files on a Ray cluster with Ray Data, rows handed back to the driver in input order.

The paths are cut into chunks exactly where the single-process commands cut them (``batch_size`` files each, from
the first file), one Ray Data row per chunk. ``map_batches`` runs a callable class on a fixed pool of actors
(``ActorPoolStrategy(size=actors)``): each actor loads its pipeline once, sets the same thread count for every
run (``threads``) and turns a chunk into one row per file through the pipeline's own ``caption_files`` /
``embed_files`` — so a file gets what the local command gives it with the same thread count, bit for bit
(docs/scaling.md). A bad file is a row with its error, as locally; it never fails the job.

Ray Data's actors are restarted when their process dies (``max_restarts=-1``) and the chunks they held are
retried on the new one (``max_task_retries=-1``); a retried chunk's rows come back once, and the dataset is read
with ``preserve_order`` so the caller sees each file exactly once, in order, and may write (and flush) as the rows
arrive. Ray's own progress bars are off; the caller shows its own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..runtime import RuntimeOptions

# Ray Data rows of a dataset made with from_items live in blocks; one block per chunk lets every chunk stream back
# on its own, up to this many blocks (beyond it a block holds several chunks)
MAX_BLOCKS = 10_000


@dataclasses.dataclass(frozen=True)
class RayJob:
    """Where and how a batch job runs: ``address`` of the cluster (None: a local Ray started for the job),
    ``actors`` workers, each loading the model once and running inference on ``threads`` threads (and asking Ray
    for that many CPUs), ``batch_size`` files per chunk (the local commands' batch size)."""

    address: Optional[str] = None
    actors: int = 1
    threads: int = 1
    batch_size: int = 16


def chunk_paths(paths: Sequence[Union[str, object]], size: int) -> List[List[str]]:
    """``paths`` in consecutive chunks of ``size``, as the local commands batch them."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    paths = [str(p) for p in paths]
    return [paths[s:s + size] for s in range(0, len(paths), size)]


class _Worker:
    """Base of the callable classes Ray Data runs in its actors: sets the thread count before the model loads."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=num_cpus; this makes it the job's choice


class CaptionWorker(_Worker):
    """One actor's captioners (one per model, e.g. one per language): a chunk of paths -> one row per path with
    each model's (caption, score, tokens) as JSON, or its error."""

    def __init__(self, models: Sequence[str], decode_options: dict, runtime: RuntimeOptions, device: Optional[str],
                 threads: int):
        super().__init__(threads)
        from ..tasks.caption.pipeline import Captioner

        self.captioners = [Captioner.from_pretrained(m, device=device, runtime=runtime) for m in models]
        self.decodes = [c.decode_config(**decode_options) for c in self.captioners]

    def __call__(self, batch: dict) -> dict:
        out = {"path": [], "error": [], "results": []}
        for chunk in batch["paths"]:
            paths = json.loads(chunk)
            streams = [c.caption_files(paths, d, batch_size=len(paths)) for c, d in zip(self.captioners, self.decodes)]
            for rows in zip(*streams):
                path, _, error = rows[0]
                out["path"].append(path)
                out["error"].append(error or "")
                out["results"].append("" if error else json.dumps([[r.caption, r.score, r.tokens] for _, r, _ in rows],
                                                                  ensure_ascii=False))
        return {k: np.array(v, dtype=object) for k, v in out.items()}


class EmbedWorker(_Worker):
    """One actor's retriever: a chunk of paths -> one row per path with its image vector, or its error."""

    def __init__(self, model: str, runtime: RuntimeOptions, device: Optional[str], threads: int):
        super().__init__(threads)
        from ..tasks.retrieval.pipeline import Retriever

        self.retriever = Retriever.from_pretrained(model, device=device, runtime=runtime)

    def __call__(self, batch: dict) -> dict:
        paths_out, errors, vectors = [], [], []
        for chunk in batch["paths"]:
            paths = json.loads(chunk)
            for path, vector, error in self.retriever.embed_files(paths, batch_size=len(paths)):
                paths_out.append(path)
                errors.append(error or "")
                vectors.append(np.zeros(self.retriever.dim, np.float32) if error else vector)
        return {"path": np.array(paths_out, dtype=object), "error": np.array(errors, dtype=object),
                "vector": np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, self.retriever.dim),
                                                                                         np.float32)}


def _rows(worker: type, constructor_args: tuple, paths: Sequence, job: RayJob) -> Iterator[dict]:
    """Every output row of ``worker`` over ``paths`` in input order, as Ray Data yields them."""
    import ray.data

    from .cluster import require_ray

    require_ray()
    chunks = chunk_paths(paths, job.batch_size)
    if not chunks:
        return
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in input order: the caller writes them as they come
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset run
    items = [{"chunk": i, "paths": json.dumps(c, ensure_ascii=False)} for i, c in enumerate(chunks)]
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    # an actor pool of a fixed size; Ray Data gives its actors max_restarts=-1 and max_task_retries=-1
    # (actor_pool_map_operator.py), which tests/test_ray_batch.py relies on (a killed actor loses nothing)
    dataset = dataset.map_batches(worker, batch_size=1, fn_constructor_args=constructor_args,
                                  compute=ray.data.ActorPoolStrategy(size=job.actors), num_cpus=job.threads)
    yield from dataset.iter_rows()


def caption_files(models: Sequence[str], paths: Sequence, job: RayJob, decode_options: Optional[dict] = None,
                  runtime: RuntimeOptions = RuntimeOptions(), device: Optional[str] = None
                  ) -> Iterator[Tuple[str, Optional[list], Optional[str]]]:
    """``Captioner.caption_files`` of each model in ``models`` over ``paths`` on Ray, as (path, [CaptionResult per
    model] or None, error or None), in the order of ``paths``. Ray must be connected (``ray_session``)."""
    from ..tasks.caption.pipeline import CaptionResult

    args = (list(models), dict(decode_options or {}), runtime, device, job.threads)
    for row in _rows(CaptionWorker, args, paths, job):
        if row["error"]:
            yield row["path"], None, row["error"]
        else:
            yield row["path"], [CaptionResult(c, s, t) for c, s, t in json.loads(row["results"])], None


def embed_files(model: str, paths: Sequence, job: RayJob, runtime: RuntimeOptions = RuntimeOptions(),
                device: Optional[str] = None) -> Iterator[Tuple[str, Optional[np.ndarray], Optional[str]]]:
    """``Retriever.embed_files`` over ``paths`` on Ray, as (path, vector or None, error or None) in the order of
    ``paths``. Ray must be connected (``ray_session``)."""
    for row in _rows(EmbedWorker, (model, runtime, device, job.threads), paths, job):
        if row["error"]:
            yield row["path"], None, row["error"]
        else:
            yield row["path"], np.asarray(row["vector"], np.float32), None
