"""Small building blocks shared by fusion modules and decoders."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(t: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where attention is allowed (a position sees itself and the past)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class MultiHeadAttention(nn.Module):
    """Multi-head attention; returns head-averaged weights (B, T, S) when asked (for attention maps)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def keys_values(self, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, D) -> keys, values (B, H, S, hd); computed once and cached when decoding."""
        b, s, _ = memory.shape
        k, v = self.kv(memory).view(b, s, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow: Optional[torch.Tensor] = None,
               need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, T, D) attends to precomputed keys/values (B, H, S, hd). Keys/values may also come once per
        image for ``g`` consecutive rows of x each (beams or samples of one image: B = B_img * g); the rows'
        queries then attend together, with no mask."""
        b, t, d = x.shape
        g = b // k.shape[0]
        if g > 1:
            assert allow is None and not need_weights and b == g * k.shape[0], "grouped rows attend unmasked"
            q = self.q(x).view(b // g, g * t, self.num_heads, self.head_dim).transpose(1, 2)  # (B_img, H, gT, hd)
            y = F.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(b, t, d)), None
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if not need_weights:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allow,
                                               dropout_p=self.dropout if self.training else 0.0)
            weights = None
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, S)
            if allow is not None:
                scores = scores.masked_fill(~allow, float("-inf"))
            attn = scores.softmax(-1)
            weights = attn.mean(1)  # (B, T, S)
            y = F.dropout(attn, self.dropout, self.training) @ v
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.out(y), weights

    def forward(self, x: torch.Tensor, memory: torch.Tensor, allow: Optional[torch.Tensor] = None,
                need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, T, D) attends to memory (B, S, D); ``allow`` broadcasts to (B, 1, T, S), True = may attend."""
        k, v = self.keys_values(memory)
        return self.attend(x, k, v, allow, need_weights)

    def fuse_qkv(self) -> None:
        """Inference only: a self-attention step (``step_qkv``) projects queries, keys and values of its input with
        one matrix instead of two (``q`` and ``kv`` stay for whole-sequence forwards over image cells)."""
        # the throwaway random init must not advance the global RNG (building a Captioner during training
        # would change the run's random stream); "meta" tensors would avoid it at ~35 MB of imports
        with torch.random.fork_rng(devices=[]):
            qkv = nn.Linear(self.q.in_features, 3 * self.q.out_features, device=self.q.weight.device)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([self.q.weight, self.kv.weight]))
            qkv.bias.copy_(torch.cat([self.q.bias, self.kv.bias]))
        self.qkv = qkv

    def step_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> queries, keys, values (B, H, T, hd) each."""
        b, t, _ = x.shape
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            return q, k, v
        k, v = self.keys_values(x)
        return self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2), k, v

    def attend_q(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Projected queries (B, H, T, hd) attend to keys/values (B, H, S, hd), unmasked -> (B, T, D)."""
        b, _, t, _ = q.shape
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to a memory, MLP."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1, cross: bool = False, mlp_ratio: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.cross = cross
        if cross:
            self.ln_c = nn.LayerNorm(dim)
            self.cross_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allow: Optional[torch.Tensor] = None, memory: Optional[torch.Tensor] = None,
                memory_allow: Optional[torch.Tensor] = None, need_weights: bool = False,
                memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """x (B, T, D) -> (B, T, D), plus the cross-attention (or self-attention) weights if asked.
        Cross-attention reads ``memory`` (B, S, D), or its precomputed ``cross_attn.keys_values`` in ``memory_kv``."""
        h = self.ln1(x)
        a, w_self = self.self_attn(h, h, allow, need_weights and not self.cross)
        x = x + self.drop(a)
        w = w_self
        if self.cross:
            kv = memory_kv if memory_kv is not None else self.cross_attn.keys_values(memory)
            a, w = self.cross_attn.attend(self.ln_c(x), *kv, memory_allow, need_weights)
            x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, w


    def step(self, x: torch.Tensor, cache: Dict[str, torch.Tensor], prefix: str,
             memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
             prefix_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Incremental decoding of one new position x (B, 1, D). Self-attention keys/values of earlier
        positions live in ``cache[prefix + 'k'/'v']`` (B, H, t, hd) and are extended in place of the dict;
        ``memory_kv`` are the cross-attended memory's keys/values, which may come once per image for all of
        its rows (see ``MultiHeadAttention.attend``); ``prefix_kv`` are extra always-visible keys/values (the
        image cells of a joint model)."""
        h = self.ln1(x)
        q, k_new, v_new = self.self_attn.step_qkv(h)
        if prefix + "k" in cache:
            k_new = torch.cat([cache[prefix + "k"], k_new], 2)
            v_new = torch.cat([cache[prefix + "v"], v_new], 2)
        cache[prefix + "k"], cache[prefix + "v"] = k_new, v_new
        k, v = k_new, v_new
        if prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], 2), torch.cat([prefix_kv[1], v], 2)
        x = x + self.self_attn.attend_q(q, k, v)
        if self.cross:
            x = x + self.cross_attn.attend(self.ln_c(x), *memory_kv)[0]
        return x + self.mlp(self.ln2(x))


def text_allow(mask: Optional[torch.Tensor], t: int, causal: bool, device) -> Optional[torch.Tensor]:
    """Self-attention permission (B or 1, 1, T, T) from a key padding mask (B, T) and causality."""
    allow = causal_mask(t, device)[None, None] if causal else None
    if mask is not None:
        pad = mask[:, None, None, :].bool()  # (B, 1, 1, T)
        allow = pad if allow is None else (allow & pad)
        # a fully padded query row would give NaN; let it see itself
        allow = allow | torch.eye(t, dtype=torch.bool, device=device)[None, None]
    return allow
