"""Left-right mirroring: the one augmentation every task trains with, and its one knob.

``data.mirror: p`` (caption, retrieval and VQA alike) replaces each training image by its mirror image with
probability ``p``, and mirrors the image's text with it: "left" and "right" swap in its captions, questions and
answers, so the text still describes what the mirrored image shows. Two functions do it: :func:`mirror_pixels`
for the image and :func:`mirror_text` for the text.

Tasks train on stem outputs computed once (the frozen part of the vision encoder), so the mirror image's stem
outputs are computed once too, from the mirrored pixels (``FeatureCache(mirrored=True)``; VQA keeps them in
memory). Mirroring a stem's output map instead would mirror the layout but not each cell's content: the CNN's
filters are not mirror-symmetric.
"""
from __future__ import annotations

import re

import torch

from ..errors import ConfigError

MIRRORED_WORDS = {"left": "right", "right": "left"}
_MIRRORED_WORD = re.compile(r"\b(?:left|right)\b", re.IGNORECASE)


def mirror_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Images (..., H, W) -> the same images mirrored left-right."""
    return pixels.flip(-1)


def mirror_text(text: str) -> str:
    """``text`` as it reads for the mirror image: "left" and "right" swapped where they are whole words,
    keeping their capitalisation ("Left" -> "Right", "LEFT" -> "RIGHT")."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = MIRRORED_WORDS[word.lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _MIRRORED_WORD.sub(swap, text)


def check_mirror_probability(probability: float, key: str = "data.mirror") -> None:
    """Raise ConfigError unless ``probability`` (the knob's value) is in [0, 1]."""
    if not 0.0 <= probability <= 1.0:
        raise ConfigError(f"{key} is the probability of training on an image's mirror image; it must be in [0, 1], "
                          f"got {probability}")


def draw_mirrored(count: int, probability: float) -> torch.Tensor:
    """(count,) bool: which images of a training batch are replaced by their mirror image. The draws come from
    torch's global generator, whose state the trainer checkpoints, so a resumed run draws the same; at
    probability 0 nothing is drawn (a run without mirroring uses no random numbers for it)."""
    if probability <= 0:
        return torch.zeros(count, dtype=torch.bool)
    return torch.rand(count) < probability
