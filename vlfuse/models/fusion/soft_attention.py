"""Soft (additive) attention over the image grid, as in Show, Attend and Tell (Xu et al. 2015)."""
from typing import Optional

import torch
from torch import nn

from ...registry import FUSIONS
from ..vision import ImageFeatures
from .base import Fusion, FusionOutput


@FUSIONS.register("soft-attention")
class SoftAttentionFusion(Fusion):
    """Each text query attends over grid cells (Bahdanau scores); a sigmoid gate scales the context.

    ``doubly_stochastic`` is the weight λ of SAT's regulariser λ · mean_i (1 - Σ_t α_ti)², which pushes
    the decoder to look at every part of the image over a caption.
    """

    uses_grid = True

    def __init__(self, image_dim: int, text_dim: int, dim: int = 512, attn_dim: int = 512,
                 dropout: float = 0.1, doubly_stochastic: float = 1.0, gate: bool = True):
        super().__init__()
        self.out_dim = dim
        self.image_key = nn.Linear(image_dim, attn_dim)
        self.text_key = nn.Linear(text_dim, attn_dim)
        self.score = nn.Linear(attn_dim, 1)
        self.gate = nn.Linear(text_dim, dim) if gate else None
        self.value = nn.Sequential(nn.Linear(image_dim, dim), nn.Dropout(dropout))
        self.doubly_stochastic = doubly_stochastic

    def forward(self, image: ImageFeatures, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                causal: bool = False, need_weights: bool = False) -> FusionOutput:
        keys = self.image_key(image.grid)[:, None]  # (B, 1, N, A)
        queries = self.text_key(text)[:, :, None]  # (B, T, 1, A)
        alpha = self.score(torch.tanh(keys + queries)).squeeze(-1).softmax(-1)  # (B, T, N)
        context = self.value(alpha @ image.grid)  # (B, T, dim)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(text)) * context
        return FusionOutput(context, alpha)

    def regularizer(self, attention: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        if not self.doubly_stochastic:
            return attention.new_zeros(())
        total = (attention * text_mask[..., None]).sum(1)  # (B, N): attention each cell got over the caption
        return self.doubly_stochastic * ((1.0 - total) ** 2).mean()
