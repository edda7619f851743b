"""Text towers in other languages, trained into an existing retrieval model's space.

A retrieval model reads English through its own text tower (MiniLM). A ``LanguageTower`` reads another language
(Chinese: characters or jieba words) with a small encoder trained from scratch, and maps it into the *same* normalised space:
it is trained against the image vectors the English model already makes (``vlfuse.training.retrieval_languages``),
with the image tower frozen. So one image index serves queries in every language the model has a tower for, and
adding a language changes no image vector (the model id, and with it every index and caption memory built with the
model, stays valid).

On disk a tower is a sub-directory of the retrieval checkpoint, ``text_<lang>/``: ``config.json``
(``LanguageTowerConfig``), ``model.safetensors`` (fp16) and ``vocab.json``; the checkpoint's config.json lists it
under ``languages``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint import CONFIG_NAME, load_weights, read_config, save_checkpoint
from ...config import Part, from_dict, to_dict
from ...data.languages import language
from ...data.tokenizer import Tokenizer
from ...errors import ConfigError, InputError
from ...nn.pooling import Projection
from ...nn.text import pad_batch
from ...registry import TEXT_ENCODERS


@dataclasses.dataclass
class LanguageTowerConfig:
    lang: str = "zh"
    segmenter: str = ""     # how texts split into tokens (a registered segmenter); "" = the language's own (jieba)
    # a word-level registered text encoder (its vocabulary is the tower's own, built from the training captions)
    encoder: Part = dataclasses.field(
        default_factory=lambda: Part("gru", {"embed_dim": 256, "hidden_dim": 512, "dropout": 0.2}))
    hidden_dim: int = 1024  # the projection's MLP width
    dropout: float = 0.2
    embed_dim: int = 256    # the retrieval space's size (the English model's embed_dim)
    max_len: int = 32       # words read per text

    def __post_init__(self):
        self.segmenter = self.segmenter or language(self.lang).segmenter  # an unknown language: a ConfigError
        if self.lang == "en":
            raise ConfigError("English is read by the retrieval model's own text tower; a language tower is for "
                              "another language")


class LanguageTower(nn.Module):
    """Token ids (B, T) + mask -> unit vectors (B, embed_dim) in the retrieval space; ``embed`` takes texts."""

    def __init__(self, config: LanguageTowerConfig, tokenizer: Tokenizer):
        super().__init__()
        if tokenizer.segmenter_name != config.segmenter:
            raise ConfigError(f"this {config.lang} tower splits text with '{config.segmenter}', got a "
                              f"'{tokenizer.segmenter_name}' vocabulary")
        self.config, self.tokenizer = config, tokenizer
        self.text = TEXT_ENCODERS.build(config.encoder.name, vocab_size=len(tokenizer), **config.encoder.kwargs)
        if self.text.own_tokenizer:
            raise ConfigError(f"a language tower's encoder reads its own vocabulary; '{config.encoder.name}' "
                              f"brings a tokenizer of its own")
        self.proj = Projection(self.text.out_dim, config.hidden_dim, config.embed_dim, config.dropout)
        self.eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text(ids, mask).pooled
        return F.normalize(self.proj(F.normalize(pooled, dim=-1)), dim=-1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        """Texts -> token ids; a text with no word the tower can read is an InputError naming it."""
        out = []
        for text in texts:
            ids = self.tokenizer.encode(text, self.config.max_len)  # <bos> ... <eos>: the text is split once
            if len(ids) == 2:
                raise InputError(f"no {language(self.config.lang).name} word to search for in {text[:40]!r}")
            out.append(ids)
        return out

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> (B, embed_dim) float32, unit length."""
        ids = self.encode(texts)
        out = [np.zeros((0, self.config.embed_dim), np.float32)]
        for s in range(0, len(ids), batch_size):
            batch, mask = pad_batch(ids[s:s + batch_size])
            out.append(self(batch.to(self.device), mask.to(self.device)).float().cpu().numpy())
        return np.concatenate(out)

    # -- on disk ------------------------------------------------------------------------------------
    @staticmethod
    def folder(lang: str) -> str:
        return f"text_{lang}"

    def save(self, checkpoint: Union[str, Path]) -> Path:
        """Write the tower into ``checkpoint``/text_<lang>/ (fp16 weights)."""
        directory = Path(checkpoint) / self.folder(self.config.lang)
        save_checkpoint(directory, self, {"task": "retrieval-language", "tower": to_dict(self.config)}, half=True)
        self.tokenizer.save(directory)
        return directory

    @classmethod
    def load(cls, checkpoint: Union[str, Path], lang: str) -> "LanguageTower":
        directory = Path(checkpoint) / cls.folder(lang)
        if not (directory / CONFIG_NAME).is_file():
            raise ConfigError(f"retrieval checkpoint '{checkpoint}' lists a {lang} text tower, but "
                              f"'{directory}' holds none")
        config = from_dict(LanguageTowerConfig, read_config(directory)["tower"], "tower")
        tower = cls(config, Tokenizer.load(directory))
        load_weights(directory, tower)
        return tower.float().eval()
