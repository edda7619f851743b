"""Retrieval training on cached features: the image stem's outputs come from the shared FeatureCache and,
when the text encoder is frozen, its pooled output per caption is computed once and cached too, so an epoch
only runs the attention pooling and the two projections."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import from_dict, save_json, to_dict
from ..data.captions import CaptionSet
from ..data.features import FeatureCache
from ..errors import ConfigError
from ..evaluation.retrieval import recall_metrics
from ..models.retrieval import DualEncoder, RetrievalModelConfig, Retriever
from ..models.text import pad_batch
from .caption import cached_features, load_split
from .trainer import TrainConfig, Trainer


@dataclasses.dataclass
class RetrievalDataConfig:
    path: str = "../shared/data/flickr8k"
    format: str = "auto"
    train_split: str = "train"
    val_split: str = "val"
    captions_file: str = ""                # Flickr layout only: e.g. captions_zh.txt (default captions.txt)
    image_root: str = ""                   # Karpathy/COCO only: folder the image paths are relative to
    cache_dir: str = "cache/features"      # image stem outputs (shared FeatureCache)
    text_cache_dir: str = "cache/text"     # pooled frozen text-encoder outputs per caption
    train_limit: int = 0
    val_limit: int = 0
    hflip: float = 0.0                     # probability of mirroring an image's feature grid (augmentation)


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
def cached_text_features(model: DualEncoder, tokenizer, captions: Sequence[str], cache_dir: str,
                         batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Pooled frozen text-encoder outputs (M, text_dim) fp16 for ``captions``, cached in one file per caption list."""
    key = hashlib.sha1(json.dumps([to_dict(model.config.text), model.config.max_len, list(captions)]).encode())
    path = Path(cache_dir) / f"{model.config.text.name}-{key.hexdigest()[:16]}.npy"
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, feats.numpy())
    tmp.replace(path)
    return feats


@torch.no_grad()
def frozen_cells(model: DualEncoder, acts: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Cached stem activations (M, ...) -> normalised grid cells (M, N, C) fp16, computed once."""
    return torch.cat([model.frozen_cells(acts[s:s + batch_size]).half() for s in range(0, len(acts), batch_size)])


def caption_rows(data: CaptionSet) -> Tuple[List[str], List[int]]:
    """All captions of ``data`` in order, and the image index of each."""
    pairs = data.pairs()
    return [c for _, c in pairs], [i for i, _ in pairs]


def make_collate(image_feats: torch.Tensor, text_feats: torch.Tensor | None, tokens: List[List[int]] | None,
                 hflip: float = 0.0):
    """Items are (image index, its caption rows); each batch pairs every image with one of its captions
    drawn at random, so an epoch visits every image once and no batch holds an image twice."""
    def collate(items):
        img = torch.tensor([i for i, _ in items])
        rows = [r[int(torch.randint(len(r), ()))] for _, r in items]
        acts = image_feats[img]  # (B, N, C) normalised cells of a square grid
        if hflip > 0:
            b, n, c = acts.shape
            side = int(round(n ** 0.5))
            flip = torch.rand(b) < hflip
            acts = acts.clone()
            acts[flip] = acts[flip].view(-1, side, side, c).flip(2).reshape(-1, n, c)  # mirror left-right
        if text_feats is not None:
            return acts, text_feats[torch.tensor(rows)].float(), img
        ids, mask = pad_batch([tokens[r] for r in rows])
        return acts, ids, img, mask
    return collate


@torch.no_grad()
def score_split(model: DualEncoder, image_feats: torch.Tensor, text: torch.Tensor | List[List[int]],
                owner: Sequence[int], batch_size: int = 250) -> Dict[str, float]:
    """Recall metrics of ``model`` on cached image features and cached text features (or token id lists)."""
    model.eval()
    imgs = torch.cat([model.embed_cells(image_feats[s:s + batch_size].float(), normalized=True)
                      for s in range(0, len(image_feats), batch_size)])
    txts = []
    for s in range(0, len(text), batch_size):
        if isinstance(text, torch.Tensor):
            pooled = text[s:s + batch_size].float()
        else:
            pooled = model.encode_text(*pad_batch(text[s:s + batch_size]))
        txts.append(model.embed_text_features(pooled))
    return recall_metrics((imgs @ torch.cat(txts).t()).numpy(), owner)


def train(raw_config: dict, resume: bool = False) -> Dict:
    """Train a dual encoder from a config mapping (see RetrievalExperiment); returns a summary."""
    exp = from_dict(RetrievalExperiment, raw_config)
    t_start = time.time()
    train_set = _split(exp.data, exp.data.train_split, exp.data.train_limit)
    val_set = _split(exp.data, exp.data.val_split, exp.data.val_limit)
    retriever = Retriever.from_config(exp.model, exp.name)
    model, tokenizer = retriever.model, retriever.tokenizer
    cache = FeatureCache(exp.data.cache_dir, model.vision)
    train_feats, train_set, bad_train = cached_features(cache, train_set, exp.train.progress)
    val_feats, val_set, bad_val = cached_features(cache, val_set, exp.train.progress)
    for _, err in bad_train + bad_val:
        tqdm.write(f"skipped image: {err}")
    if any(p.requires_grad for p in model.vision.parameters()):
        raise ConfigError("retrieval training runs on cached features: keep the vision encoder frozen "
                          "(trainable_blocks: 0)")
    train_feats, val_feats = frozen_cells(model, train_feats), frozen_cells(model, val_feats)
    train_caps, train_owner = caption_rows(train_set)
    val_caps, val_owner = caption_rows(val_set)
    if model.text_frozen:
        train_text = cached_text_features(model, tokenizer, train_caps, exp.data.text_cache_dir,
                                          progress=exp.train.progress)
        val_text = cached_text_features(model, tokenizer, val_caps, exp.data.text_cache_dir,
                                        progress=exp.train.progress)
        train_tokens = None
    else:
        train_text = None
        train_tokens = [tokenizer.encode(c, exp.model.max_len) for c in train_caps]
        val_text = [tokenizer.encode(c, exp.model.max_len) for c in val_caps]
    rows_of: Dict[int, List[int]] = {}
    for r, i in enumerate(train_owner):
        rows_of.setdefault(i, []).append(r)
    items = sorted(rows_of.items())
    cache_minutes = (time.time() - t_start) / 60
    out = Path(exp.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = to_dict(exp)
    save_json(resolved, out / "config.resolved.json")

    def evaluate(m: DualEncoder) -> Dict[str, float]:
        return score_split(m, val_feats, val_text, val_owner)

    def save_best(m: DualEncoder, directory: Path) -> None:
        Retriever(m, tokenizer, exp.name).save_pretrained(directory, training=resolved)

    trainer = Trainer(model, items, make_collate(train_feats, train_text, train_tokens, exp.data.hflip), lambda net, b: net(*b), evaluate,
                      save_best, exp.train)
    if resume and trainer.resume():
        tqdm.write(f"resumed from {trainer.last_path} at epoch {trainer.state['epoch'] + 1}")
    result = trainer.fit()
    summary = {"best_" + exp.train.select_metric: result["best"], "best_epoch": result["best_epoch"],
               "train_images": len(train_set), "train_captions": len(train_caps), "val_images": len(val_set),
               "skipped_images": len(bad_train) + len(bad_val),
               "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "cache_minutes": cache_minutes, "total_minutes": (time.time() - t_start) / 60,
               "best_dir": str(out / "best")}
    best = [h for h in result["history"] if h["epoch"] == result["best_epoch"]]
    if best:
        summary["best_val"] = {k[4:]: v for k, v in best[0].items() if k.startswith("val_")}
    save_json(summary, out / "summary.json")
    return summary
