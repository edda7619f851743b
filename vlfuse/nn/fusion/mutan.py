"""MUTAN (Ben-younes et al. 2017): Tucker-decomposed bilinear fusion; the core tensor is a sum of ``rank``
element-wise products of projected image and text vectors."""
from typing import Optional

import torch
from torch import nn

from ...registry import FUSIONS
from ..vision import ImageFeatures
from .base import Fusion, FusionOutput


@FUSIONS.register("mutan")
class MutanFusion(Fusion):
    """MUTAN: Σ_r (W_v^r tanh(U v)) ⊙ (W_t^r tanh(V t)) over ``rank`` slices, giving ``dim`` outputs."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 512, hidden_dim: int = 310, rank: int = 5,
                 dropout: float = 0.1):
        super().__init__()
        self.out_dim, self.rank = dim, rank
        self.image_in = nn.Sequential(nn.Dropout(dropout), nn.Linear(image_dim, hidden_dim), nn.Tanh())
        self.text_in = nn.Sequential(nn.Dropout(dropout), nn.Linear(text_dim, hidden_dim), nn.Tanh())
        self.image_rank = nn.Linear(hidden_dim, rank * dim)
        self.text_rank = nn.Linear(hidden_dim, rank * dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, image: ImageFeatures, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                causal: bool = False, need_weights: bool = False) -> FusionOutput:
        b, t, _ = text.shape
        v = self.image_rank(self.image_in(image.pooled)).view(b, 1, self.rank, self.out_dim)  # (B, 1, R, dim)
        q = self.text_rank(self.text_in(text)).view(b, t, self.rank, self.out_dim)  # (B, T, R, dim)
        return FusionOutput(self.drop((v * q).sum(2)))  # (B, T, dim)
