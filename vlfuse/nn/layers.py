"""Small building blocks shared by fusion modules and decoders.

``TransformerBlock.forward`` runs a whole sequence (training, attention maps); ``TransformerBlock.step`` runs one
new position of an incremental decode. Both are made of the same pieces (``MultiHeadAttention``'s projections and
``attend``, the block's MLP). The step is also what the decoding fast paths run — ``vlfuse.runtime.torchscript``
compiles it with TorchScript and ``vlfuse.runtime.onnx_step`` exports it to ONNX — so the methods it calls are
written in the subset of Python both accept: typed arguments, no ``*args``, optional submodules tested with
``is None``, and for one position reshapes with ``-1`` and constants, which export without shape computations.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(t: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where attention is allowed (a position sees itself and the past)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class MultiHeadAttention(nn.Module):
    """Multi-head attention in pieces that whole-sequence forwards and decoding steps share: projections
    (``queries`` and ``keys_values`` for sequences, ``step_qkv`` and ``step_queries`` for one new position) and
    ``attend``, which also returns head-averaged weights (B, T, S) when asked (for attention maps)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)  # given to the attention kernel: a constant in exported graphs
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout
        self.qkv: Optional[nn.Module] = None  # decoding copies: q and kv as one matrix (``fuse_qkv``)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> queries (B, H, T, hd)."""
        b, t, _ = x.shape
        return self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, D) -> keys, values (B, H, S, hd); computed once and cached when decoding."""
        b, s, _ = memory.shape
        kv = self.kv(memory).view(b, s, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: int,
               allow: Optional[torch.Tensor] = None, need_weights: bool = False, dropout: float = 0.0
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Queries (B, H, T, hd) attend to keys/values (B, H, S, hd) -> (the heads merged and projected, ``positions``
        to a row, the head-averaged weights (B, T, S) if asked). ``positions`` = T gives (B, T, D); a decoding step
        passes the T rows of one image together (they share its keys/values) and takes (B·T, 1, D) with 1.
        ``allow`` broadcasts to (B, H, T, S), True = may attend."""
        weights: Optional[torch.Tensor] = None
        if need_weights:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, S)
            if allow is not None:
                scores = scores.masked_fill(~allow, float("-inf"))
            attn = scores.softmax(-1)
            weights = attn.mean(1)  # (B, T, S)
            y = F.dropout(attn, dropout) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, allow, dropout, scale=self.scale)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(-1, positions, self.dim)), weights

    def forward(self, x: torch.Tensor, memory: torch.Tensor, allow: Optional[torch.Tensor] = None,
                need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, T, D) attends to memory (B, S, D) -> (B, T, D); ``allow`` broadcasts to (B, 1, T, S)."""
        k, v = self.keys_values(memory)
        dropout = self.dropout if self.training else 0.0
        return self.attend(self.queries(x), k, v, x.shape[1], allow, need_weights, dropout)

    def fuse_qkv(self) -> None:
        """Inference only: a decoding step (``step_qkv``) projects queries, keys and values of its input with one
        matrix instead of two (``q`` and ``kv`` stay for whole-sequence forwards over image cells)."""
        # the throwaway random init must not advance the global RNG (building a Captioner during training
        # would change the run's random stream); "meta" tensors would avoid it at ~35 MB of imports
        with torch.random.fork_rng(devices=[]):
            qkv = nn.Linear(self.q.in_features, 3 * self.q.out_features, device=self.q.weight.device)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([self.q.weight, self.kv.weight]))
            qkv.bias.copy_(torch.cat([self.q.bias, self.kv.bias]))
        self.qkv = qkv

    def step_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One position x (B, 1, D) -> its query, key and value (B, H, 1, hd) each. With one position, (B, 1, D)
        is laid out as (B, H, 1, hd) already: a reshape, no transpose."""
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self.dim, -1)
        else:
            q = self.q(x)
            k, v = self.kv(x).split(self.dim, -1)
        shape = (-1, self.num_heads, 1, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def step_queries(self, x: torch.Tensor, images: int) -> torch.Tensor:
        """One position x (B, 1, D) of rows that come ``g`` = B / ``images`` to an image (its beams or samples,
        consecutive) -> queries (images, H, g, hd), which attend together to the image's keys/values."""
        return self.q(x).reshape(images, -1, self.num_heads, self.head_dim).transpose(1, 2)


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to a memory, MLP."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1, cross: bool = False, mlp_ratio: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout)
        # None without cross-attention: TorchScript then leaves out the code that reads them
        self.ln_c: Optional[nn.LayerNorm] = nn.LayerNorm(dim) if cross else None
        self.cross_attn: Optional[MultiHeadAttention] = MultiHeadAttention(dim, num_heads, dropout) if cross else None
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allow: Optional[torch.Tensor] = None,
                memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, need_weights: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A whole sequence x (B, T, D) -> (B, T, D), plus the cross-attention (or, without, the self-attention)
        weights (B, T, S) if asked. ``allow`` (B or 1, 1, T, T): self-attention permission; ``memory_kv``: the
        cross-attended memory's keys/values (B, H, S, hd) (``cross_attn.keys_values``)."""
        h = self.ln1(x)
        a, weights = self.self_attn(h, h, allow, need_weights and self.cross_attn is None)
        x = x + self.drop(a)
        if self.cross_attn is not None and self.ln_c is not None:
            assert memory_kv is not None, "a cross-attention block reads a memory"
            q = self.cross_attn.queries(self.ln_c(x))
            dropout = self.cross_attn.dropout if self.training else 0.0
            a, weights = self.cross_attn.attend(q, memory_kv[0], memory_kv[1], x.shape[1], None, need_weights,
                                                dropout)
            x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln2(x))), weights

    def step(self, x: torch.Tensor, past_k: Optional[torch.Tensor], past_v: Optional[torch.Tensor],
             memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new position x (B, 1, D) of an incremental decode, given the self-attention keys/values of the
        positions before it (B, H, t, hd; None before the first word; a joint model's image cells come first)
        -> (B, 1, D) and the keys/values with this position's appended (B, H, t + 1, hd). ``memory_kv``: the
        cross-attended memory's keys/values, once per image (B_img, H, S, hd) for its B / B_img rows. Decoding
        applies no dropout (each call would cost the compiled step ~1 %)."""
        q, k, v = self.self_attn.step_qkv(self.ln1(x))  # (B, H, 1, hd) each
        if past_k is not None and past_v is not None:
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        x = x + self.self_attn.attend(q, k, v, 1)[0]
        if self.cross_attn is not None and self.ln_c is not None:
            assert memory_kv is not None, "a cross-attention block reads a memory"
            memory_k, memory_v = memory_kv
            q = self.cross_attn.step_queries(self.ln_c(x), memory_k.shape[0])  # (B_img, H, g, hd)
            x = x + self.cross_attn.attend(q, memory_k, memory_v, 1)[0]
        return x + self.mlp[3](self.mlp[1](self.mlp[0](self.ln2(x)))), k, v  # the MLP, without its dropout


def text_allow(mask: Optional[torch.Tensor], t: int, causal: bool, device) -> Optional[torch.Tensor]:
    """Self-attention permission (B or 1, 1, T, T) from a key padding mask (B, T) and causality."""
    allow = causal_mask(t, device)[None, None] if causal else None
    if mask is not None:
        pad = mask[:, None, None, :].bool()  # (B, 1, 1, T)
        allow = pad if allow is None else (allow & pad)
        # a fully padded query row would give NaN; let it see itself
        allow = allow | torch.eye(t, dtype=torch.bool, device=device)[None, None]
    return allow
