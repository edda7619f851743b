"""A vision encoder's inference pass run by ONNX Runtime on a CPU.

On the 2-core reference CPU, EfficientNet-Lite0 at 224 px takes ~15-18 ms an image in PyTorch's eager mode with
one thread (BatchNorm and padding already folded, channels-last) and ~10 ms exported to ONNX and run by ONNX
Runtime, with the same output to ~1e-5. The encoder stays a PyTorch module (training, attention maps and saving
use it unchanged); ``OnnxImageEncoder`` is a read-only copy of its forward pass for inference, built from the
module's current weights. Exporting takes ~1 s, so the exported graph is cached on disk, keyed by a hash of the
weights and everything else that shapes the graph; a cache that cannot be written only costs the export again.
"""
from __future__ import annotations

import importlib.util
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..io import atomic_write, tensors_digest
from ..nn.vision import ImageFeatures, VisionEncoder

log = logging.getLogger(__name__)

OPSET = 17


CACHE_ENV = "VLFUSE_ONNX_CACHE"  # a folder for the exported graphs instead of ~/.cache/vlfuse/onnx


def default_cache_dir() -> Optional[Path]:
    """The folder exported graphs are cached in, looked up at each call (so ``VLFUSE_ONNX_CACHE`` set after import
    counts): ``$VLFUSE_ONNX_CACHE``, else ~/.cache/vlfuse/onnx; None where there is no home directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    try:
        return Path.home() / ".cache" / "vlfuse" / "onnx"
    except RuntimeError:  # no home directory to be found: export in memory every time
        return None


DEFAULT = "<default>"  # a cache_dir argument meaning ``default_cache_dir()`` at the time of the call
CACHE_KEEP = 12  # graphs kept in a cache folder, newest first (an image encoder's and a decoding step's per model)


def onnx_available() -> bool:
    """True if ONNX Runtime and the ``onnx`` package (which torch's exporter needs) are both installed. Only
    looked up, not imported: ``onnx`` costs ~0.6 s and ~12 MB to import, and is needed only to export."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def use_onnx(onnx: Optional[bool], device: torch.device) -> bool:
    """Whether inference runs in ONNX Runtime: asked for (``onnx=True``), or by default (``None``) on a CPU where
    ONNX Runtime is installed."""
    return bool(onnx) or (onnx is None and device.type == "cpu" and onnx_available())


class _Features(nn.Module):
    """The encoder's forward pass with plain tensor outputs, as the exporter needs them."""

    def __init__(self, encoder: VisionEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor):
        features = self.encoder(images)
        return features.grid, features.pooled


def weights_key(module: nn.Module, context: str) -> str:
    """A hash of ``context`` (what else shapes a graph: versions, sizes) and ``module``'s weights and buffers."""
    return tensors_digest(module.state_dict(), context)


def graph_key(encoder: VisionEncoder) -> str:
    """A hash of what the exported graph depends on: the encoder's class, input size, weights and buffers, and
    the torch and opset versions that export it."""
    return weights_key(encoder, f"{type(encoder).__qualname__}|{encoder.transform.size}|{torch.__version__}|{OPSET}")


def export_onnx(encoder: VisionEncoder) -> bytes:
    """The encoder's inference pass (images (B, 3, S, S) -> grid (B, N, C), pooled (B, C)) as an ONNX graph
    with a dynamic batch size."""
    size = encoder.transform.size
    buffer = io.BytesIO()
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter is marked deprecated; it works
            torch.onnx.export(_Features(encoder), (torch.zeros(1, 3, size, size),), buffer, dynamo=False,
                              input_names=["images"], output_names=["grid", "pooled"], opset_version=OPSET,
                              dynamic_axes={"images": {0: "batch"}, "grid": {0: "batch"}, "pooled": {0: "batch"}})
    finally:
        encoder.train(was_training)
    return buffer.getvalue()


def _prune(cache_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently written graphs (each is ~14 MB for EfficientNet-Lite0; every
    checkpoint with tuned CNN weights has one of its own)."""
    graphs = sorted(cache_dir.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in graphs[keep:]:
        old.unlink(missing_ok=True)


def graph_name(encoder: VisionEncoder) -> str:
    """The file name of ``encoder``'s exported graph in a cache folder."""
    return f"{graph_key(encoder)}.onnx"


def is_cached(name: str) -> bool:
    """Whether graph file ``name`` is in the default cache folder (``default_cache_dir()``, looked up now)."""
    folder = default_cache_dir()
    return folder is not None and (folder / name).is_file()


def cached_graph(encoder: VisionEncoder, cache_dir: Optional[Path]) -> Union[str, bytes]:
    """The exported graph of ``encoder``: see ``cached_file``."""
    return cached_file(graph_name(encoder), lambda: export_onnx(encoder), cache_dir)


def cached_file(name: str, build: Callable[[], bytes], cache_dir: Optional[Path]) -> Union[str, bytes]:
    """A graph: the path of file ``name`` in ``cache_dir`` (built by ``build`` and written there first if it is
    not yet), or the graph itself where it cannot be cached. ONNX Runtime loads a file with one copy of the
    weights less than bytes held in Python (~12 MB for the image encoder)."""
    if cache_dir == DEFAULT:
        cache_dir = default_cache_dir()
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / name
    if path.is_file():
        return str(path)
    graph = build()
    try:  # atomic: concurrent processes never read a half-written graph
        atomic_write(path, graph)
        _prune(path.parent, keep=CACHE_KEEP)
    except OSError as exc:  # e.g. a full disk (no half-written file is left behind)
        log.info("could not cache the graph %s in %s (%s); it is built again next time", name, cache_dir, exc)
        return graph
    return str(path)


def session_options(threads: int, prepack: bool = False, arena: bool = True):
    """ONNX Runtime session options for inference on a small CPU: ``threads`` intra-op threads that do not spin
    (a spinning pool takes cores from the work that runs between calls). Without ``prepack``, no prepacked weight
    copies: for the image encoder they cost ~40 MB more resident memory and were no faster here (9.2 vs 9.4 ms an
    image)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not arena:
        options.enable_cpu_mem_arena = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    return options


class OnnxImageEncoder:
    """Calls like the encoder (pixels (B, 3, S, S) -> ImageFeatures), through ONNX Runtime.

    ``threads`` is ONNX Runtime's intra-op thread count (default: torch's). Its idle threads do not spin: on a
    small CPU a spinning pool takes cores from the decoder that runs between image batches. Several threads may
    call one instance at once (ONNX Runtime sessions are thread-safe). ``chunk`` bounds the images per call: per
    image, 1 runs as fast as 2-16 here (9.6-10.5 ms, one thread) and ONNX Runtime's memory arena grows with it
    (two threads encoding at once: ~45 MB more at 1, ~70-80 MB at 2, ~110-140 MB at 4).
    """

    def __init__(self, encoder: VisionEncoder, threads: Optional[int] = None,
                 cache_dir: Union[Path, str, None] = DEFAULT, chunk: int = 1):
        if not onnx_available():
            raise ConfigError("running the image encoder with ONNX Runtime needs the onnxruntime and onnx "
                              "packages: pip install onnxruntime onnx")
        import onnxruntime as ort

        self.threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(cached_graph(encoder, cache_dir), session_options(self.threads),
                                            providers=["CPUExecutionProvider"])
        self.chunk = chunk
        self.transform = encoder.transform

    def __call__(self, pixels: torch.Tensor) -> ImageFeatures:
        if pixels.device.type != "cpu":
            raise ValueError("OnnxImageEncoder runs on the CPU; encode GPU tensors with the PyTorch encoder")
        grids, pooled = [], []
        for chunk in pixels.split(self.chunk):
            grid, pool = self.session.run(None, {"images": chunk.float().contiguous().numpy()})
            grids.append(torch.from_numpy(grid))
            pooled.append(torch.from_numpy(pool))
        return ImageFeatures(torch.cat(grids), torch.cat(pooled))


def fast_image_encoder(encoder: VisionEncoder, onnx: Optional[bool], device: torch.device):
    """The callable that encodes images for inference: an ``OnnxImageEncoder`` if ``onnx`` is True, or if it is
    None (the default) on a CPU where ONNX Runtime is installed and the export works; else the encoder itself.
    ``onnx=True`` where it cannot work raises ConfigError."""
    if not use_onnx(onnx, device):
        return encoder
    if device.type != "cpu":
        raise ConfigError(f"onnx=True runs the image encoder on the CPU, but the model is on {device}")
    try:
        return OnnxImageEncoder(encoder)
    except ConfigError:
        raise
    except Exception as exc:  # an exporter or runtime limitation: the PyTorch encoder still works
        if onnx:
            raise ConfigError(f"could not run the image encoder with ONNX Runtime: {exc}") from exc
        log.warning("image encoder: ONNX Runtime export failed (%s); using PyTorch", exc)
        return encoder
