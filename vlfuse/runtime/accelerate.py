"""The interface every pipeline gets its fast paths through: ``accelerate_vision`` and ``accelerate_decoder``
make the inference copies of plain PyTorch modules, ``backend`` says what runs one, and ``Runtime`` holds one
pipeline's copies (made on first use, from several threads safely) and reports on them.

The backends: the PyTorch module itself ("torch"), a decoding step compiled by TorchScript ("torchscript",
``vlfuse.runtime.torchscript``), and ONNX Runtime ("onnxruntime": ``onnx_vision`` for image encoders,
``onnx_step`` for the decoding step); int8 linear layers are an option of the decoding copy (``int8``). Which
one runs is ``vlfuse.runtime.policy``'s choice, and exported graphs live in one cache (``vlfuse.runtime.cache``).
"""
from __future__ import annotations

import itertools
import logging
import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.vision import ImageFeatures, VisionEncoder
from .cache import GraphCache
from .decoder import inference_decoder
from .onnx_step import covers, onnx_step_decoder, step_graph_name
from .onnx_vision import OnnxImageEncoder, graph_name
from .options import RuntimeOptions
from .policy import uses_int8, uses_onnx

log = logging.getLogger(__name__)

ImageEncoder = Callable[[torch.Tensor], ImageFeatures]  # pixels (B, 3, S, S) -> ImageFeatures


def _device(module: nn.Module) -> torch.device:
    """Where ``module``'s weights are; a module with none (e.g. a CNN's layers after those another model shares
    with it, where nothing is left but reshaping) runs on the CPU."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


# ONNX Runtime image encoders alive in this process, by (cache folder, graph file, threads): pipelines whose encoders
# compute the same graph share one session instead of holding ~20 MB each (in the server, the tagger's backbone and
# the retriever's frozen EfficientNet-Lite0 are the same graph). The sessions are read-only; an entry goes with the
# last pipeline that holds it.
_ONNX_ENCODERS: "weakref.WeakValueDictionary[Tuple[str, str, int], OnnxImageEncoder]" = weakref.WeakValueDictionary()
_ONNX_ENCODERS_LOCK = threading.Lock()


def onnx_image_encoder(encoder: VisionEncoder, cache: GraphCache) -> OnnxImageEncoder:
    """The ONNX Runtime copy of ``encoder``: one already made in this process from the same graph (the same class,
    input size and weights) in the same cache folder with the same thread count, else a new one."""
    key = (str(cache.folder), graph_name(encoder), torch.get_num_threads())
    with _ONNX_ENCODERS_LOCK:
        shared = _ONNX_ENCODERS.get(key)
        if shared is None:
            shared = _ONNX_ENCODERS[key] = OnnxImageEncoder(encoder, cache)
        return shared


def accelerate_vision(encoder: VisionEncoder, options: RuntimeOptions, cache: GraphCache) -> ImageEncoder:
    """What encodes images for inference: an ONNX Runtime copy of ``encoder`` (``onnx_image_encoder``: shared with
    any other pipeline whose encoder is the same graph) where ``options`` and the policy choose ONNX Runtime and
    the export works, else ``encoder`` itself. An export failure falls back to PyTorch with a warning, or raises
    ConfigError where ONNX Runtime was asked for (``onnx=True``)."""
    if not uses_onnx(options, _device(encoder)):
        return encoder
    try:
        return onnx_image_encoder(encoder, cache)
    except Exception as exc:  # noqa: BLE001 — an exporter or runtime limitation: the PyTorch encoder still works
        if options.onnx:
            raise ConfigError(f"could not run the image encoder with ONNX Runtime: {exc}") from exc
        log.warning("image encoder: ONNX Runtime export failed (%s); using PyTorch", exc)
        return encoder


def accelerate_decoder(decoder: nn.Module, options: RuntimeOptions, cache: GraphCache) -> nn.Module:
    """The copy of ``decoder`` that decoding runs on (``inference_decoder``: fused q/k/v, int8 linear layers where
    ``options`` and the policy choose them, its step compiled by TorchScript where that covers the architecture),
    with the int8 step in ONNX Runtime where the policy chooses it and its export covers the architecture.
    ``decoder`` itself stays as trained."""
    device = _device(decoder)
    int8 = uses_int8(options, device)
    fast = inference_decoder(decoder, int8=int8)
    if int8 and uses_onnx(options, device):
        fast = onnx_step_decoder(fast, decoder, options.onnx, cache)
    return fast


def backend(accelerated, images: int = 1) -> str:
    """What runs ``accelerated`` (what ``accelerate_vision`` or ``accelerate_decoder`` returned) for a batch of
    ``images`` images: "onnxruntime", "torchscript", or "torch" (a PyTorch module, eagerly)."""
    backend_for = getattr(accelerated, "backend_for", None)
    return backend_for(images) if backend_for is not None else "torch"


class Runtime:
    """One pipeline's inference copies of its modules: ``image_encoder`` for ``vision``, ``decoder`` for
    ``decoder`` (either may be left out). Each is made on first use (saving a model never needs them) and once,
    whichever thread asks first; the modules themselves stay as trained, for training, saving and attention maps.

    >>> runtime = Runtime(RuntimeOptions(), vision=model.vision, decoder=model.decoder)
    >>> runtime.image_encoder(pixels)     # ImageFeatures, from ONNX Runtime on a CPU
    >>> runtime.backends(images=1)         # {"image_encoder": "onnxruntime", "decoding_step": "onnxruntime"}
    """

    def __init__(self, options: RuntimeOptions, vision: Optional[VisionEncoder] = None,
                 decoder: Optional[nn.Module] = None):
        self.options = options
        self.cache = GraphCache(options.cache_dir)
        self._vision, self._decoder = vision, decoder
        self._image_encoder: Optional[ImageEncoder] = None
        self._decoding_copy: Optional[nn.Module] = None
        self._lock = threading.Lock()

    @property
    def image_encoder(self) -> ImageEncoder:
        """What encodes images for inference (``accelerate_vision``)."""
        with self._lock:
            if self._image_encoder is None:
                self._image_encoder = accelerate_vision(self._vision, self.options, self.cache)
            return self._image_encoder

    @property
    def decoder(self) -> nn.Module:
        """The copy of the decoder that decoding runs on (``accelerate_decoder``)."""
        with self._lock:
            if self._decoding_copy is None:
                self._int8 = uses_int8(self.options, _device(self._decoder))
                self._decoding_copy = accelerate_decoder(self._decoder, self.options, self.cache)
            return self._decoding_copy

    @property
    def decodes_int8(self) -> bool:
        """Whether the decoding copy's linear layers are int8 (their activations then get one scale per call, so a
        batch's rows affect each other's words). Asked of the copy as it was made: the decoder's own weights may
        since have been dropped."""
        return self._decoder is not None and (self.decoder is not None) and self._int8

    def build(self) -> None:
        """Make the inference copies now (a server: before its first request, not during it)."""
        self.backends()

    def backends(self, images: int = 1) -> Dict[str, str]:
        """What runs each part for a batch of ``images`` images: {"image_encoder": ..., "decoding_step": ...}, each
        "onnxruntime", "torchscript" or "torch" (``backend``); only the parts this runtime has. Makes the copies."""
        out = {}
        if self._vision is not None:
            out["image_encoder"] = backend(self.image_encoder, images)
        if self._decoder is not None:  # an int8 copy decodes an image at a time (``decodes_int8``)
            out["decoding_step"] = backend(self.decoder, 1 if self.decodes_int8 else images)
        return out

    def graphs_to_build(self) -> List[str]:
        """The ONNX Runtime graphs that making the copies would export now, not being in the cache folder yet:
        "image encoder" and/or "decoding step". Empty where ONNX Runtime is not used, the copies are made, or
        there is no cache folder (each process then exports in memory). A server can export them in a child
        process first, so that the exporter's memory never enters its own."""
        if self.cache.folder is None:
            return []
        todo = []
        vision, decoder = self._vision, self._decoder
        if (vision is not None and self._image_encoder is None and uses_onnx(self.options, _device(vision))
                and not self.cache.contains(graph_name(vision))):
            todo.append("image encoder")
        if (decoder is not None and self._decoding_copy is None and covers(decoder)
                and uses_int8(self.options, _device(decoder)) and uses_onnx(self.options, _device(decoder))
                and not self.cache.contains(step_graph_name(decoder))):
            todo.append("decoding step")
        return todo

    def drop_replaced_weights(self) -> int:
        """Free the PyTorch weights that inference no longer reads once the copies are made: the decoder's
        (decoding runs on a copy) and, where ONNX Runtime encodes images, the vision encoder's (~29 MB for
        flickr8k-caption). For a process that only runs inference, such as the server: the modules keep their
        shapes on the "meta" device, not their values. Returns the bytes freed."""
        self.build()
        parts = [self._decoder] if self._decoder is not None else []
        if self._vision is not None and backend(self.image_encoder) != "torch":
            parts.append(self._vision)
        freed = sum(t.numel() * t.element_size() for part in parts
                    for t in list(part.parameters()) + list(part.buffers()) if t.device.type != "meta")
        for part in parts:
            part.to("meta")  # no storage: the tensors keep their shapes, not their values
        return freed
