"""The interface every fusion module implements, for every task.

A fusion module combines image features with a sequence of text-side query vectors:

    fusion(image: ImageFeatures, text (B, T, text_dim), text_mask (B, T) | None, causal) -> FusionOutput

- captioning (LSTM) calls it once per step with the previous hidden state (T = 1);
- captioning (Transformer) calls it on all token embeddings with ``causal=True``;
- VQA calls it on the question (pooled (B, 1, D) or all tokens with a mask);
- retrieval can use it to pool one modality under the other.

No ``from __future__ import annotations`` here: TorchScript, which compiles decoding steps, reads the class
annotations of the fusion modules it meets (``out_dim: int``) and cannot resolve them as strings.
"""
from typing import Dict, FrozenSet, NamedTuple, Optional

import torch
from torch import nn

from ..vision import ImageFeatures


class FusionOutput(NamedTuple):  # a NamedTuple, not a dataclass: TorchScript compiles decoding steps that return one
    states: torch.Tensor                      # (B, T, out_dim)
    attention: Optional[torch.Tensor] = None  # (B, T, N) weights over image cells, if the module attends


class Fusion(nn.Module):
    """Base class; constructors take ``image_dim``, ``text_dim`` and ``dim`` (the output size) first.

    Training may pair one image with several captions: ``rows`` (B_text,) then says which image row each text
    row belongs to. Modules with ``accepts_rows`` take it in ``forward`` and do their per-image work once;
    for the others, callers expand the image with :func:`expand_rows` first.
    """

    out_dim: int
    uses_grid = False  # True if the module reads ImageFeatures.grid (else only .pooled)
    accepts_rows = False

    def forward(self, image: ImageFeatures, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                causal: bool = False, need_weights: bool = False) -> FusionOutput:
        raise NotImplementedError

    def init_cache(self, image: ImageFeatures) -> Dict[str, torch.Tensor]:
        """Per-sequence state for incremental decoding (batch-first tensors); empty for stateless modules."""
        return {}

    def step(self, x: torch.Tensor, state: Dict[str, torch.Tensor]) -> FusionOutput:
        """Fuse one new causal position x (B, 1, text_dim) -> (B, 1, out_dim), given the decoding state: the
        image ("grid", "pooled") and ``init_cache``'s entries, which a step replaces in the dict it is given.
        Modules that treat positions independently need no cache: the default runs ``forward``."""
        return self.forward(ImageFeatures(grid=state["grid"], pooled=state["pooled"]), x)

    def per_image_state(self) -> FrozenSet[str]:
        """Names of decoding-state entries (``init_cache``'s, or the decoder's "grid"/"pooled") that ``step``
        reads once per image for all of that image's rows (its beams or samples, which are consecutive, so
        row r belongs to image r // (rows / images)). Decoding never copies these per beam. Default: none —
        ``step`` reads every entry row by row."""
        return frozenset()

    def regularizer(self, attention: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Extra loss from the attention over a whole caption (B, T, N); zero unless a module defines one."""
        return attention.new_zeros(())


def expand_rows(image: ImageFeatures, rows: Optional[torch.Tensor]) -> ImageFeatures:
    """Image features (B_img, ...) -> one row per text row (B_text, ...); ``rows`` None means already aligned."""
    return image if rows is None else image.index_select(rows)


class GridPositions(nn.Module):
    """Learned position embeddings for up to ``max_cells`` image cells, projected image grid -> (B, N, dim)."""

    def __init__(self, image_dim: int, dim: int, max_cells: int = 256):
        super().__init__()
        self.proj = nn.Linear(image_dim, dim)
        self.pos = nn.Parameter(torch.zeros(max_cells, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        n = grid.shape[1]
        if n > self.pos.shape[0]:
            raise ValueError(f"image grid has {n} cells, more than the {self.pos.shape[0]} this module supports")
        return self.norm(self.proj(grid) + self.pos[:n])  # (B, N, dim)
