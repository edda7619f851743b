"""The decoding copy of a decoder: what every fast path starts from."""
from __future__ import annotations

import copy

from torch import nn

from ..nn.layers import TransformerBlock

from .int8 import int8_linears
from .torchscript import scripted_decoder


def inference_decoder(decoder: nn.Module, int8: bool = True, script: bool = True) -> nn.Module:
    """A copy of ``decoder`` arranged for decoding; the same function (tests compare them). At batch 1 a CPU
    decoding step is bound by the number of small operations and the Python around them:

    - each self-attention step projects queries, keys and values with one matrix (``fuse_qkv``);
    - with ``int8`` (CPU only) the ``nn.Linear`` layers run int8 (dynamic quantization): decoding is also
      bound by reading weights (~14 MB per word in float32); on Flickr8k val the captions are the same or
      nearly so (benchmarks/results/caption_quality.json measures this path);
    - with ``script``, the step runs compiled by TorchScript where ``vlfuse.runtime.torchscript`` covers the
      architecture (Transformer decoder over cross-attention fusion): ~4x faster per step.
    """
    fast = copy.deepcopy(decoder).eval()
    for module in fast.modules():
        if isinstance(module, TransformerBlock):
            module.self_attn.fuse_qkv()
    if int8:
        fast = int8_linears(fast)
    return scripted_decoder(fast) if script else fast
