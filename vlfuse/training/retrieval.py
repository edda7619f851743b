"""Retrieval training on cached features: the image stem's outputs (of each photo and, for mirroring, of its
mirror image) come from the shared FeatureCache; the text encoder's frozen part runs once per caption too (and
once per caption that mirroring changes): its pooled output when the whole encoder is frozen, else the token
states entering the tuned top layers. An epoch then only runs the attention pooling, the tuned text layers (if
any) and the two projections."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import from_dict, save_json, to_dict
from ..data.captions import CaptionSet
from ..data.mirror import check_mirror_probability, draw_mirrored, mirror_text
from ..errors import ConfigError
from ..io import atomic_path, config_digest
from ..metrics.retrieval import recall_metrics
from ..nn.text import pad_batch
from ..tasks.retrieval.pipeline import RetrievalModel, RetrievalModelConfig, Retriever
from .caption import cached_features, load_split
from .features import FeatureCache
from .trainer import TrainConfig, Trainer, best_val_scores, seed_everything


@dataclasses.dataclass
class RetrievalDataConfig:
    path: str = "../shared/data/flickr8k"
    format: str = "auto"
    train_split: str = "train"
    val_split: str = "val"
    image_root: str = ""                   # Karpathy/COCO only: folder the image paths are relative to
    cache_dir: str = "cache/features"      # image stem outputs (shared FeatureCache)
    text_cache_dir: str = "cache/text"     # pooled frozen text-encoder outputs per caption
    train_limit: int = 0
    val_limit: int = 0
    mirror: float = 0.0                    # probability of training on an image's mirror image, "left"/"right"
                                           # swapped in its caption (vlfuse.data.mirror)

    def __post_init__(self):
        check_mirror_probability(self.mirror)


@dataclasses.dataclass
class RetrievalExperiment:
    task: str = "retrieval"
    name: str = "flickr8k-retrieval"       # model name saved with the checkpoint (part of the model id)
    data: RetrievalDataConfig = dataclasses.field(default_factory=RetrievalDataConfig)
    model: RetrievalModelConfig = dataclasses.field(default_factory=RetrievalModelConfig)
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(select_metric="rsum", out_dir="runs/retrieval", batch_size=128,
                                            lr=5e-4, epochs=15, warmup_steps=200))


def _split(cfg: RetrievalDataConfig, split: str, limit: int) -> CaptionSet:
    # load_split only reads fields that both data configs share
    return load_split(cfg, split, limit)  # type: ignore[arg-type]


@torch.no_grad()
def cached_text_features(model: RetrievalModel, tokenizer, captions: Sequence[str], cache_dir: str,
                         batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Pooled frozen text-encoder outputs (M, text_dim) fp16 for ``captions``, cached in one file per caption list."""
    key = config_digest([to_dict(model.config.text), model.config.max_len, list(captions)])
    path = Path(cache_dir) / f"{model.config.text.name}-{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    model.text.eval()
    encoded = [tokenizer.encode(c, model.config.max_len) for c in captions]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together: less padding
    feats = torch.zeros(len(encoded), model.text.out_dim, dtype=torch.float16)
    for s in tqdm(range(0, len(order), batch_size), desc="text features", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        rows = order[s:s + batch_size]
        feats[rows] = model.encode_text(*pad_batch([encoded[i] for i in rows])).half()
    with atomic_path(path) as tmp:
        np.save(tmp, feats.numpy())
    return feats


@dataclasses.dataclass
class TokenStates:
    """Per-caption token states, stored flat: caption ``i`` is ``flat[offsets[i]:offsets[i + 1]]`` (T_i, D)."""

    flat: torch.Tensor     # (total tokens, D) fp16
    offsets: torch.Tensor  # (M + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def cat(self, other: "TokenStates") -> "TokenStates":
        """These captions' states followed by ``other``'s."""
        return TokenStates(torch.cat([self.flat, other.flat]), torch.cat([self.offsets, other.offsets[1:] +
                                                                          self.offsets[-1]]))

    def batch(self, rows: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Captions ``rows`` -> padded states (B, T, D) float32 and mask (B, T) bool."""
        spans = [(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows]
        t = max(e - s for s, e in spans)
        states = torch.zeros(len(rows), t, self.flat.shape[1])
        mask = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, (s, e) in enumerate(spans):
            states[i, :e - s] = self.flat[s:e].float()
            mask[i, :e - s] = True
        return states, mask


@torch.no_grad()
def cached_text_states(model: RetrievalModel, tokenizer, captions: Sequence[str], cache_dir: str,
                       batch_size: int = 256, progress: bool = True) -> TokenStates:
    """The text encoder's ``frozen_states`` of every caption, fp16, cached in one file per caption list (keyed by
    the text config, max_len, the number of frozen layers and the captions); written atomically."""
    frozen = model.text.frozen_layers
    key = config_digest([to_dict(model.config.text), model.config.max_len, frozen, list(captions)])
    path = Path(cache_dir) / f"{model.config.text.name}-states{frozen}-{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            return TokenStates(torch.from_numpy(f["flat"]), torch.from_numpy(f["offsets"]))
    model.text.eval()
    encoded = [tokenizer.encode(c, model.config.max_len) for c in captions]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor([len(e) for e in encoded]).cumsum(0)
    flat = torch.zeros(int(offsets[-1]), model.text.out_dim, dtype=torch.float16)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together: less padding
    for s in tqdm(range(0, len(order), batch_size), desc="text token states", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        rows = order[s:s + batch_size]
        states = model.text.frozen_states(*pad_batch([encoded[i] for i in rows])).half()  # (B, T, D)
        for j, r in enumerate(rows):
            flat[offsets[r]:offsets[r + 1]] = states[j, :len(encoded[r])]
    with atomic_path(path) as tmp:
        np.savez(tmp, flat=flat.numpy(), offsets=offsets.numpy())
    return TokenStates(flat, offsets)


@torch.no_grad()
def frozen_cells(model: RetrievalModel, acts: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Cached stem activations (M, ...) -> normalised grid cells (M, N, C) fp16, computed once."""
    return torch.cat([model.frozen_cells(acts[s:s + batch_size]).half() for s in range(0, len(acts), batch_size)])


def caption_rows(data: CaptionSet) -> Tuple[List[str], List[int]]:
    """All captions of ``data`` in order, and the image index of each."""
    pairs = data.pairs()
    return [c for _, c in pairs], [i for i, _ in pairs]


def mirrored_rows(captions: Sequence[str]) -> Tuple[List[str], List[int]]:
    """The captions that mirroring changes (``mirror_text``), and for every caption row the row of its form for
    the mirror image: the row itself when mirroring leaves the caption alone, else ``len(captions) + j`` for the
    j-th changed caption (training appends their text features after the captions')."""
    changed: List[str] = []
    rows = list(range(len(captions)))
    for r, caption in enumerate(captions):
        mirrored = mirror_text(caption)
        if mirrored != caption:
            rows[r] = len(captions) + len(changed)
            changed.append(mirrored)
    return changed, rows


def make_collate(image_feats: torch.Tensor, text: torch.Tensor | TokenStates | List[List[int]],
                 mirrored_feats: Optional[torch.Tensor] = None, mirror: float = 0.0,
                 mirror_rows: Optional[Sequence[int]] = None):
    """Items are (image index, its caption rows); each batch pairs every image with one of its captions
    drawn at random, so an epoch visits every image once and no batch holds an image twice. With probability
    ``mirror`` an image is replaced by its mirror image (``mirrored_feats``) and its caption row ``r`` by
    ``mirror_rows[r]`` (see ``mirrored_rows``). ``text`` is the cached pooled text features, the cached token
    states or the token ids of every caption row."""
    if mirror > 0 and (mirrored_feats is None or mirror_rows is None):
        raise ValueError("mirroring needs the features of the mirrored images and the mirrored caption rows")

    def collate(items):
        img = torch.tensor([i for i, _ in items])
        rows = [r[int(torch.randint(len(r), ()))] for _, r in items]
        cells = image_feats[img]  # (B, N, C) normalised cells
        flip = draw_mirrored(len(img), mirror)
        if flip.any():
            cells = torch.where(flip[:, None, None], mirrored_feats[img], cells)
            rows = [mirror_rows[r] if f else r for r, f in zip(rows, flip.tolist())]
        if isinstance(text, torch.Tensor):
            return cells, text[torch.tensor(rows)].float(), img
        if isinstance(text, TokenStates):
            states, mask = text.batch(rows)
            return cells, states, img, mask
        ids, mask = pad_batch([text[r] for r in rows])
        return cells, ids, img, mask
    return collate


@torch.no_grad()
def score_split(model: RetrievalModel, cells: torch.Tensor, text: torch.Tensor | TokenStates | List[List[int]],
                owner: Sequence[int], batch_size: int = 250) -> Dict[str, float]:
    """Recall metrics of ``model`` on the images' cached normalised cells (M, N, C) and the cached pooled text
    features, cached token states or token id lists of the captions."""
    model.eval()
    imgs = torch.cat([model.embed_cells(cells[s:s + batch_size].float(), normalized=True)
                      for s in range(0, len(cells), batch_size)])
    txts = []
    for s in range(0, len(text), batch_size):
        if isinstance(text, torch.Tensor):
            pooled = text[s:s + batch_size].float()
        elif isinstance(text, TokenStates):
            pooled = model.encode_text_states(*text.batch(range(s, min(s + batch_size, len(text)))))
        else:
            pooled = model.encode_text(*pad_batch(text[s:s + batch_size]))
        txts.append(model.embed_text_features(pooled))
    return recall_metrics((imgs @ torch.cat(txts).t()).numpy(), owner)


def image_cells(model: RetrievalModel, cache_dir: str, data: CaptionSet, progress: bool, mirrored: bool = False
                ) -> Tuple[torch.Tensor, CaptionSet, List]:
    """Normalised grid cells (M, N, C) fp16 of ``data``'s images, or of their mirror images (``mirrored``), built
    or loaded from the FeatureCache; unreadable images are dropped (and returned with their errors)."""
    feats, data, bad = cached_features(FeatureCache(cache_dir, model.vision, mirrored=mirrored), data, progress)
    return frozen_cells(model, feats), data, bad


def caption_text(model: RetrievalModel, tokenizer, captions: Sequence[str], cache_dir: str, progress: bool
                 ) -> torch.Tensor | TokenStates:
    """What training feeds the text tower per caption: cached pooled features of a frozen encoder, or the
    cached states entering its tuned top layers."""
    if model.text_frozen:
        return cached_text_features(model, tokenizer, captions, cache_dir, progress=progress)
    return cached_text_states(model, tokenizer, captions, cache_dir, progress=progress)


def train(raw_config: dict, resume: bool = False) -> Dict:
    """Train a dual encoder from a config mapping (see RetrievalExperiment); returns a summary."""
    exp = from_dict(RetrievalExperiment, raw_config)
    t_start = time.time()
    train_set = _split(exp.data, exp.data.train_split, exp.data.train_limit)
    val_set = _split(exp.data, exp.data.val_split, exp.data.val_limit)
    seed_everything(exp.train.seed)  # the initial weights follow train.seed too, not only the training order
    retriever = Retriever.from_config(exp.model, exp.name)
    model, tokenizer = retriever.model, retriever.tokenizer
    if any(p.requires_grad for p in model.vision.parameters()):
        raise ConfigError("retrieval training runs on cached features: keep the vision encoder frozen "
                          "(trainable_blocks: 0)")
    train_cells, train_set, bad_train = image_cells(model, exp.data.cache_dir, train_set, exp.train.progress)
    val_cells, val_set, bad_val = image_cells(model, exp.data.cache_dir, val_set, exp.train.progress)
    for _, err in bad_train + bad_val:
        tqdm.write(f"skipped image: {err}")
    train_caps, train_owner = caption_rows(train_set)
    val_caps, val_owner = caption_rows(val_set)
    train_text = caption_text(model, tokenizer, train_caps, exp.data.text_cache_dir, exp.train.progress)
    val_text = caption_text(model, tokenizer, val_caps, exp.data.text_cache_dir, exp.train.progress)
    mirrored_cells, mirror_rows = None, None
    if exp.data.mirror > 0:  # the kept images' mirror images, and the captions mirroring changes
        mirrored_cells = image_cells(model, exp.data.cache_dir, train_set, exp.train.progress, mirrored=True)[0]
        changed, mirror_rows = mirrored_rows(train_caps)
        if changed:
            extra = caption_text(model, tokenizer, changed, exp.data.text_cache_dir, exp.train.progress)
            train_text = torch.cat([train_text, extra]) if isinstance(train_text, torch.Tensor) \
                else train_text.cat(extra)
    rows_of: Dict[int, List[int]] = {}
    for r, i in enumerate(train_owner):
        rows_of.setdefault(i, []).append(r)
    items = sorted(rows_of.items())
    cache_minutes = (time.time() - t_start) / 60
    out = Path(exp.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = to_dict(exp)
    save_json(resolved, out / "config.resolved.json")

    def evaluate(m: RetrievalModel) -> Dict[str, float]:
        return score_split(m, val_cells, val_text, val_owner)

    def save_best(m: RetrievalModel, directory: Path) -> None:
        Retriever(m, tokenizer, exp.name).save_pretrained(directory, training=resolved)

    collate = make_collate(train_cells, train_text, mirrored_cells, exp.data.mirror, mirror_rows)
    trainer = Trainer(model, items, collate, lambda net, b: net(*b), evaluate, save_best, exp.train,
                      pretrained_prefixes=model.pretrained_prefixes())
    if resume and trainer.resume():
        tqdm.write(f"resumed from {trainer.last_path} at epoch {trainer.state['epoch'] + 1}")
    result = trainer.fit()
    summary = {"best_" + exp.train.select_metric: result["best"], "best_epoch": result["best_epoch"],
               "train_images": len(train_set), "train_captions": len(train_caps), "val_images": len(val_set),
               "skipped_images": len(bad_train) + len(bad_val),
               "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "cache_minutes": cache_minutes, "total_minutes": (time.time() - t_start) / 60,
               "best_dir": str(out / "best")}
    if best_val_scores(result):
        summary["best_val"] = best_val_scores(result)
    save_json(summary, out / "summary.json")
    return summary
