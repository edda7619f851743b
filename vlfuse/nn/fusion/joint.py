"""Joint fusion: image tokens and text tokens in one self-attention stack (the "[x; y]" prefix model)."""
from typing import Dict, Optional

import torch
from torch import nn

from ...registry import FUSIONS
from ..layers import TransformerBlock, causal_mask
from ..vision import ImageFeatures
from .base import Fusion, FusionOutput, GridPositions


@FUSIONS.register("joint")
class JointFusion(Fusion):
    """Self-attention over [image cells ; text tokens]: image cells see each other, text sees all image
    cells and (causally, when generating) the text before it. Returns the text positions."""

    uses_grid = True

    def __init__(self, image_dim: int, text_dim: int, dim: int = 512, num_layers: int = 3, num_heads: int = 8,
                 dropout: float = 0.1):
        super().__init__()
        self.out_dim = dim
        self.grid = GridPositions(image_dim, dim)
        self.text_in = nn.Linear(text_dim, dim) if text_dim != dim else nn.Identity()
        self.type_embed = nn.Parameter(torch.zeros(2, dim))  # 0: image, 1: text
        nn.init.normal_(self.type_embed, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def _allow(self, n: int, t: int, text_mask: Optional[torch.Tensor], causal: bool, device) -> torch.Tensor:
        allow = torch.zeros(n + t, n + t, dtype=torch.bool, device=device)
        allow[:n, :n] = True  # image -> image
        allow[n:, :n] = True  # text -> image
        allow[n:, n:] = causal_mask(t, device) if causal else True
        allow = allow[None, None]  # (1, 1, N+T, N+T)
        if text_mask is not None:
            keys = torch.cat([torch.ones(text_mask.shape[0], n, dtype=torch.bool, device=device),
                              text_mask.bool()], 1)  # (B, N+T)
            allow = allow & keys[:, None, None, :]
        return allow

    def forward(self, image: ImageFeatures, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                causal: bool = False, need_weights: bool = False) -> FusionOutput:
        img = self.grid(image.grid) + self.type_embed[0]  # (B, N, dim)
        txt = self.text_in(text) + self.type_embed[1]  # (B, T, dim)
        n, t = img.shape[1], txt.shape[1]
        x = torch.cat([img, txt], 1)  # (B, N+T, dim)
        allow = self._allow(n, t, text_mask, causal, x.device)
        weights = None
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x, w = block(x, allow, need_weights=need_weights and last)
            if last and w is not None:
                weights = w[:, n:, :n]  # text -> image part, (B, T, N)
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        return FusionOutput(self.norm(x[:, n:]), weights)

    def init_cache(self, image: ImageFeatures) -> Dict[str, torch.Tensor]:
        # Image cells never attend to text, so their keys/values at every layer depend on the image alone: they
        # start each layer's self-attention cache, which the text positions extend.
        x = self.grid(image.grid) + self.type_embed[0]  # (B, N, dim)
        cache = {}
        for i, block in enumerate(self.blocks):
            cache[f"j{i}sk"], cache[f"j{i}sv"] = block.self_attn.keys_values(block.ln1(x))
            x, _ = block(x)
        return cache

    def step(self, x: torch.Tensor, state: Dict[str, torch.Tensor]) -> FusionOutput:
        x = self.text_in(x) + self.type_embed[1]
        for i, block in enumerate(self.blocks):
            x, state[f"j{i}sk"], state[f"j{i}sv"] = block.step(x, state[f"j{i}sk"], state[f"j{i}sv"])
        return FusionOutput(self.norm(x))
