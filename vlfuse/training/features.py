"""On-disk cache of frozen vision-encoder outputs, so training epochs never re-run the CNN.

Entries are keyed by the image file's content digest under a folder named by the encoder's
``cache_key`` (a digest of its image transform and stem weights; see ``vlfuse.io``), so renamed files hit the
cache and edited files or another encoder miss it. Each entry is written atomically; an interrupted build
resumes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.images import load_image
from ..data.mirror import mirror_pixels
from ..errors import DataError, ImageError
from ..io import atomic_path, file_digest


class FeatureCache:
    """Stem activations of ``encoder`` for image files, stored as fp16 ``.npy`` files."""

    def __init__(self, root: str | os.PathLike, encoder, mirrored: bool = False):
        self.encoder = encoder
        self.mirrored = mirrored  # cache the stem outputs of the images mirrored left-right instead
        self.dir = Path(root) / (encoder.cache_key + ("-mirrored" if mirrored else ""))

    def _entry(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    @torch.inference_mode()
    def build(self, paths: Sequence[str | os.PathLike], batch_size: int = 32, progress: bool = True,
              desc: str = "caching features") -> Tuple[List[Optional[str]], List[Tuple[str, str]]]:
        """Make sure every readable image has an entry. Returns (digest or None per path, [(path, error)])."""
        digests: List[Optional[str]] = []
        failures: List[Tuple[str, str]] = []
        todo: List[Tuple[int, str]] = []
        for i, p in enumerate(paths):
            try:
                d = file_digest(p)
            except OSError as exc:
                digests.append(None)
                failures.append((str(p), f"cannot be read ({exc.strerror or exc})"))
                continue
            digests.append(d)
            if not self._entry(d).is_file():
                todo.append((i, d))
        self.encoder.eval()
        device = next(self.encoder.parameters()).device
        tf = self.encoder.transform
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo, dynamic_ncols=True)
        for start in range(0, len(todo), batch_size):
            chunk, pixels = [], []
            for i, d in todo[start:start + batch_size]:
                try:
                    pixels.append(tf(load_image(paths[i])))
                    chunk.append(d)
                except ImageError as exc:
                    failures.append((str(paths[i]), str(exc)))
                    digests[i] = None
            if pixels:
                batch = torch.stack(pixels).to(device)
                if self.mirrored:
                    batch = mirror_pixels(batch)
                acts = self.encoder.stem_chunked(batch).float().cpu().numpy().astype(np.float16)
                for d, a in zip(chunk, acts):
                    self._write(d, a)
            bar.update(len(todo[start:start + batch_size]))
        bar.close()
        return digests, failures

    def features(self, paths: Sequence[str | os.PathLike], progress: bool = True, desc: str = "caching features"
                 ) -> Tuple[torch.Tensor, List[int], List[Tuple[str, str]]]:
        """``build`` then ``load``: (fp16 features of the readable images, their indices in ``paths``,
        [(path, error)] of the rest). Raises DataError when none can be read."""
        digests, failures = self.build(paths, progress=progress, desc=desc)
        kept = [i for i, d in enumerate(digests) if d is not None]
        if not kept:
            raise DataError(f"none of the {len(paths)} images ({desc}) could be read"
                            + (f": {failures[0][0]}: {failures[0][1]}" if failures else ""))
        return self.load([digests[i] for i in kept]), kept, failures

    def _write(self, digest: str, array: np.ndarray) -> None:
        with atomic_path(self._entry(digest), fsync=False) as tmp:  # thousands of entries: no flush to disk each
            np.save(tmp, np.ascontiguousarray(array))

    def load(self, digests: Sequence[str], progress: bool = False) -> torch.Tensor:
        """Stack cached entries -> fp16 tensor (M, *activation shape)."""
        arrays = [np.load(self._entry(d)) for d in tqdm(digests, desc="loading features", unit="img",
                                                       disable=not progress, dynamic_ncols=True)]
        return torch.from_numpy(np.stack(arrays))
