"""Self-critical sequence training (Rennie et al. 2017) for caption models, after cross-entropy training.

Each image gets ``samples`` captions sampled from the model (through the one decoding module); the reward is
each sample's CIDEr-D against the image's references (idf over all training references, see
:mod:`vlfuse.metrics.cider_d`) minus the mean reward of the other samples of the same image (the "new
self-critical" baseline, no greedy pass).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.tokenizer import BOS, EOS, PAD, Tokenizer
from ..errors import ConfigError
from ..generation import DecodeConfig
from ..nn.vision import ImageFeatures
from ..tasks.caption.pipeline import CaptionModel
from .trainer import TrainConfig


@dataclasses.dataclass
class SCSTConfig:
    """The self-critical phase (the ``scst`` section of a caption recipe). It owns its schedule — the fields
    from ``batch_images`` on; the cross-entropy schedule in ``train`` does not apply to it — and trains with
    the rest of the ``train`` section (weight decay, moving average, device, threads, ...), see ``train_config``."""

    epochs: int = 0            # 0 = no SCST phase
    samples: int = 5           # captions sampled per image
    max_len: int = 16          # words per sampled caption at most
    init_from: str = ""        # a trained caption model (built-in name or directory): skip cross-entropy, start here
    batch_images: int = 32     # images per step, each with its `samples` captions
    lr: float = 2e-5
    warmup_steps: int = 20
    min_lr_ratio: float = 0.5  # the cosine ends at lr x this: a fine-tuning phase keeps learning to its last step
    patience: int = 0          # epochs without val improvement before stopping (0 = run every epoch)

    def train_config(self, train: TrainConfig, out_dir: str) -> TrainConfig:
        """The trainer settings of this phase: this section's schedule, everything else from ``train``."""
        return dataclasses.replace(train, epochs=self.epochs, batch_size=self.batch_images, lr=self.lr,
                                   warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                                   patience=self.patience, out_dir=out_dir)


def sample_rewards(scorer, tokenizer: Tokenizer, sampled: List[List[int]], rows: torch.Tensor, k: int
                   ) -> torch.Tensor:
    """(B, K) CIDEr-D of each image's ``k`` samples (``sampled[i]`` belongs to image ``i // k``, whose references
    are row ``rows[i // k]`` of the scorer)."""
    scores = [scorer.score(int(rows[i // k]), " ".join(tokenizer.vocab[t] for t in ids))
              for i, ids in enumerate(sampled)]
    return torch.tensor(scores, dtype=torch.float32).view(-1, k)


def make_scst_loss(model: CaptionModel, tokenizer: Tokenizer, references: List[List[str]], cfg: SCSTConfig):
    """loss_fn(net, (acts, image_rows)) for the shared Trainer: ``acts`` are the images' cached stem activations,
    ``image_rows`` their rows in ``references``."""
    from ..metrics.cider_d import CiderD

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError("scst runs in a single process; start it without torchrun")
    scorer = CiderD([[" ".join(tokenizer.tokenize(r)) for r in refs] for refs in references])
    sample_cfg = DecodeConfig(strategy="sample", top_p=1.0, max_len=cfg.max_len, no_repeat_ngram=0)

    def loss_fn(net, batch) -> Dict[str, torch.Tensor]:
        acts, rows = batch
        k = cfg.samples
        feats = model.vision.tail(acts)
        image_rows = torch.arange(len(acts), device=acts.device).repeat_interleave(k)  # (B*K,) sample -> image
        was_training = model.training
        model.eval()  # samples come from the model without dropout
        with torch.no_grad():
            sampled = [ids for ids, _ in model.generate(
                ImageFeatures(feats.grid.detach(), feats.pooled.detach()), sample_cfg, per_image=k)]
        model.train(was_training)
        reward = sample_rewards(scorer, tokenizer, sampled, rows, k)  # (B, K)
        baseline = (reward.sum(1, keepdim=True) - reward) / (k - 1)
        advantage = (reward - baseline).view(-1).to(acts.device)  # (B*K,)
        seqs = [[BOS] + ids + [EOS] for ids in sampled]
        tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True,
                                                 padding_value=PAD).to(acts.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, _ = model.decoder(feats, inputs, inputs != PAD, rows=image_rows)
        logp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B*K, T) log p(target)
        mask = (targets != PAD).float()
        # each sample's mean token log-probability times its advantage, averaged over the samples
        loss = -(advantage * (logp * mask).sum(1) / mask.sum(1)).mean()
        return {"loss": loss, "reward": reward.mean()}

    return loss_fn
