"""A vision encoder's inference pass run by ONNX Runtime on a CPU.

On the 2-core reference CPU, EfficientNet-Lite0 at 224 px takes ~15-18 ms an image in PyTorch's eager mode with
one thread (BatchNorm and padding already folded, channels-last) and ~10 ms exported to ONNX and run by ONNX
Runtime, with the same output to ~1e-5. The encoder stays a PyTorch module (training, attention maps and saving
use it unchanged); ``OnnxImageEncoder`` is a read-only copy of its forward pass for inference, built from the
module's current weights and cached on disk (``vlfuse.runtime.cache``). Pipelines get it through
``vlfuse.runtime.accelerate_vision``, which decides whether to use it.
"""
from __future__ import annotations

import io
import warnings
from typing import Optional

import torch
from torch import nn

from ..nn.vision import ImageFeatures, VisionEncoder
from .cache import GraphCache, weights_key
from .sessions import OPSET, session_options


class _Features(nn.Module):
    """The encoder's forward pass with plain tensor outputs, as the exporter needs them."""

    def __init__(self, encoder: VisionEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor):
        features = self.encoder(images)
        return features.grid, features.pooled


def input_shape(encoder: VisionEncoder) -> tuple:
    """One input's shape: (3, S, S) pixels for an image encoder; an encoder that reads something else (a CNN's
    later layers read activations) says so with an ``input_shape`` attribute."""
    size = encoder.transform.size
    return tuple(getattr(encoder, "input_shape", None) or (3, size, size))


def graph_key(encoder: VisionEncoder) -> str:
    """A hash of what the exported graph depends on: the encoder's class, input shape, weights and buffers, and
    the torch and opset versions that export it."""
    own = getattr(encoder, "input_shape", None)
    shape = "x".join(str(d) for d in own) if own else encoder.transform.size
    return weights_key(encoder, f"{type(encoder).__qualname__}|{shape}|{torch.__version__}|{OPSET}")


def graph_name(encoder: VisionEncoder) -> str:
    """The file name of ``encoder``'s exported graph in a cache folder."""
    return f"{graph_key(encoder)}.onnx"


def export_onnx(encoder: VisionEncoder) -> bytes:
    """The encoder's inference pass (images (B, 3, S, S), or its ``input_shape``, -> grid (B, N, C), pooled (B, C))
    as an ONNX graph with a dynamic batch size."""
    buffer = io.BytesIO()
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter is marked deprecated; it works
            torch.onnx.export(_Features(encoder), (torch.zeros(1, *input_shape(encoder)),), buffer, dynamo=False,
                              input_names=["images"], output_names=["grid", "pooled"], opset_version=OPSET,
                              dynamic_axes={"images": {0: "batch"}, "grid": {0: "batch"}, "pooled": {0: "batch"}})
    finally:
        encoder.train(was_training)
    return buffer.getvalue()


class OnnxImageEncoder:
    """Calls like the encoder (pixels (B, 3, S, S) -> ImageFeatures), through ONNX Runtime.

    ``threads`` is ONNX Runtime's intra-op thread count (default: torch's). Its idle threads do not spin: on a
    small CPU a spinning pool takes cores from the decoder that runs between image batches. Several threads may
    call one instance at once (ONNX Runtime sessions are thread-safe). ``chunk`` bounds the images per call: per
    image, 1 runs as fast as 2-16 here (9.6-10.5 ms, one thread) and ONNX Runtime's memory arena grows with it
    (two threads encoding at once: ~45 MB more at 1, ~70-80 MB at 2, ~110-140 MB at 4).
    """

    def __init__(self, encoder: VisionEncoder, cache: GraphCache, threads: Optional[int] = None, chunk: int = 1):
        import onnxruntime as ort

        self.threads = threads or torch.get_num_threads()
        graph = cache.graph(graph_name(encoder), lambda: export_onnx(encoder))
        self.session = ort.InferenceSession(graph, session_options(self.threads), providers=["CPUExecutionProvider"])
        self.chunk = chunk
        self.transform = encoder.transform

    def backend_for(self, images: int) -> str:
        """What encodes a batch of ``images`` images (``vlfuse.runtime.backend``)."""
        return "onnxruntime"

    def __call__(self, pixels: torch.Tensor) -> ImageFeatures:
        if pixels.device.type != "cpu":
            raise ValueError("OnnxImageEncoder runs on the CPU; encode GPU tensors with the PyTorch encoder")
        grids, pooled = [], []
        for chunk in pixels.split(self.chunk):
            grid, pool = self.session.run(None, {"images": chunk.float().contiguous().numpy()})
            grids.append(torch.from_numpy(grid))
            pooled.append(torch.from_numpy(pool))
        return ImageFeatures(torch.cat(grids), torch.cat(pooled))
