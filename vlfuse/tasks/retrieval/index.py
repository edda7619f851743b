"""A persistent image index for search: vectors of image files embedded by one retrieval model.

The file (a NumPy ``.npz`` archive, never pickled) holds the model identity, every image's path, size and
modification time, and its L2-normalised vector. It is written to a temporary file and renamed, so a crash
never leaves a half-written index. ``add`` re-embeds only files that are new or changed (size or mtime) and
drops files that are gone. Search is an exact inner product with NumPy; collections of ``ann_threshold``
vectors or more also get a faiss IVF index (stored inside the file) for sub-millisecond approximate search.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from ...errors import DataError, InputError, VlfuseError
from ...io import atomic_path

FORMAT_VERSION = 1
# (absolute paths) -> (path, vector (D,) or None, error or None) for each, in order: Retriever.embed_files' contract
EmbedFiles = Callable[[List[str]], Iterator[Tuple[str, Optional[np.ndarray], Optional[str]]]]
DEFAULT_ANN_THRESHOLD = 200_000


class IndexFileError(DataError):
    """An index file is missing, unreadable or corrupt."""


class ModelMismatchError(VlfuseError):
    """An index is queried with a different model than the one that built it."""


@dataclasses.dataclass
class SearchHit:
    path: str
    score: float


@dataclasses.dataclass
class UpdateReport:
    """What ``build``/``add`` did: files embedded, kept unchanged, removed, and (path, error) of bad ones."""

    embedded: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: List[Tuple[str, str]] = dataclasses.field(default_factory=list)


def _file_stat(path: str) -> Tuple[int, float]:
    st = os.stat(path)
    return st.st_size, st.st_mtime


def checked_queries(query_vectors: np.ndarray, dim: int, k: int) -> np.ndarray:
    """Query vectors as a contiguous float32 (B, D) array for a search of ``k`` hits in a ``dim``-d index; a wrong
    dimension or k < 1 is an InputError."""
    q = np.ascontiguousarray(np.atleast_2d(query_vectors), dtype=np.float32)
    if q.shape[1] != dim:
        raise InputError(f"query vectors have {q.shape[1]} dimensions, the index has {dim}")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    return q


class ImageIndex:
    """Vectors of image files from one retrieval model, searchable by text or image vectors."""

    def __init__(self, model_id: str, dim: int, paths: Sequence[str] = (), sizes: Sequence[int] = (),
                 mtimes: Sequence[float] = (), vectors: Optional[np.ndarray] = None,
                 ann_threshold: int = DEFAULT_ANN_THRESHOLD):
        self.model_id = model_id
        self.dim = dim
        self.paths: List[str] = list(paths)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.mtimes = np.asarray(mtimes, dtype=np.float64)
        self.vectors = np.zeros((0, dim), np.float32) if vectors is None else np.ascontiguousarray(vectors, np.float32)
        self.ann_threshold = ann_threshold
        self.last_report = UpdateReport()
        self._ann = None  # faiss index over self.vectors, when large
        if not (len(self.paths) == len(self.sizes) == len(self.mtimes) == len(self.vectors)):
            raise IndexFileError("index is inconsistent: paths, sizes, mtimes and vectors differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageIndex({len(self)} images, model={self.model_id}, dim={self.dim})"

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, retriever, paths: Iterable[Union[str, os.PathLike]], progress: bool = True,
              batch_size: int = 32, embed: Optional[EmbedFiles] = None) -> "ImageIndex":
        """Embed every image in ``paths``; unreadable files are skipped and listed in ``last_report.failed``."""
        index = cls(retriever.model_id, retriever.dim)
        index.add(retriever, paths, progress=progress, batch_size=batch_size, prune=False, embed=embed)
        return index

    def add(self, retriever, paths: Iterable[Union[str, os.PathLike]], progress: bool = True, batch_size: int = 32,
            prune: bool = True, embed: Optional[EmbedFiles] = None) -> UpdateReport:
        """Bring the index up to date with ``paths``: embed new or changed files (size or mtime differ) and,
        with ``prune``, drop indexed files that no longer exist. Returns (and keeps) an UpdateReport.

        ``embed`` embeds the files to do (absolute paths, in order) as ``retriever.embed_files`` does, yielding
        (path, vector, error) in the same order; by default that method itself, ``batch_size`` files at a time (a
        batch job on a cluster passes its own: ``vlfuse.scale.batch.embed_files``)."""
        self.check_compatible(retriever)
        report = UpdateReport()
        where: Dict[str, int] = {p: i for i, p in enumerate(self.paths)}
        todo: List[Tuple[str, int, float]] = []
        seen = set()
        for p in paths:
            path = str(Path(p).resolve())
            if path in seen:
                continue
            seen.add(path)
            try:
                size, mtime = _file_stat(path)
            except OSError as exc:
                report.failed.append((path, f"{path}: cannot be read ({exc.strerror or exc})"))
                continue
            i = where.get(path)
            if i is not None and self.sizes[i] == size and self.mtimes[i] == mtime:
                report.unchanged += 1
            else:
                todo.append((path, size, mtime))
        keep = np.ones(len(self), dtype=bool)
        if prune:
            for i, path in enumerate(self.paths):
                if not os.path.exists(path):
                    keep[i] = False
                    report.removed += 1
        stats = {path: (size, mtime) for path, size, mtime in todo}
        new_paths, new_vecs = [], []
        bar = tqdm(total=len(todo), desc="embedding images", unit="img", disable=not progress or not todo,
                   dynamic_ncols=True)
        embed = embed or (lambda files: retriever.embed_files(files, batch_size=batch_size))
        for path, vec, error in embed([t[0] for t in todo]):
            bar.update(1)
            if error:
                report.failed.append((path, error))
                if path in where:  # a file that became unreadable leaves the index
                    keep[where[path]] = False
                continue
            if path in where:
                i = where[path]
                self.vectors[i] = vec
                self.sizes[i], self.mtimes[i] = stats[path]
            else:
                new_paths.append(path)
                new_vecs.append(vec)
            report.embedded += 1
        bar.close()
        self._select(keep)
        if new_paths:
            self.paths += new_paths
            self.sizes = np.concatenate([self.sizes, [stats[p][0] for p in new_paths]]).astype(np.int64)
            self.mtimes = np.concatenate([self.mtimes, [stats[p][1] for p in new_paths]]).astype(np.float64)
            self.vectors = np.concatenate([self.vectors, np.stack(new_vecs).astype(np.float32)])
        self._ann = None
        self.last_report = report
        return report

    def _select(self, keep: np.ndarray) -> None:
        if keep.all():
            return
        self.paths = [p for p, k in zip(self.paths, keep) if k]
        self.sizes, self.mtimes, self.vectors = self.sizes[keep], self.mtimes[keep], self.vectors[keep]

    # -- compatibility and search ---------------------------------------------------------------------
    def _built_by(self, retriever) -> bool:
        return retriever.model_id.split("@")[-1] == self.model_id.split("@")[-1] and retriever.dim == self.dim

    def check_compatible(self, retriever) -> None:
        """Raise ModelMismatchError unless ``retriever`` is the model that built this index."""
        if not self._built_by(retriever):
            raise ModelMismatchError(
                f"this index was built by model '{self.model_id}' but the query model is '{retriever.model_id}'; "
                f"search with the same model (--model) or rebuild the index with this one")

    def compatible_retriever(self, retriever):
        """``retriever`` as it embedded this index's images: itself, or ``retriever.without_concepts()`` where the
        index was built by the same model before it had concepts (text queries embed alike either way, and images
        added later match the rest); ModelMismatchError for any other model."""
        if not self._built_by(retriever) and getattr(retriever, "concepts", None) is not None:
            plain = retriever.without_concepts()
            if self._built_by(plain):
                return plain
        self.check_compatible(retriever)
        return retriever

    def search(self, query_vectors: np.ndarray, k: int = 10) -> List[List[SearchHit]]:
        """query_vectors (B, D) -> for each query the ``k`` best images, highest score first."""
        q = checked_queries(query_vectors, self.dim, k)
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in range(len(q))]
        if self._ann is None and len(self) >= self.ann_threshold:
            self._ann = self._build_ann()
        if self._ann is not None:
            scores, ids = self._ann.search(q, k)
        else:
            scores, ids = exact_topk(q, self.vectors, k)
        return [[SearchHit(self.paths[j], float(s)) for s, j in zip(srow, irow) if j >= 0]
                for srow, irow in zip(scores, ids)]

    def _build_ann(self, nprobe: int = 32):
        """faiss inverted-file index over the vectors (inner product), or None if faiss is missing."""
        try:
            import faiss
        except ImportError:
            return None
        nlist = int(4 * np.sqrt(len(self)))
        quantizer = faiss.IndexFlatIP(self.dim)
        ann = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = self.vectors[rng.choice(len(self), size=min(len(self), 64 * nlist), replace=False)]
        ann.train(sample)
        ann.add(self.vectors)
        ann.nprobe = nprobe
        return ann

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write atomically (``vlfuse.io.atomic_path``)."""
        path = Path(path)
        meta = {"format": "vlfuse-image-index", "version": FORMAT_VERSION, "model_id": self.model_id,
                "dim": self.dim, "count": len(self), "ann_threshold": self.ann_threshold}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                  "paths": np.frombuffer(json.dumps(self.paths).encode(), dtype=np.uint8),
                  "sizes": self.sizes, "mtimes": self.mtimes, "vectors": self.vectors}
        if len(self) >= self.ann_threshold:
            if self._ann is None:
                self._ann = self._build_ann()
            if self._ann is not None:
                import faiss

                arrays["ann"] = faiss.serialize_index(self._ann)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # to a file object: np.savez would add ".npz" to a path without it
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ImageIndex":
        """Read an index file; a missing or corrupt file raises IndexFileError saying so."""
        path = Path(path)
        if not path.is_file():
            raise IndexFileError(f"index file '{path}' does not exist; create it with: vlfuse index build DIR --out {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != "vlfuse-image-index":
                    raise ValueError("not a vlfuse image index")
                if meta.get("version") != FORMAT_VERSION:
                    raise ValueError(f"format version {meta.get('version')} is not supported")
                index = cls(meta["model_id"], int(meta["dim"]), json.loads(bytes(z["paths"]).decode()), z["sizes"],
                            z["mtimes"], z["vectors"], int(meta.get("ann_threshold", DEFAULT_ANN_THRESHOLD)))
                ann = z["ann"] if "ann" in z.files else None
        except IndexFileError as exc:
            raise IndexFileError(f"index file '{path}' is corrupt ({exc}); rebuild it with: vlfuse index build") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError,
                UnicodeDecodeError, TypeError) as exc:
            raise IndexFileError(f"index file '{path}' is corrupt or not an index ({exc}); "
                                 f"rebuild it with: vlfuse index build") from None
        if index.vectors.ndim != 2 or index.vectors.shape[1] != index.dim or len(index) != meta["count"]:
            raise IndexFileError(f"index file '{path}' is corrupt (vector table does not match its header)")
        if ann is not None:
            try:
                import faiss

                index._ann = faiss.deserialize_index(ann)
                index._ann.nprobe = 32
            except ImportError:
                index._ann = None  # exact search still works
        return index


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (B, D) x (N, D) -> scores (B, k), ids (B, k), best first.

    The product runs in torch, not NumPy: the query was just embedded by torch, and handing the cores back and
    forth between torch's and OpenBLAS's thread pools made each text query 2x slower on a 2-core CPU
    (29.8 vs 14.6 ms over 10,000 vectors, measured interleaved)."""
    import torch

    sims = (torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
            @ torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).T).numpy()  # (B, N)
    if k < sims.shape[1]:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        part = np.tile(np.arange(sims.shape[1]), (len(sims), 1))
    top = np.take_along_axis(sims, part, 1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, 1), np.take_along_axis(part, order, 1)
