"""The decoding step compiled by TorchScript.

At batch 1 a decoding step is ~100 small operations, and on a CPU the Python around each of them (module calls,
argument parsing, dispatch) costs more than the arithmetic: run by TorchScript's interpreter the same step is
~4x faster. ``ScriptedDecoder`` compiles the decoder's own ``step`` (``TransformerDecoder.step`` ->
``CrossAttentionFusion.step`` -> ``TransformerBlock.step``, written in the subset of Python TorchScript accepts;
``step`` is marked ``@torch.jit.export``, the training ``forward``s ``@torch.jit.ignore``) over the *same*
submodules: no weights are copied and nothing is restated, so the compiled step computes what the eager one does
(``tests/test_parts.py`` checks it). ``scripted_decoder`` uses it for the architectures it covers
(``supports``); anything else decodes through the eager step unchanged. The state keeps the eager step's entries,
so beam search reorders it as usual.
"""
from __future__ import annotations

import warnings
from typing import Dict, FrozenSet, Tuple

import torch
from torch import nn

from ..nn.decoders import TransformerDecoder
from ..nn.fusion.cross_attention import CrossAttentionFusion

State = Dict[str, torch.Tensor]


def supports(decoder: nn.Module) -> bool:
    """Whether the step of this decoder is compiled: a Transformer decoder over cross-attention fusion (the
    architecture whose step is written for TorchScript; other fusions' steps decode eagerly)."""
    return isinstance(decoder, TransformerDecoder) and isinstance(decoder.fusion, CrossAttentionFusion)


class ScriptedDecoder(nn.Module):
    """A decoder whose ``step`` runs compiled by TorchScript; ``init_state`` and ``per_image_state`` are the
    decoder's own, so ``vlfuse.generation`` drives it like any other decoder."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        with warnings.catch_warnings():
            # TorchScript is marked deprecated in favour of torch.compile, whose C++ compilation takes tens of
            # seconds: too slow for a command-line caption's cold start. If it goes, scripted_decoder falls back.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.scripted = torch.jit.script(decoder)  # its ``step`` (``forward`` is the training pass)
        # The plain interpreter (below) pays for every call of a method or module (~0.4 us; ~60 a step). One flat
        # graph, as TorchScript's optimizing executor would make after its profiling runs: ~8 % faster a step.
        torch._C._jit_pass_inline(self.scripted.step.graph)

    def init_state(self, image) -> State:
        return self.decoder.init_state(image)

    def per_image_state(self) -> FrozenSet[str]:
        return self.decoder.per_image_state()

    def backend_for(self, images: int) -> str:
        """What runs the decoding steps of a batch of ``images`` images (``vlfuse.runtime.backend``)."""
        return "torchscript"

    def step(self, tokens: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        # The plain interpreter (no profiling and re-optimising per new shape, which costs seconds on the first
        # captions and brings nothing here: the CPU has no fuser). The setting is thread-local.
        with torch.jit.optimized_execution(False):
            return self.scripted.step(tokens, state)


def scripted_decoder(decoder: nn.Module) -> nn.Module:
    """The decoder with its step compiled by TorchScript where ``supports`` says so."""
    if not supports(decoder):
        return decoder
    try:
        return ScriptedDecoder(decoder)
    except Exception as exc:  # noqa: BLE001 — a torch without TorchScript still decodes, eagerly
        warnings.warn(f"decoding step not compiled by TorchScript ({exc}); decoding eagerly")
        return decoder
