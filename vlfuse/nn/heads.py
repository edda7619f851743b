"""Task heads: what turns a fused vector into a task's output. Registered in ``HEADS``."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import HEADS


@HEADS.register("classifier")
class ClassifierHead(nn.Module):
    """MLP over a fused vector -> one logit per answer in the answer vocabulary."""

    def __init__(self, in_dim: int, num_answers: int, hidden_dim: int = 512, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, num_answers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, A)
