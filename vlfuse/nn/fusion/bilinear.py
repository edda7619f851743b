"""Low-rank bilinear pooling (MLB, Kim et al. 2017): W_o (tanh(U v) ⊙ tanh(V t))."""
from typing import Optional

import torch
from torch import nn

from ...registry import FUSIONS
from ..vision import ImageFeatures
from .base import Fusion, FusionOutput


@FUSIONS.register("bilinear")
class BilinearFusion(Fusion):
    """MLB: Hadamard product in a rank-``rank`` joint space, projected to ``dim``."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 512, rank: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.out_dim = dim
        self.u = nn.Sequential(nn.Dropout(dropout), nn.Linear(image_dim, rank), nn.Tanh())
        self.v = nn.Sequential(nn.Dropout(dropout), nn.Linear(text_dim, rank), nn.Tanh())
        self.out = nn.Sequential(nn.Linear(rank, dim), nn.GELU())

    def forward(self, image: ImageFeatures, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                causal: bool = False, need_weights: bool = False) -> FusionOutput:
        joint = self.u(image.pooled)[:, None] * self.v(text)  # (B, T, rank)
        return FusionOutput(self.out(joint))
