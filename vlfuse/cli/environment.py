"""What the commands take from the environment and hand to the library, which reads no environment variable
itself: ``VLFUSE_ONNX_CACHE``, a folder for exported ONNX Runtime graphs instead of ~/.cache/vlfuse/onnx;
``VLFUSE_WORDNET``, the WordNet folder VQA evaluation's WUPS reads instead of Debian's /usr/share/wordnet."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..runtime import RuntimeOptions

ONNX_CACHE_ENV = "VLFUSE_ONNX_CACHE"
WORDNET_ENV = "VLFUSE_WORDNET"


def runtime_options(no_onnx: bool = False, float32: bool = False) -> RuntimeOptions:
    """The runtime options of a command: ``--no-onnx`` (PyTorch and TorchScript, not ONNX Runtime),
    ``--float32`` (a float decoder, not int8) and the graph cache folder ``$VLFUSE_ONNX_CACHE``."""
    folder = os.environ.get(ONNX_CACHE_ENV)
    return RuntimeOptions(onnx=False if no_onnx else None, int8=False if float32 else None,
                          cache_dir=Path(folder) if folder else None)


def wordnet_root() -> Optional[str]:
    """The WordNet folder WUPS reads, ``$VLFUSE_WORDNET``; None: the library's default (Debian's)."""
    return os.environ.get(WORDNET_ENV) or None
