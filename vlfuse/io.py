"""Writing files safely and naming what they hold: the one atomic write and the one digest scheme of vlfuse.

Atomic writes: every file vlfuse writes for later reading (checkpoints, configs, feature caches, indexes, ONNX
graphs, caption memories) is written to a temporary file in the same folder, flushed to disk and renamed over
the target, so a reader — or a run resumed after ``kill -9`` — sees the old file or the new one, never half of
one. The temporary name is unique per process and thread, so writers of the same file at once (data-parallel
ranks, two servers exporting one graph) never rename each other's.

Digests: a cache entry or a model identity is named by a SHA-1 of what determines it — a file's bytes
(``file_digest``), or a JSON-able config plus named tensors (``tensors_digest``; ``config_digest`` without
tensors). Retrieval model ids stored in saved indexes and the image-tower digest a caption memory records are
``tensors_digest`` values, so this scheme must not change: shipped models' files would be refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

PathLike = Union[str, "os.PathLike[str]"]

DIGEST_CHARS = 16  # hex characters of a config/tensors digest: 64 bits, plenty to tell models and caches apart


# -- atomic writes ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the block to write; afterwards it is flushed to disk and renamed
    over ``path`` in one step. If the block (or the rename) fails, the temporary file is removed and ``path`` is
    left as it was. The folder is created if needed.

    ``fsync=False`` skips the flush to disk (~4-7 ms a file here): for the many small entries of a cache that
    can be rebuilt, where a power cut may leave an entry empty but a crash or kill cannot.

    The temporary name ends with ``path``'s suffix, so writers that choose a format by the suffix (``np.save``
    appends ``.npy`` otherwise; matplotlib, Pillow) write the right one.

    >>> with atomic_path("run/last.pt") as tmp:
    ...     torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # hidden, and unique per process and thread (the random part also keeps two writers in one thread apart)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` (bytes, or text written as UTF-8) to ``path`` atomically (see ``atomic_path``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _fsync(path: Path) -> None:
    """Flush ``path``'s data to disk, so that after a power cut the renamed file is complete, not empty."""
    fd = os.open(path, os.O_RDWR)  # Windows refuses to flush a file opened read-only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- digests ------------------------------------------------------------------------------------------------------
def file_digest(path: PathLike) -> str:
    """SHA-1 (40 hex characters) of a file's bytes: the same content gives the same digest under any name."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_digest(config: Any) -> str:
    """Digest of a JSON-able value (keys sorted, so mapping order does not matter)."""
    return tensors_digest({}, config)


def tensors_digest(tensors: Mapping[str, Any], config: Any = None) -> str:
    """Digest of ``config`` (JSON-able: what else determines the result, e.g. a model config or versions) and of
    named tensors (a state dict; torch tensors that NumPy can hold, so not bfloat16), taken by sorted name over
    each tensor's bytes in C order. Equal for equal values on any device or memory layout."""
    h = hashlib.sha1(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy())
    return h.hexdigest()[:DIGEST_CHARS]
