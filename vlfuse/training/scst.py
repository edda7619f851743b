"""Self-critical sequence training (Rennie et al. 2017) for caption models, after cross-entropy training.

Each image gets ``samples`` captions sampled from the model (through the one decoding module); the reward
is each sample's CIDEr-D against the image's references (idf over all training references, see
:mod:`vlfuse.metrics.cider_d`), plus ``bleu_reward_weight`` times its sentence BLEU-4 if set (as
self-critical.pytorch's option of that name), minus the mean reward of the other samples of the same image (the
"new self-critical" baseline, no greedy pass).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.tokenizer import BOS, EOS, PAD, Tokenizer
from ..errors import ConfigError
from ..generation import DecodeConfig
from ..nn.vision import ImageFeatures
from ..tasks.caption.pipeline import CaptionModel


@dataclasses.dataclass
class SCSTConfig:
    epochs: int = 0          # 0 = no SCST phase
    samples: int = 5         # captions sampled per image
    lr: float = 2e-5
    batch_images: int = 32
    max_len: int = 16
    warmup_steps: int = 20
    init_from: str = ""      # a trained caption model (built-in name or directory): skip cross-entropy, start here
    hflip: float = 0.0       # share of images replaced by their mirror image (as data.hflip); a mirrored image's
                             # samples are scored with "left"/"right" swapped back against its references
    ema_decay: float = 0.0   # as train.ema_decay, for this phase (validate and save a moving average)
    bleu_reward_weight: float = 0.0  # reward = CIDEr-D + this x sentence BLEU-4 (pycocoevalcap's, 0..1)
    loss_average: str = "sequence"   # "sequence": each sample's mean token log-prob x its advantage, averaged over
                                     # samples; "token": the summed log-prob (the REINFORCE gradient), averaged over
                                     # all tokens of the batch (self-critical.pytorch's RewardCriterion)
    sample_dropout: bool = False     # sample with the model in train mode (dropout on), as self-critical.pytorch

    def __post_init__(self):
        if self.bleu_reward_weight < 0:
            raise ConfigError(f"scst.bleu_reward_weight must be >= 0, got {self.bleu_reward_weight}")
        if self.loss_average not in ("sequence", "token"):
            raise ConfigError(f"scst.loss_average must be 'sequence' or 'token', got {self.loss_average!r}")


class Reward:
    """An SCST reward: ``score(image, caption)`` = CIDEr-D + ``bleu_weight`` x sentence BLEU-4, against the
    references of image ``image`` (space-separated tokens)."""

    def __init__(self, references: List[List[str]], bleu_weight: float = 0.0):
        from ..metrics.cider_d import CiderD
        from ..metrics.sentence_bleu import SentenceBleu

        self.cider = CiderD(references)
        self.bleu = SentenceBleu(references) if bleu_weight else None
        self.bleu_weight = bleu_weight

    def score(self, image: int, caption: str) -> float:
        reward = self.cider.score(image, caption)
        return reward + self.bleu_weight * self.bleu.score(image, caption) if self.bleu else reward


def sample_rewards(scorer, tokenizer: Tokenizer, sampled: List[List[int]], rows: torch.Tensor,
                   flipped: torch.Tensor, k: int, mirror_table: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, K) CIDEr-D of each image's ``k`` samples (``sampled[i]`` belongs to image ``i // k``, whose references
    are row ``rows[i // k]`` of the scorer); a mirrored image's samples are mapped back through ``mirror_table``."""
    scores = []
    for i, ids in enumerate(sampled):
        if flipped[i // k] and ids:
            ids = mirror_table[torch.tensor(ids, dtype=torch.long)].tolist()
        scores.append(scorer.score(int(rows[i // k]), " ".join(tokenizer.vocab[t] for t in ids)))
    return torch.tensor(scores, dtype=torch.float32).view(-1, k)


def policy_loss(advantage: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, average: str) -> torch.Tensor:
    """The self-critical loss from (N,) advantages and (N, T) token log-probs under (N, T) mask (see
    ``SCSTConfig.loss_average``): "token" = -sum(A_i log p(sample_i)) / all tokens; "sequence" = the mean over
    samples of -A_i x the mean token log-prob of sample i."""
    if average == "token":
        return -(advantage[:, None] * logp * mask).sum() / mask.sum()
    return -(advantage * (logp * mask).sum(1) / mask.sum(1)).mean()


def make_scst_loss(model: CaptionModel, tokenizer: Tokenizer, references: List[List[str]], cfg: SCSTConfig,
                   mirror_table: Optional[torch.Tensor] = None):
    """loss_fn(net, (acts, image_rows[, flipped])) for the shared Trainer. ``flipped`` (B,) marks images given as
    their mirror image; their samples are mapped through ``mirror_table`` (an involution) before scoring."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError("scst runs in a single process; start it without torchrun")
    refs_simple = [[" ".join(tokenizer.tokenize(r)) for r in refs] for refs in references]
    scorer = Reward(refs_simple, cfg.bleu_reward_weight)
    sample_cfg = DecodeConfig(strategy="sample", top_p=1.0, max_len=cfg.max_len, no_repeat_ngram=0)

    def loss_fn(net, batch) -> Dict[str, torch.Tensor]:
        acts, rows = batch[0], batch[1]
        flipped = batch[2] if len(batch) > 2 else torch.zeros(len(rows), dtype=torch.bool)
        if flipped.any() and mirror_table is None:
            raise ValueError("mirrored images in an SCST batch need the vocabulary's mirror_table")
        k = cfg.samples
        feats = model.vision.tail(acts)
        image_rows = torch.arange(len(acts), device=acts.device).repeat_interleave(k)  # (B*K,) sample -> image
        was_training = model.training
        model.train(was_training and cfg.sample_dropout)
        with torch.no_grad():
            sampled = [ids for ids, _ in model.generate(
                ImageFeatures(feats.grid.detach(), feats.pooled.detach()), sample_cfg, per_image=k)]
        model.train(was_training)
        reward = sample_rewards(scorer, tokenizer, sampled, rows, flipped, k, mirror_table)  # (B, K)
        baseline = (reward.sum(1, keepdim=True) - reward) / (k - 1)
        advantage = (reward - baseline).view(-1).to(acts.device)
        seqs = [[BOS] + ids + [EOS] for ids in sampled]
        tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True,
                                                 padding_value=PAD).to(acts.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, _ = model.decoder(feats, inputs, inputs != PAD, rows=image_rows)
        logp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B*K, T) log p(target)
        mask = (targets != PAD).float()
        loss = policy_loss(advantage, logp, mask, cfg.loss_average)
        return {"loss": loss, "reward": reward.mean()}

    return loss_fn
