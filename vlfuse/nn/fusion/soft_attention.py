"""Soft (additive) attention over the image grid, as in Show, Attend and Tell (Xu et al. 2015)."""
from typing import Dict, Optional

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
        self.value = nn.Linear(image_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.doubly_stochastic = doubly_stochastic

    def init_cache(self, image: ImageFeatures) -> Dict[str, torch.Tensor]:
        # Keys and values of the grid do not depend on the query: project them once per image.
        return {"sa_keys": self.image_key(image.grid), "sa_values": self.value(image.grid)}  # (B, N, A), (B, N, dim)

    def attend(self, text: torch.Tensor, cache: Dict[str, torch.Tensor]) -> FusionOutput:
        scores = self.score(torch.tanh(cache["sa_keys"][:, None] + self.text_key(text)[:, :, None]))  # (B, T, N, 1)
        alpha = scores.squeeze(-1).softmax(-1)  # (B, T, N)
        context = self.drop(alpha @ cache["sa_values"])  # (B, T, dim); = value(alpha @ grid) since sum(alpha) = 1
        if self.gate is not None:
            context = torch.sigmoid(self.gate(text)) * context
        return FusionOutput(context, alpha)

    def forward(self, image: ImageFeatures, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                causal: bool = False, need_weights: bool = False) -> FusionOutput:
        return self.attend(text, self.init_cache(image))

    def step(self, x: torch.Tensor, state: Dict[str, torch.Tensor]) -> FusionOutput:
        return self.attend(x, state)

    def regularizer(self, attention: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        if not self.doubly_stochastic:
            return attention.new_zeros(())
        total = (attention * text_mask[..., None]).sum(1)  # (B, N): attention each cell got over the caption
        return self.doubly_stochastic * ((1.0 - total) ** 2).mean()
