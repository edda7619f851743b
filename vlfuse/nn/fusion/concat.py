"""Concatenation fusion: [image ; text] through a linear layer (Show & Tell's injection, VQA's concat baseline)."""
from typing import Optional

import torch
from torch import nn

from ...registry import FUSIONS
from ..vision import ImageFeatures
from .base import Fusion, FusionOutput


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """Pooled image ⊕ text vector -> Linear -> GELU, at every text position."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.out_dim = dim
        self.image_proj = nn.Sequential(nn.Linear(image_dim, dim), nn.Dropout(dropout))
        self.fuse = nn.Sequential(nn.Linear(dim + text_dim, dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, image: ImageFeatures, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                causal: bool = False, need_weights: bool = False) -> FusionOutput:
        v = self.image_proj(image.pooled)[:, None].expand(-1, text.shape[1], -1)  # (B, T, dim)
        return FusionOutput(self.fuse(torch.cat([v, text], -1)))
