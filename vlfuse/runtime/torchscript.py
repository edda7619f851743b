"""A TorchScript decoding step for the Transformer decoder over cross-attention fusion (the shipped captioner).

At batch 1 a decoding step is ~100 small operations, and on a CPU the Python around each of them (module calls,
argument parsing, dispatch) costs more than the arithmetic: run by TorchScript's interpreter the same step is
~4x faster. This module re-expresses ``TransformerDecoder.step`` -> ``CrossAttentionFusion.step`` ->
``TransformerBlock.step`` over the *same* submodules (no weights are copied) in the subset of Python that
TorchScript compiles; ``tests/test_parts.py`` checks that it returns exactly what the eager step returns, and
``inference_decoder`` uses it only for the architectures it covers (``supports``), so anything else decodes
through the eager step unchanged. The state dict keeps the eager step's keys, so beam search reorders it as usual.
"""
from __future__ import annotations

import warnings
from typing import Dict, FrozenSet, Tuple

import torch
import torch.nn.functional as F
from torch import nn

State = Dict[str, torch.Tensor]


class _BlockStep(nn.Module):
    """One ``TransformerBlock.step`` (self-attention with a growing key/value cache, optional cross-attention to
    per-image keys/values shared by ``g`` consecutive rows, MLP) for a block whose self-attention has ``qkv``."""

    def __init__(self, block: nn.Module, prefix: str, memory_prefix: str):
        super().__init__()
        attn = block.self_attn
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.ln1, self.qkv, self.self_out = block.ln1, attn.qkv, attn.out
        self.cross = bool(block.cross)
        self.ln_c = block.ln_c if self.cross else nn.Identity()
        self.cross_q = block.cross_attn.q if self.cross else nn.Identity()
        self.cross_out = block.cross_attn.out if self.cross else nn.Identity()
        self.ln2, self.fc1, self.act, self.fc2 = block.ln2, block.mlp[0], block.mlp[1], block.mlp[3]
        self.k_key, self.v_key = prefix + "k", prefix + "v"
        self.mk_key, self.mv_key = memory_prefix + "k", memory_prefix + "v"

    def forward(self, x: torch.Tensor, state: Dict[str, torch.Tensor]) -> torch.Tensor:
        b, t, d = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, t, hd)
        if self.k_key in state:
            k = torch.cat([state[self.k_key], k], 2)
            v = torch.cat([state[self.v_key], v], 2)
        state[self.k_key] = k
        state[self.v_key] = v
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.self_out(y)
        if self.cross:
            mk, mv = state[self.mk_key], state[self.mv_key]  # (B_img, H, S, hd)
            n = mk.shape[0]
            g = b // n  # rows (beams/samples) per image
            q = self.cross_q(self.ln_c(x)).view(n, g * t, self.num_heads, self.head_dim).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, mk, mv).transpose(1, 2).reshape(b, t, d)
            x = x + self.cross_out(y)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class ScriptableCrossAttentionStep(nn.Module):
    """``TransformerDecoder.step`` for a decoder whose fusion is ``cross-attention``: tokens (B, t) and the state
    -> (log-probabilities (B, V), the state with this position's keys/values appended)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        fusion = decoder.fusion
        self.embed, self.pos, self.scale = decoder.embed, decoder.pos, float(decoder.embed.embedding_dim ** 0.5)
        self.text_in, self.fusion_norm, self.fusion_out = fusion.text_in, fusion.norm, decoder.fusion_out
        self.fusion_blocks = nn.ModuleList(_BlockStep(b, f"x{i}s", f"x{i}m") for i, b in enumerate(fusion.blocks))
        self.blocks = nn.ModuleList(_BlockStep(b, f"d{i}s", "") for i, b in enumerate(decoder.blocks))
        self.norm, self.out = decoder.norm, decoder.out

    def forward(self, tokens: torch.Tensor, state: Dict[str, torch.Tensor]
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        t = tokens.shape[1] - 1
        x = self.embed(tokens[:, -1:]) * self.scale + self.pos[t:t + 1]  # (B, 1, D)
        state = state.copy()
        x = self.text_in(x)
        for block in self.fusion_blocks:
            x = block(x, state)
        x = self.fusion_out(self.fusion_norm(x))
        for block in self.blocks:
            x = block(x, state)
        return F.log_softmax(self.out(self.norm(x))[:, -1], -1), state


def supports(decoder: nn.Module) -> bool:
    """Whether ``ScriptableCrossAttentionStep`` covers this decoder (after ``fuse_qkv``)."""
    from ..nn.decoders import TransformerDecoder
    from ..nn.fusion.cross_attention import CrossAttentionFusion

    return (isinstance(decoder, TransformerDecoder) and isinstance(decoder.fusion, CrossAttentionFusion)
            and all(hasattr(b.self_attn, "qkv") for b in list(decoder.fusion.blocks) + list(decoder.blocks)))


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
            self.scripted_step = torch.jit.script(ScriptableCrossAttentionStep(decoder))

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
            return self.scripted_step(tokens, state)



def scripted_decoder(decoder: nn.Module) -> nn.Module:
    """The decoder with its step compiled by TorchScript where ``vlfuse.runtime.torchscript`` covers it."""

    if not supports(decoder):
        return decoder
    try:
        return ScriptedDecoder(decoder)
    except Exception as exc:  # noqa: BLE001 — a torch without TorchScript still decodes, eagerly
        warnings.warn(f"decoding step not compiled by TorchScript ({exc}); decoding eagerly")
        return decoder
