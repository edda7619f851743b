"""Cross-attention fusion: Transformer blocks whose text tokens attend to image grid tokens."""
from typing import Dict, FrozenSet, Optional

import torch
from torch import nn

from ...registry import FUSIONS
from ..layers import TransformerBlock, text_allow
from ..vision import ImageFeatures
from .base import Fusion, FusionOutput, GridPositions


@FUSIONS.register("cross-attention")
class CrossAttentionFusion(Fusion):
    """``num_layers`` blocks of (causal) self-attention over text + cross-attention to the grid."""

    uses_grid = True
    accepts_rows = True

    def __init__(self, image_dim: int, text_dim: int, dim: int = 512, num_layers: int = 3, num_heads: int = 8,
                 dropout: float = 0.1):
        super().__init__()
        self.out_dim = dim
        self.grid = GridPositions(image_dim, dim)
        self.text_in = nn.Linear(text_dim, dim) if text_dim != dim else nn.Identity()
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, dropout, cross=True) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: ImageFeatures, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                causal: bool = False, need_weights: bool = False, rows: Optional[torch.Tensor] = None
                ) -> FusionOutput:
        memory = self.memory(image)  # (B_img, N, dim): once per image, however many captions it has
        x = self.text_in(text)  # (B, T, dim)
        allow = text_allow(text_mask, x.shape[1], causal, x.device)
        weights = None
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            kv = block.cross_attn.keys_values(memory)
            if rows is not None:
                kv = tuple(t.index_select(0, rows) for t in kv)  # (B, H, N, hd)
            x, w = block(x, allow, need_weights=need_weights and last, memory_kv=kv)
            weights = w if last else weights
        return FusionOutput(self.norm(x), weights)

    def memory(self, image: ImageFeatures) -> torch.Tensor:
        """Grid (B, N, image_dim) -> the cells the text attends to (B, N, dim)."""
        return self.grid(image.grid)

    def init_cache(self, image: ImageFeatures) -> Dict[str, torch.Tensor]:
        memory = self.memory(image)
        cache = {}
        for i, block in enumerate(self.blocks):
            cache[f"x{i}mk"], cache[f"x{i}mv"] = block.cross_attn.keys_values(memory)
        return cache

    def per_image_state(self) -> FrozenSet[str]:
        # the prepared image memory is read once per image by all of its rows; the image itself is not read
        return frozenset(["grid", "pooled"] + [f"x{i}m{kv}" for i in range(len(self.blocks)) for kv in "kv"])

    def step(self, image: ImageFeatures, x: torch.Tensor, cache: Dict[str, torch.Tensor]) -> FusionOutput:
        x = self.text_in(x)
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache, f"x{i}s", memory_kv=(cache[f"x{i}mk"], cache[f"x{i}mv"]))
        return FusionOutput(self.norm(x))
