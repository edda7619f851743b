"""The one policy for choosing a backend: ONNX Runtime or PyTorch by device and installed packages, int8 by
device, and for the decoding step ONNX Runtime or TorchScript by batch size and thread count. Everything that
accelerates a model asks here; nothing else decides."""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ..errors import ConfigError
from .options import RuntimeOptions


def onnx_available() -> bool:
    """True if ONNX Runtime and the ``onnx`` package (which torch's exporter needs) are both installed. Only
    looked up, not imported: ``onnx`` costs ~0.6 s and ~12 MB to import, and is needed only to export."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def uses_onnx(options: RuntimeOptions, device: torch.device) -> bool:
    """Whether inference on ``device`` runs in ONNX Runtime: by default (``onnx=None``) on a CPU where it is
    installed. ``onnx=True`` where it cannot run raises ConfigError saying why."""
    if options.onnx is None:
        return device.type == "cpu" and onnx_available()
    if options.onnx and not onnx_available():
        raise ConfigError("running a model with ONNX Runtime needs the onnxruntime and onnx packages: "
                          "pip install onnxruntime onnx")
    if options.onnx and device.type != "cpu":
        raise ConfigError(f"onnx=True runs the model on the CPU, but it is on {device}; leave onnx unset there")
    return options.onnx


def uses_int8(options: RuntimeOptions, device: torch.device) -> bool:
    """Whether a decoder's linear layers run int8: by default (``int8=None``) on a CPU, where decoding is bound
    by reading weights; int8 kernels exist for CPUs only."""
    return device.type == "cpu" if options.int8 is None else options.int8


# ONNX Runtime's decoding step (one thread: more only slow it down, its threads wake per operation) against
# TorchScript's, per step on the 2-core CPU, idle, one torch thread: 0.33-0.42 vs 0.42-0.55 ms at 1 row, 0.97-1.65
# vs 1.06-1.80 ms at 8, at 16 sometimes faster (2.07 vs 2.17 ms), sometimes slower (3.06 vs 2.79 ms), 4.1 vs
# 3.8 ms at 32; with two torch threads TorchScript's step is faster from ~8 rows (0.98 vs 1.47 ms at 8).
MAX_IMAGES_ONE_THREAD, MAX_IMAGES_MORE_THREADS = 8, 4


def step_runs_onnx(images: int, max_images: Optional[int] = None) -> bool:
    """Whether the decoding steps of a batch of ``images`` images run in ONNX Runtime rather than TorchScript:
    up to ``max_images``, by default as measured (up to 8 images with one torch thread, up to 4 with more, which
    TorchScript's step uses). The thread count is read now: a process may change it after loading a model."""
    if max_images is None:
        max_images = MAX_IMAGES_ONE_THREAD if torch.get_num_threads() == 1 else MAX_IMAGES_MORE_THREADS
    return images <= max_images
