"""Pooling a grid of image cells into one vector, and projection heads into a shared space."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..errors import ConfigError


class AttentionPool(nn.Module):
    """Attention pooling over grid cells: (B, N, C) -> (B, C), plus the mean for stability.

    Each of ``num_heads`` heads scores the cells with a learned linear map and averages its own slice
    of the channels with those weights (multi-head attention with a learned query and identity values).
    Costs ~C*heads per cell instead of the C*C of a full key/value projection, which matters on a CPU.
    """

    def __init__(self, in_dim: int, num_heads: int, cell_dropout: float = 0.0):
        super().__init__()
        self.cell_dropout = cell_dropout
        if in_dim % num_heads:
            raise ConfigError(f"pool_heads ({num_heads}) must divide the image feature size {in_dim}")
        self.num_heads = num_heads
        # No affine part: the score and projection layers absorb it, and a parameter-free normalisation lets
        # training precompute the normalised cells once (see ``normalize``).
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.score = nn.Linear(in_dim, num_heads)

    def normalize(self, grid: torch.Tensor) -> torch.Tensor:
        return self.norm(grid)

    def forward(self, grid: torch.Tensor, normalized: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """grid (B, N, C) -> pooled (B, C) and the attention (B, N, heads)."""
        x = grid if normalized else self.norm(grid)  # (B, N, C)
        b, n, c = x.shape
        scores = self.score(x)  # (B, N, H)
        if self.training and self.cell_dropout > 0:
            keep = torch.rand(b, n, 1, device=x.device) >= self.cell_dropout
            keep[:, 0] |= ~keep.any(1)  # at least one cell survives
            scores = scores.masked_fill(~keep, float("-inf"))
            mean = (x * keep).sum(1) / keep.sum(1)
        else:
            mean = x.mean(1)
        attn = scores.softmax(1)
        heads = x.view(b, n, self.num_heads, c // self.num_heads)  # (B, N, H, C/H)
        pooled = torch.einsum("bnh,bnhd->bhd", attn, heads).reshape(b, c)  # (B, C)
        return pooled + mean, attn


class Projection(nn.Module):
    """Linear map plus a residual MLP: (B, in) -> (B, out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)
