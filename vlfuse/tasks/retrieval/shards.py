"""Search at scale: an index in shards, each a faiss IVF-PQ index over a part of the photos.

Beyond a few million photos the flat index (``index.py``: every vector in float32, exact search) outgrows one
process's memory and one query's time budget. ``ShardedIndex`` keeps, per shard, an inverted-file index with
product-quantized vectors (``IndexIVFPQ``, inner product): ``m`` bytes a vector instead of ``4 * dim``. All shards
share one trained coarse quantizer and PQ codebook (trained once on a sample of all vectors, then copied empty to
every shard), so their approximate scores are on one scale and merge directly.

A query fans out to every shard — each answers its own top ``k`` (probing ``nprobe`` of its ``nlist`` lists) — and
the shard answers are merged into the global top ``k`` by score (``merge_topk``). Here shards are searched on a
thread pool in one process (faiss releases the GIL); across machines each shard sits behind its own search
service and the same merge runs at the front (docs/scaling.md).

On disk a sharded index is a folder: ``manifest.json`` (model identity, dim, parameters, shard files and sizes,
written last), ``shard-00000.faiss`` ... and ``shard-00000.paths.json`` ... (each shard's photos in id order).
"""
from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ...config import from_dict, to_dict
from ...errors import ConfigError, InputError
from ...io import atomic_path
from .index import ImageIndex, IndexFileError, SearchHit, checked_queries

MANIFEST = "manifest.json"
FORMAT = "vlfuse-sharded-index"


@dataclasses.dataclass(frozen=True)
class IVFPQParams:
    """How each shard is built and searched.

    ``nlist`` inverted lists per shard (0: ~4 * sqrt(vectors per shard), at most the sample / 39, as faiss wants
    ~39 training points per list); ``m`` product-quantizer codes per vector of ``nbits`` bits each (``dim`` must be
    divisible by ``m``; 256-d vectors with m=32, nbits=8: 32 bytes a vector, 8 dims per code); ``nprobe`` lists
    searched per query per shard; ``train_size`` vectors sampled (with ``seed``) to train the shared quantizer."""

    nlist: int = 0
    m: int = 32
    nbits: int = 8
    nprobe: int = 16
    train_size: int = 100_000
    seed: int = 0


def require_faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("IVF-PQ shards need faiss: pip install 'vlfuse[search]'") from None
    return faiss


def train_ivfpq(sample: np.ndarray, shard_size: int, params: IVFPQParams):
    """An empty, trained IndexIVFPQ (inner product) over vectors like ``sample`` (N, D)."""
    faiss = require_faiss()
    dim = sample.shape[1]
    if dim % params.m:
        raise ConfigError(f"IVF-PQ: the vectors' {dim} dimensions are not divisible by m={params.m}")
    nlist = params.nlist or int(4 * np.sqrt(max(shard_size, 1)))
    nlist = max(1, min(nlist, len(sample) // 39))
    if len(sample) < 2 ** params.nbits:
        raise InputError(f"IVF-PQ with nbits={params.nbits} needs at least {2 ** params.nbits} vectors to train its "
                         f"codebook, got {len(sample)}; use the flat index (--kind flat) for so few photos")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, params.m, params.nbits, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, np.float32))
    index.nprobe = params.nprobe
    return index


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-shard answers (S, B, k') scores and global ids (-1: none) -> the best ``k`` of each query across shards:
    (B, k) scores and ids, best first."""
    s = np.concatenate(list(scores), axis=1)  # (B, S * k')
    i = np.concatenate(list(ids), axis=1)
    s = np.where(i >= 0, s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


class ShardedIndex:
    """Photos in ``len(shards)`` IVF-PQ shards, searchable like ``ImageIndex`` (``search`` -> ``SearchHit``s)."""

    def __init__(self, model_id: str, dim: int, shards: Sequence, paths: Sequence[Sequence[str]],
                 params: IVFPQParams = IVFPQParams()):
        if len(shards) != len(paths) or any(s.ntotal != len(p) for s, p in zip(shards, paths)):
            raise IndexFileError("sharded index is inconsistent: a shard's vectors and paths differ in number")
        self.model_id, self.dim, self.params = model_id, dim, params
        self.shards, self.paths = list(shards), [list(p) for p in paths]
        self.offsets = np.cumsum([0] + [len(p) for p in self.paths])  # global id of each shard's first photo
        for shard in self.shards:
            shard.nprobe = params.nprobe
        self._pool: Optional[ThreadPoolExecutor] = None  # searches the shards at once (made on first use)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"ShardedIndex({len(self)} images in {len(self.shards)} IVF-PQ shards, model={self.model_id})"

    # the same model checks as the flat index
    _built_by = ImageIndex._built_by
    check_compatible = ImageIndex.check_compatible
    compatible_retriever = ImageIndex.compatible_retriever

    @classmethod
    def build(cls, model_id: str, paths: Sequence[str], vectors: np.ndarray, shards: int,
              params: IVFPQParams = IVFPQParams()) -> "ShardedIndex":
        """``vectors`` (N, D) of ``paths`` in ``shards`` consecutive parts, one IVF-PQ index each, all sharing one
        quantizer trained on ``params.train_size`` sampled vectors."""
        faiss = require_faiss()
        vectors = np.ascontiguousarray(vectors, np.float32)
        if shards < 1:
            raise InputError(f"the number of shards must be at least 1, got {shards}")
        rng = np.random.default_rng(params.seed)
        sample = vectors[np.sort(rng.choice(len(vectors), size=min(len(vectors), params.train_size), replace=False))]
        bounds = np.linspace(0, len(vectors), shards + 1).astype(int)
        trained = train_ivfpq(sample, int(np.diff(bounds).max()), params)
        built, parts = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            shard = faiss.clone_index(trained)
            shard.add(vectors[lo:hi])
            built.append(shard)
            parts.append(list(paths[lo:hi]))
        return cls(model_id, vectors.shape[1], built, parts, params)

    @classmethod
    def from_index(cls, index: ImageIndex, shards: int, params: IVFPQParams = IVFPQParams()) -> "ShardedIndex":
        """The photos of a flat index in IVF-PQ shards."""
        return cls.build(index.model_id, index.paths, index.vectors, shards, params)

    def search_shards(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Every shard's own top ``k``: scores (S, B, k) and global ids (S, B, k), -1 where a shard has fewer."""
        def one(s: int):
            scores, ids = self.shards[s].search(queries, k)
            return scores, np.where(ids >= 0, ids + self.offsets[s], -1)

        if len(self.shards) == 1:
            answers = [one(0)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(min(len(self.shards), os.cpu_count() or 1), "vlfuse-shards")
            answers = list(self._pool.map(one, range(len(self.shards))))
        return np.stack([a[0] for a in answers]), np.stack([a[1] for a in answers])

    def search(self, query_vectors: np.ndarray, k: int = 10) -> List[List[SearchHit]]:
        """query_vectors (B, D) -> for each query the ``k`` best images over all shards, highest score first."""
        q = checked_queries(query_vectors, self.dim, k)
        scores, ids = merge_topk(*self.search_shards(q, k), k)
        return [[SearchHit(self.path(j), float(s)) for s, j in zip(srow, irow) if j >= 0]
                for srow, irow in zip(scores, ids)]

    def path(self, global_id: int) -> str:
        s = int(np.searchsorted(self.offsets, global_id, side="right")) - 1
        return self.paths[s][global_id - self.offsets[s]]

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write every shard, then the manifest (each file atomically; the manifest last)."""
        faiss = require_faiss()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = []
        for i, (shard, paths) in enumerate(zip(self.shards, self.paths)):
            name = f"shard-{i:05d}"
            with atomic_path(directory / f"{name}.faiss") as tmp:
                faiss.write_index(shard, str(tmp))
            with atomic_path(directory / f"{name}.paths.json") as tmp:
                tmp.write_text(json.dumps(paths, ensure_ascii=False), encoding="utf-8")
            files.append({"name": name, "count": len(paths)})
        manifest = {"format": FORMAT, "version": 1, "model_id": self.model_id, "dim": self.dim,
                    "count": len(self), "params": to_dict(self.params), "shards": files}
        with atomic_path(directory / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "ShardedIndex":
        faiss = require_faiss()
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT:
                raise ValueError("not a vlfuse sharded index")
            shards = [faiss.read_index(str(directory / f"{s['name']}.faiss")) for s in manifest["shards"]]
            paths = [json.loads((directory / f"{s['name']}.paths.json").read_text(encoding="utf-8"))
                     for s in manifest["shards"]]
            params = from_dict(IVFPQParams, manifest["params"], "params")
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise IndexFileError(f"sharded index '{directory}' is missing or corrupt ({exc}); rebuild it with: "
                                 f"vlfuse index build DIR --kind ivfpq --out {directory}") from None
        return cls(manifest["model_id"], int(manifest["dim"]), shards, paths, params)


def load_any_index(path: Union[str, os.PathLike]) -> Union[ImageIndex, ShardedIndex]:
    """A flat index file or a sharded index folder."""
    return ShardedIndex.load(path) if Path(path).is_dir() else ImageIndex.load(path)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact top-k found in the approximate top-k, over queries."""
    k = exact_ids.shape[1]
    return float(np.mean([len(set(a[:k]) & set(e)) / k for a, e in zip(approx_ids, exact_ids)]))

