"""``RuntimeOptions``: how a pipeline may run inference, given to every pipeline's ``from_pretrained``."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """Which fast paths inference may take and where exported graphs are kept. Left at None, a choice is made
    per device by ``vlfuse.runtime.policy``: on a CPU, ONNX Runtime where it is installed and int8 decoder
    weights; elsewhere PyTorch (and TorchScript's decoding step) in float.

    >>> Captioner.from_pretrained("flickr8k-caption", runtime=RuntimeOptions(onnx=False))   # PyTorch, TorchScript
    """

    # ONNX Runtime for image encoders and the decoding step. None: on a CPU where onnxruntime and onnx are
    # installed, PyTorch where an export fails (with a warning); True: required (ConfigError where it cannot
    # run); False: never.
    onnx: Optional[bool] = None
    # A decoder's linear layers in int8 (dynamic quantization, CPU only). None: on a CPU. Only decoders have it.
    int8: Optional[bool] = None
    # The folder exported graphs are cached in; None: ``vlfuse.runtime.cache.DEFAULT_CACHE_DIR``
    # (~/.cache/vlfuse/onnx). The library reads no environment variable: the command line and the service pass
    # ``$VLFUSE_ONNX_CACHE`` here.
    cache_dir: Optional[Path] = None
