"""Search that knows the backbone's concepts: image vectors that take in what EfficientNet-Lite's own ImageNet
classifier sees in a photo (``vlfuse.nn.concepts``), so that "an elephant" or "a laptop on a desk" finds such
photos although the retrieval model was trained on Flickr8k (people and dogs outdoors), which rarely shows them.

An image's vector becomes

    v' = normalize(v + weight * sum over its top_k concepts c of  p_c * u_c * d_c)

- ``p_c``: the classifier's probability of concept c (softmax over 1000 classes, on the pooled features the frozen
  backbone computes anyway: one linear layer more per photo);
- ``d_c``: the retrieval text tower's embedding of the concept's prompt (its name: "African bush elephant"), minus
  the mean of the 1000 prompt embeddings (what all prompts share says nothing about the photo);
- ``u_c = 1 / (1 + C * prior_c)``, the concept's novelty: ``prior_c`` is its mean probability over the model's
  training photos, C the number of classes. A concept the training photos show no more often than chance counts
  (about) fully; one the retrieval model has seen in thousands of training photos (mountain bike, swing, ski on
  Flickr8k) hardly at all, since the model knows it already and the ImageNet label would only blur what it knows.

Text queries are embedded as before; only image vectors change. The prompt vectors (C, D, fp16) and the prior (C,)
are stored beside the checkpoint in ``concepts.safetensors`` and its ``concepts`` section of config.json
(``ConceptConfig``). Build them for a retrieval checkpoint with ``vlfuse concepts --model DIR --data ...``.
A ``weight`` of 0 gives exactly the vectors without concepts (and the model id they had).
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint import CONFIG_NAME
from ...config import Part, from_dict, save_json, to_dict
from ...data.captions import CaptionSet
from ...data.images import load_image
from ...errors import ConfigError, ImageError, ModelNotFoundError
from ...io import atomic_path
from ...nn.concepts import ConceptHead, concept_head_for
from ...registry import CONCEPT_HEADS
from ..base import read_checkpoint

CONCEPTS_FILE = "concepts.safetensors"
DEFAULT_PROMPT = "{name}"


@dataclasses.dataclass
class ConceptConfig:
    """The ``concepts`` section of a retrieval checkpoint's config.json: how its image vectors take in the
    backbone's concepts (module docstring). The defaults are the shipped model's, chosen on coco_ood_dev and
    checked on Flickr8k val (docs/retrieval.md, ``benchmarks/retrieval_concepts.py``)."""

    head: str = ""                  # registered concept head; "" = the one of the model's vision encoder
    prompt: str = DEFAULT_PROMPT    # a concept's text: {name} its display name, {word} its caption word,
                                    # {a} "a" or "an" for the word after it
    top_k: int = 5                  # concepts per photo
    weight: float = 1.5             # of the concept term; 0 = the vectors without concepts, exactly
    temperature: float = 1.0        # probabilities ** (1 / temperature), renormalised: < 1 sharpens them
    novelty: bool = True            # scale each concept by 1 / (1 + C x its mean probability on the training photos)
    center: bool = True             # subtract the mean of the prompt vectors from each
    prior_data: str = ""            # record: the training photos the prior was measured on

    def __post_init__(self):
        if self.top_k < 1:
            raise ConfigError(f"concepts.top_k must be at least 1, got {self.top_k}")
        if self.weight < 0:
            raise ConfigError(f"concepts.weight must be >= 0, got {self.weight}")
        if self.temperature <= 0:
            raise ConfigError(f"concepts.temperature must be > 0, got {self.temperature}")
        if "{name}" not in self.prompt and "{word}" not in self.prompt:
            raise ConfigError(f"concepts.prompt must contain {{name}} or {{word}}, got {self.prompt!r}")

    @property
    def active(self) -> bool:
        """False where the concept term changes nothing (weight 0)."""
        return self.weight > 0


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def concept_prompts(head: ConceptHead, prompt: str = DEFAULT_PROMPT) -> List[str]:
    """The text of every concept of ``head``: ``prompt`` with its name / caption word (and article) filled in."""
    out = []
    for name, word in zip(head.names, head.words):
        text = prompt.replace("{name}", name).replace("{word}", word)
        out.append(re.sub(r"\{a\}(\s+)(\S)", lambda m: _article(m.group(2)) + m.group(1) + m.group(2), text))
    return out


def build_head(config: ConceptConfig, vision: Part) -> ConceptHead:
    """The concept head ``config`` names, or the one that matches the retrieval model's vision encoder, which must
    be the frozen pretrained backbone whose classifier the head is (else its pooled features are not the
    classifier's input)."""
    if vision.kwargs.get("trainable_blocks", 0) or not vision.kwargs.get("pretrained", True):
        raise ConfigError(f"concepts need the frozen pretrained backbone their classifier was trained on; this model's "
                          f"vision encoder is {vision.to_dict()}")
    return CONCEPT_HEADS.build(config.head or concept_head_for(vision.name))


class ConceptEmbedding(nn.Module):
    """Pooled backbone features (B, in_dim) and the retrieval model's image vectors (B, D) -> concept-aware image
    vectors (B, D), unit length (module docstring). ``vectors`` (C, D) are the text tower's unit embeddings of the
    concepts' prompts, ``prior`` (C,) each concept's mean probability on the training photos."""

    def __init__(self, head: ConceptHead, vectors: torch.Tensor, prior: torch.Tensor, config: ConceptConfig):
        super().__init__()
        classes = len(head.names)
        if vectors.dim() != 2 or vectors.shape[0] != classes or prior.shape != (classes,):
            raise ConfigError(f"concept vectors must be ({classes}, D) and the prior ({classes},) for this head, got "
                              f"{tuple(vectors.shape)} and {tuple(prior.shape)}; rebuild them with `vlfuse concepts`")
        self.config, self.head = config, head
        self.register_buffer("vectors", vectors.float())  # (C, D), as stored
        self.register_buffer("prior", prior.float())      # (C,)
        directions = self.vectors - self.vectors.mean(0) if config.center else self.vectors
        novelty = 1.0 / (1.0 + classes * self.prior) if config.novelty else torch.ones(classes)
        self.register_buffer("directions", directions, persistent=False)  # (C, D)
        self.register_buffer("novelty", novelty, persistent=False)        # (C,)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, in_dim) -> concept probabilities (B, C), sharpened as ``config.temperature`` says."""
        p = self.head(pooled)
        if self.config.temperature != 1.0:
            p = p.pow(1.0 / self.config.temperature)
            p = p / p.sum(-1, keepdim=True)
        return p

    def forward(self, pooled: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        if not self.config.active:
            return vectors
        values, index = self.probabilities(pooled).topk(self.config.top_k, dim=-1)  # (B, k)
        weights = values * self.novelty[index]                                       # (B, k)
        term = torch.einsum("bk,bkd->bd", weights, self.directions[index])           # (B, D)
        return F.normalize(vectors.float() + self.config.weight * term, dim=-1)

    def stored(self) -> Dict[str, torch.Tensor]:
        """The tensors ``concepts.safetensors`` holds, as stored: vectors in fp16, the prior in fp32."""
        return {"vectors": self.vectors.half().contiguous(), "prior": self.prior.float().contiguous()}

    def with_config(self, config: ConceptConfig) -> "ConceptEmbedding":
        """The same concept head, vectors and prior under other settings (the prompt must be the same)."""
        if config.prompt != self.config.prompt or config.head != self.config.head:
            raise ConfigError("another prompt or head needs new concept vectors: rebuild them with `vlfuse concepts`")
        return ConceptEmbedding(self.head, self.vectors, self.prior, config)


def load_concepts(directory: Union[str, Path], config: ConceptConfig, vision: Part) -> ConceptEmbedding:
    """The concept term of the retrieval checkpoint in ``directory`` (its ``concepts`` section is ``config``)."""
    from safetensors.torch import load_file

    path = Path(directory) / CONCEPTS_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"'{directory}' has a concepts section in its config.json but no {CONCEPTS_FILE}; "
                                 f"rebuild it with `vlfuse concepts --model {directory} --data ...`")
    tensors = load_file(str(path))
    return ConceptEmbedding(build_head(config, vision), tensors["vectors"], tensors["prior"], config)


def save_concepts(directory: Union[str, Path], concepts: ConceptEmbedding) -> None:
    from safetensors.torch import save_file

    with atomic_path(Path(directory) / CONCEPTS_FILE) as tmp:
        save_file(concepts.stored(), str(tmp))


@torch.inference_mode()
def concept_probabilities(retriever, head: ConceptHead, images: Sequence, batch_size: int = 32,
                          progress: bool = True, desc: str = "concepts") -> Tuple[torch.Tensor, List[int]]:
    """The classifier's probabilities (N, C) of ``images`` that load, from the pooled features of ``retriever``'s
    image encoder (its runtime's copy, as when indexing), and their indices in ``images``: a file that fails to load
    is reported and left out, the others go on."""
    from tqdm.auto import tqdm

    tf = retriever.model.vision.transform
    rows, kept = [], []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(images), batch_size):
        pixels = []
        for i in range(s, min(s + batch_size, len(images))):
            try:
                pixels.append(tf(load_image(images[i])))
                kept.append(i)
            except ImageError as e:
                bar.write(f"{desc}: skipped {e}", file=sys.stderr)
        bar.update(min(batch_size, len(images) - s))
        if pixels:
            rows.append(head(retriever.runtime.image_encoder(torch.stack(pixels).to(retriever.device)).pooled).cpu())
    bar.close()
    return (torch.cat(rows) if rows else torch.zeros(0, len(head.names))), kept


def concept_prior(retriever, head: ConceptHead, images: Sequence, batch_size: int = 32,
                  progress: bool = True) -> torch.Tensor:
    """Each concept's mean probability (C,) over ``images`` (the retrieval model's training photos; those that do
    not load are left out)."""
    probabilities, kept = concept_probabilities(retriever, head, images, batch_size, progress, "concept prior")
    if not kept:
        raise ConfigError("the concept prior needs the model's training photos; none were given (or none loaded)")
    return probabilities.double().mean(0).float()


def build_concepts(retriever, data: CaptionSet, config: Optional[ConceptConfig] = None, batch_size: int = 32,
                   progress: bool = True) -> ConceptEmbedding:
    """The concept term for ``retriever`` with ``config`` (default: ``ConceptConfig()``): its text tower's
    embeddings of the concepts' prompts, and the prior measured on ``data``'s photos (the model's training split)."""
    config = config or ConceptConfig()
    head = build_head(config, retriever.model.config.vision)
    vectors = torch.from_numpy(retriever.embed_texts(concept_prompts(head, config.prompt)))  # (C, D)
    prior = concept_prior(retriever, head, data.images, batch_size, progress)
    # rounded to fp16 as stored, so that the vectors are the same before saving and after loading
    return ConceptEmbedding(head, vectors.half().float(), prior, config)


def attach_concepts(directory: Union[str, Path], concepts: ConceptEmbedding) -> Path:
    """Write ``concepts`` into the retrieval checkpoint ``directory``: ``concepts.safetensors`` and the
    ``concepts`` section of its config.json."""

    directory, raw = read_checkpoint(directory, "retrieval")
    if concepts.dim != raw["model"].get("embed_dim", concepts.dim):
        raise ConfigError(f"concept vectors have {concepts.dim} dimensions, the model embeds in "
                          f"{raw['model']['embed_dim']}")
    save_concepts(directory, concepts)
    raw["concepts"] = to_dict(concepts.config)
    save_json(raw, directory / CONFIG_NAME)
    return directory


def concepts_config(raw: Optional[dict]) -> Optional[ConceptConfig]:

    return None if raw is None else from_dict(ConceptConfig, raw, "concepts")
