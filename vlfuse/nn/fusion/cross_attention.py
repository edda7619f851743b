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
        # each block's decoding-state entries: its self-attention keys and values so far, the memory's keys and
        # values (named once: formatting the names at every step would cost the compiled step several per cent)
        self.state_names = tuple((f"x{i}sk", f"x{i}sv", f"x{i}mk", f"x{i}mv") for i in range(num_layers))

    @torch.jit.ignore  # TorchScript compiles ``step`` alone (see ``vlfuse.runtime.torchscript``)
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
        """Grid (B, N, image_dim) -> the cells the text attends to (B, N, dim), followed by the image's extra
        ``tokens`` (B, K, dim) where it has them (B, N + K, dim)."""
        cells = self.grid(image.grid)
        return cells if image.tokens is None else torch.cat([cells, image.tokens.to(cells.dtype)], 1)

    def init_cache(self, image: ImageFeatures) -> Dict[str, torch.Tensor]:
        memory = self.memory(image)
        cache = {}
        for block, (_, _, mk, mv) in zip(self.blocks, self.state_names):
            cache[mk], cache[mv] = block.cross_attn.keys_values(memory)
        return cache

    def per_image_state(self) -> FrozenSet[str]:
        # the prepared image memory is read once per image by all of its rows; the image itself is not read
        return frozenset(["grid", "pooled"] + [name for names in self.state_names for name in names[2:]])

    def step(self, x: torch.Tensor, state: Dict[str, torch.Tensor]) -> FusionOutput:
        x = self.text_in(x)
        for block, (sk, sv, mk, mv) in zip(self.blocks, self.state_names):
            x, state[sk], state[sv] = block.step(x, state.get(sk), state.get(sv), (state[mk], state[mv]))
        return FusionOutput(self.norm(x))
