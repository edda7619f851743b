"""Acceleration, in one place: the fast copies of plain PyTorch modules that every pipeline's inference runs on.

The interface (``vlfuse.runtime.accelerate``): ``RuntimeOptions`` say which fast paths a pipeline may take and
where exported graphs are cached; ``Runtime`` holds one pipeline's copies and reports which backend runs them;
``accelerate_vision`` / ``accelerate_decoder`` make a single copy and ``backend`` names what runs it. Below it:
the policy that chooses a backend (``policy``), the graph cache (``cache``), and the backends — TorchScript
(``torchscript``), ONNX Runtime (``onnx_vision``, ``onnx_step``), int8 linear layers (``int8``), the decoding copy
(``decoder``).

A new backend is a module here whose copy is called like the module it stands in for (an image encoder: pixels ->
ImageFeatures; a decoder: ``init_state`` / ``step`` / ``per_image_state``) and says what runs it
(``backend_for(images)``); ``accelerate_vision`` or ``accelerate_decoder`` makes it where ``policy`` chooses it,
and graphs it exports go through ``cache.GraphCache``. Pipelines need no change.
"""
from .accelerate import Runtime, accelerate_decoder, accelerate_vision, backend
from .cache import DEFAULT_CACHE_DIR, GraphCache
from .options import RuntimeOptions

__all__ = ["DEFAULT_CACHE_DIR", "GraphCache", "Runtime", "RuntimeOptions", "accelerate_decoder", "accelerate_vision",
           "backend"]
