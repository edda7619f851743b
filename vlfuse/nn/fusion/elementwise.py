"""Element-wise fusions: add and multiply projected image and text vectors (easy-VQA's baseline is ``mul``)."""
from typing import Optional

import torch
from torch import nn

from ...registry import FUSIONS
from ..vision import ImageFeatures
from .base import Fusion, FusionOutput


class _ElementwiseFusion(Fusion):
    def __init__(self, image_dim: int, text_dim: int, dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.out_dim = dim
        self.image_proj = nn.Sequential(nn.Linear(image_dim, dim), nn.Tanh())
        self.text_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.Tanh())
        self.drop = nn.Dropout(dropout)

    def combine(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, image: ImageFeatures, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                causal: bool = False, need_weights: bool = False) -> FusionOutput:
        v = self.image_proj(image.pooled)[:, None]  # (B, 1, dim)
        t = self.text_proj(text)  # (B, T, dim)
        return FusionOutput(self.drop(self.combine(v, t)))


@FUSIONS.register("add")
class AddFusion(_ElementwiseFusion):
    """tanh(W_v v) + tanh(W_t t)."""

    def combine(self, v, t):
        return v + t


@FUSIONS.register("mul")
class MulFusion(_ElementwiseFusion):
    """tanh(W_v v) ⊙ tanh(W_t t)."""

    def combine(self, v, t):
        return v * t
