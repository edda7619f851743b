"""The one on-disk cache of exported ONNX graphs, for image encoders and decoding steps alike.

Exporting a graph takes ~1-2 s, so each is kept in a folder, under a name made of a hash of everything that shapes
it (``weights_key``: weights, sizes, the versions that export it): a changed model gets a new file, never a stale
one. The folder is passed in (``RuntimeOptions.cache_dir``); the library reads no environment variable. A folder
that cannot be written only costs the export again.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Union

from torch import nn

from ..io import atomic_write, tensors_digest

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/vlfuse/onnx")  # where graphs go unless RuntimeOptions.cache_dir says otherwise
CACHE_KEEP = 12  # graphs kept in a cache folder, newest first (an image encoder's and a decoding step's per model)


def weights_key(module: nn.Module, context: str) -> str:
    """A hash of ``context`` (what else shapes a graph: versions, sizes) and ``module``'s weights and buffers."""
    return tensors_digest(module.state_dict(), context)


class GraphCache:
    """Exported graphs in ``folder`` (None: ``DEFAULT_CACHE_DIR``), the newest ``keep`` kept. Where there is no
    home directory to put the default folder in, graphs are exported in memory every time."""

    def __init__(self, folder: Union[Path, str, None] = None, keep: int = CACHE_KEEP):
        try:
            self.folder: Optional[Path] = Path(DEFAULT_CACHE_DIR if folder is None else folder).expanduser()
        except RuntimeError:  # no home directory to be found
            self.folder = None
        self.keep = keep

    def contains(self, name: str) -> bool:
        """Whether graph file ``name`` is in the folder."""
        return self.folder is not None and (self.folder / name).is_file()

    def graph(self, name: str, build: Callable[[], bytes]) -> Union[str, bytes]:
        """The path of file ``name`` in the folder (built by ``build`` and written there first if it is not yet),
        or the graph itself where it cannot be cached. ONNX Runtime loads a file with one copy of the weights
        less than bytes held in Python (~12 MB for the image encoder)."""
        if self.folder is None:
            return build()
        path = self.folder / name
        if path.is_file():
            return str(path)
        graph = build()
        try:  # atomic: concurrent processes never read a half-written graph
            atomic_write(path, graph)
            self._prune()
        except OSError as exc:  # e.g. a full disk (no half-written file is left behind)
            log.info("could not cache the graph %s in %s (%s); it is built again next time", name, self.folder, exc)
            return graph
        return str(path)

    def _prune(self) -> None:
        """Delete all but the ``keep`` most recently written graphs (each is ~14 MB for EfficientNet-Lite0; every
        checkpoint with tuned CNN weights has one of its own)."""
        graphs = sorted(self.folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in graphs[self.keep:]:
            old.unlink(missing_ok=True)
