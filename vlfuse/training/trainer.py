"""A task-agnostic training loop: AdamW, warm-up + cosine schedule, gradient clipping, AMP on CUDA,
validation every epoch with best-checkpoint selection and early stopping, atomic resumable
checkpoints (also mid-epoch), JSONL metrics log + training-curve plot, and data-parallel
training through torch.distributed (gloo on CPU, nccl on GPUs) with rank-0 checkpointing.

Tasks plug in three callables: ``loss_fn(model, batch) -> {"loss": ..., ...}``,
``evaluate_fn(model) -> metrics`` and ``save_best_fn(model, directory)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io import atomic_path


GRAD_CLIP = 1.0  # gradients are clipped to this total norm


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    min_lr_ratio: float = 0.02        # cosine decays to lr * min_lr_ratio
    patience: int = 4                 # epochs without improvement before stopping (0 = never stop early)
    select_metric: str = "CIDEr"      # validation metric that picks the best checkpoint (higher is better)
    seed: int = 0
    out_dir: str = "runs/caption"
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    amp: bool = True                  # bf16 autocast on CUDA; ignored on CPU
    cpu_amp: bool = False             # bf16 autocast on CPU too (fast where the CPU has avx512_bf16 or AMX)
    checkpoint_every: int = 500       # also checkpoint mid-epoch every N steps (0 = only at epoch ends)
    max_steps: int = 0                # stop after N optimizer steps in total (0 = no limit; for smoke tests)
    threads: int = 0                  # torch CPU threads (0 = leave as is)
    ema_decay: float = 0.0            # >0: validate and save an exponential moving average of the trained weights
    pretrained_lr_scale: float = 1.0  # lr multiplier for tuned weights of pretrained parts (e.g. MiniLM's top layer)
    progress: bool = True

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("train.epochs and train.batch_size must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.pretrained_lr_scale <= 0:
            raise ConfigError(f"train.pretrained_lr_scale must be positive, got {self.pretrained_lr_scale}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{name}' but CUDA is not available here; use 'cpu' or 'auto'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def best_val_scores(result: Dict[str, Any]) -> Dict[str, float]:
    """The validation scores of ``Trainer.fit()``'s best epoch, without their ``val_`` prefix (empty when no epoch
    was validated)."""
    best = [h for h in result["history"] if h["epoch"] == result["best_epoch"]]
    return {k[4:]: v for k, v in best[0].items() if k.startswith("val_")} if best else {}


class Trainer:
    def __init__(self, model: nn.Module, train_items: Sequence[Any], collate: Callable[[List[Any]], Any],
                 loss_fn: Callable[[nn.Module, Any], Dict[str, torch.Tensor]],
                 evaluate_fn: Callable[[nn.Module], Dict[str, float]],
                 save_best_fn: Callable[[nn.Module, Path], None], config: TrainConfig,
                 lengths: Optional[Sequence[int]] = None, frozen_prefixes: Sequence[str] = (),
                 pretrained_prefixes: Sequence[str] = ()):
        self.cfg = config
        self.device = resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.model = model.to(self.device)
        self.items, self.collate = train_items, collate
        self.lengths = lengths  # if given, batches hold items of similar length (less padding)
        self.frozen_prefixes = tuple(frozen_prefixes)  # weights the model rebuilds itself: not in last.pt
        self.loss_fn, self.evaluate_fn, self.save_best_fn = loss_fn, evaluate_fn, save_best_fn
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self._param_groups(tuple(pretrained_prefixes)), lr=config.lr)
        self.steps_per_epoch = max(1, len(train_items) // (config.batch_size * self.world))
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.out = Path(config.out_dir)
        # shadow copy of the trained weights (EMA); validation and the best checkpoint use it when enabled
        self.ema: Optional[Dict[str, torch.Tensor]] = (
            {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            if config.ema_decay else None)
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": -float("inf"),
                      "best_epoch": -1, "bad_epochs": 0, "history": []}

    def _param_groups(self, pretrained_prefixes: tuple) -> List[Dict[str, Any]]:
        """Trained parameters in groups: weight decay on matrices only; weights under ``pretrained_prefixes``
        (tuned layers of pretrained parts) learn at ``lr * pretrained_lr_scale``."""
        groups: Dict[tuple, List[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                pretrained = bool(pretrained_prefixes) and name.startswith(pretrained_prefixes)
                groups.setdefault((p.ndim >= 2, pretrained), []).append(p)
        return [{"params": params, "weight_decay": self.cfg.weight_decay if decay else 0.0,
                 "lr_scale": self.cfg.pretrained_lr_scale if pretrained else 1.0}
                for (decay, pretrained), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    def save_last(self) -> None:
        if not is_main_process():
            return
        with atomic_path(self.last_path) as tmp:  # a kill leaves the previous checkpoint intact
            torch.save({"model": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                        "state": self.state, "torch_rng": torch.get_rng_state(), "ema": self.ema,
                        # dropout on a GPU draws from the device's generator: a resumed run needs it too
                        "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
                       tmp)

    def _trainable_state(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items()
                if not (self.frozen_prefixes and k.startswith(self.frozen_prefixes))}

    def resume(self) -> bool:
        """Load ``last.pt`` from out_dir if present; returns whether training resumes."""
        if not self.last_path.is_file():
            return False
        ckpt = torch.load(self.last_path, map_location=self.device, weights_only=False)
        state = {k: v for k, v in ckpt["model"].items()
                 if not (self.frozen_prefixes and k.startswith(self.frozen_prefixes))}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (self.frozen_prefixes and k.startswith(self.frozen_prefixes))]
        if missing or unexpected:
            raise ConfigError(f"{self.last_path} does not match this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); use another train.out_dir or delete it")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema = {k: v.to(self.device) for k, v in ckpt["ema"].items()}
        self.state = ckpt["state"]
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if ckpt.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), self.device)
        return True

    # -- loop -------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> List[int]:
        """A seeded shuffle (so a resumed run replays the same order); with ``lengths``, items are sorted
        by length inside pools of 50 batches and the batches shuffled again: similar lengths, less padding."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        order = torch.randperm(len(self.items), generator=g).tolist()
        order = order[self.rank::self.world]  # each rank takes its own shard
        if self.lengths is None:
            return order
        bs = self.cfg.batch_size
        pool = 50 * bs
        batches = []
        for s in range(0, len(order), pool):
            chunk = sorted(order[s:s + pool], key=lambda i: self.lengths[i])
            batches += [chunk[b:b + bs] for b in range(0, len(chunk), bs)]
        batches = [b for b in batches if len(b) == bs]  # a partial batch would misalign the ones after it
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [i for p in perm for i in batches[p]]

    def _log(self, record: Dict[str, Any]) -> None:
        if not is_main_process():
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        net = self.ddp or self.model
        amp = (cfg.amp and self.device.type == "cuda") or (cfg.cpu_amp and self.device.type == "cpu")
        start_epoch = self.state["epoch"]
        stop = bool(self.state.get("stopped"))  # a resumed run that had stopped early stays stopped
        for epoch in range(start_epoch, cfg.epochs if not stop else start_epoch):
            self.model.train()
            order = self._epoch_order(epoch)
            skip = self.state["step_in_epoch"]
            bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", disable=not (cfg.progress and is_main_process()), dynamic_ncols=True)
            t0, seen, running = time.time(), 0, {}
            for step in range(skip, self.steps_per_epoch):
                batch_idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                batch = self.collate([self.items[i] for i in batch_idx])
                for g in self.optimizer.param_groups:
                    g["lr"] = cfg.lr * g.get("lr_scale", 1.0) * lr_factor(
                        self.state["global_step"], cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                    losses = self.loss_fn(net, batch)
                self.optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
                self.optimizer.step()
                self._update_ema()
                self.state["global_step"] += 1
                self.state["step_in_epoch"] = step + 1
                seen += len(batch_idx)
                for k, v in losses.items():
                    v = float(v.detach())
                    running[k] = 0.98 * running.get(k, v) + 0.02 * v
                bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()} | {"ex/s": f"{seen * self.world / (time.time() - t0):.0f}"})
                bar.update(1)
                if cfg.checkpoint_every and self.state["global_step"] % cfg.checkpoint_every == 0:
                    self.save_last()
                if cfg.max_steps and self.state["global_step"] >= cfg.max_steps:
                    stop = True
                    break
            bar.close()
            stop = self._end_epoch(epoch, running, time.time() - t0) or stop
            if stop:
                break
        if is_main_process():
            self._plot()
        return {"best": self.state["best"], "best_epoch": self.state["best_epoch"], "history": self.state["history"]}

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        step = self.state["global_step"]
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))  # short memory early on
        for n, p in self.model.named_parameters():
            if n in self.ema:
                self.ema[n].lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def _ema_weights(self):
        """Swap the EMA weights into the model for the block (validation, saving the best checkpoint)."""
        if self.ema is None:
            yield
            return
        params = dict(self.model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.ema}
        with torch.no_grad():
            for n, v in self.ema.items():
                params[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in backup.items():
                    params[n].copy_(v)

    def _end_epoch(self, epoch: int, running: Dict[str, float], seconds: float) -> bool:
        stop = False
        if is_main_process():
            self.model.eval()
            with self._ema_weights():
                stop = self._validate(epoch, running, seconds)
        if self.state["step_in_epoch"] >= self.steps_per_epoch:  # a max_steps stop mid-epoch resumes mid-epoch
            self.state.update(epoch=epoch + 1, step_in_epoch=0)
        self.save_last()
        if dist.is_initialized():
            flag = torch.tensor([int(stop)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    def _validate(self, epoch: int, running: Dict[str, float], seconds: float) -> bool:
        """Evaluate, keep the best checkpoint, log; returns whether to stop early."""
        cfg = self.cfg
        metrics = self.evaluate_fn(self.model)
        value = metrics.get(cfg.select_metric)
        if value is None:
            raise ConfigError(f"train.select_metric '{cfg.select_metric}' is not among the validation "
                              f"metrics {sorted(metrics)}")
        improved = value > self.state["best"]
        if improved:
            self.state.update(best=value, best_epoch=epoch + 1, bad_epochs=0)
            self.save_best_fn(self.model, self.out / "best")
        else:
            self.state["bad_epochs"] += 1
        record = {"epoch": epoch + 1, "step": self.state["global_step"], "train_minutes": seconds / 60,
                  **{f"train_{k}": v for k, v in running.items()}, **{f"val_{k}": v for k, v in metrics.items()
                                                                       if isinstance(v, (int, float))},
                  "best": improved}
        self.state["history"].append(record)
        self._log(record)
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        tqdm.write(f"epoch {epoch + 1}: {shown}{'  (best so far)' if improved else ''}")
        stop = bool(cfg.patience) and self.state["bad_epochs"] >= cfg.patience
        if stop:
            tqdm.write(f"early stop: no {cfg.select_metric} improvement for {cfg.patience} epochs")
            self.state["stopped"] = True
        return stop

    def _plot(self) -> None:
        """Training curves (train loss and the selection metric per epoch) -> out_dir/curves.png."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        hist = self.state["history"]
        if not hist:
            return
        epochs = [h["epoch"] for h in hist]
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        a.plot(epochs, [h.get("train_loss", float("nan")) for h in hist], marker="o")
        a.set(title="train loss", xlabel="epoch")
        key = f"val_{self.cfg.select_metric}"
        b.plot(epochs, [h.get(key, float("nan")) for h in hist], marker="o", color="tab:green")
        b.set(title=f"val {self.cfg.select_metric}", xlabel="epoch")
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=100)
        plt.close(fig)
