"""Caption training on cached image features: ``train(experiment)`` builds every part from a typed config."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..config import from_dict, save_json, to_dict
from ..data.captions import CaptionSet, read_captions
from ..data.mirror import check_mirror_probability, draw_mirrored, mirror_text
from ..data.tokenizer import PAD, Tokenizer
from ..errors import ConfigError, DataError
from ..generation import DecodeConfig
from ..nn.vision import ImageFeatures
from ..tasks.caption.pipeline import Captioner, CaptionModel, CaptionModelConfig
from ..tasks.caption.rerank import MemoryConfig, build_and_attach
from .features import FeatureCache
from .scst import SCSTConfig, make_scst_loss
from .trainer import TrainConfig, Trainer, is_main_process, seed_everything


@dataclasses.dataclass
class CaptionDataConfig:
    path: str = "../shared/data/flickr8k"
    format: str = "auto"
    train_split: str = "train"
    val_split: str = "val"
    image_root: str = ""           # Karpathy/COCO only: folder the image paths are relative to (default: the JSON's)
    min_count: int = 5             # words seen fewer times in training captions map to <unk>
    cache_dir: str = "cache/features"
    train_limit: int = 0           # use only the first N training images (0 = all)
    val_limit: int = 0             # validate on the first N val images (0 = all)
    group_by_image: bool = False   # a batch holds train.batch_size images with all their captions (else captions)
    mirror: float = 0.0            # probability of training on an image's mirror image, "left"/"right" swapped in
                                   # its captions (vlfuse.data.mirror; the cross-entropy phase, not SCST)

    def __post_init__(self):
        check_mirror_probability(self.mirror)


@dataclasses.dataclass
class CaptionExperiment:
    task: str = "caption"
    data: CaptionDataConfig = dataclasses.field(default_factory=CaptionDataConfig)
    model: CaptionModelConfig = dataclasses.field(default_factory=CaptionModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    val_decode: DecodeConfig = dataclasses.field(default_factory=lambda: DecodeConfig(strategy="greedy"))
    scst: SCSTConfig = dataclasses.field(default_factory=SCSTConfig)  # optional second phase: CIDEr reward
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)  # optional last step: a caption memory


def load_split(cfg: CaptionDataConfig, split: str, limit: int) -> CaptionSet:
    extra = {"image_root": cfg.image_root} if cfg.image_root else {}
    data = read_captions(cfg.path, split=split, fmt=cfg.format, **extra)
    return data.subset(limit) if limit else data


def cached_features(cache: FeatureCache, data: CaptionSet, progress: bool) -> Tuple[torch.Tensor, CaptionSet, List]:
    """Build/load features for ``data``; images that fail are dropped (and returned as failures)."""
    digests, failures = cache.build(data.images, progress=progress, desc=f"features {data.name}")
    keep = [i for i, d in enumerate(digests) if d is not None]
    if not keep:
        raise DataError(f"none of the {len(data)} images in {data.name} could be read")
    kept = CaptionSet([data.images[i] for i in keep], [data.captions[i] for i in keep], data.name)
    return cache.load([digests[i] for i in keep]), kept, failures


class TrainingItem(NamedTuple):
    """An image's row in the cached features and token ids of captions of it: as written, and as they read
    for the image's mirror image (``mirror_text``)."""

    row: int
    captions: List[torch.Tensor]
    mirrored: List[torch.Tensor]


def encode_items(data: CaptionSet, tokenizer: Tokenizer, max_len: int, group_by_image: bool = False
                 ) -> List[TrainingItem]:
    """Training items: one per caption, or one per image with all of its captions (``group_by_image``: the
    image side then runs once for all of them)."""
    def encode(captions: List[str]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        ids = [torch.tensor(tokenizer.encode(c, max_len)) for c in captions]
        mirrored = [t if mirror_text(c) == c else torch.tensor(tokenizer.encode(mirror_text(c), max_len))
                    for c, t in zip(captions, ids)]
        return ids, mirrored

    if group_by_image:
        return [TrainingItem(i, *encode(caps)) for i, caps in enumerate(data.captions) if caps]
    return [TrainingItem(i, *encode([c])) for i, c in data.pairs()]


def make_collate(features: torch.Tensor, mirror: float = 0.0, mirrored_features: Optional[torch.Tensor] = None):
    """Training items -> (stem activations (B_img, C, H, W), tokens (B, L), rows (B,)), ``rows`` naming each
    caption's image. With probability ``mirror`` an image is replaced by its mirror image (``mirrored_features``:
    the cached stem outputs of the mirrored photos, ``FeatureCache(mirrored=True)``) and its captions by their
    mirrored token ids."""
    if mirror > 0 and mirrored_features is None:
        raise ValueError("mirroring needs the cached features of the mirrored images")

    def collate(items: List[TrainingItem]):
        idx = torch.tensor([item.row for item in items])
        acts = features[idx].float()
        flip = draw_mirrored(len(items), mirror)
        if flip.any():
            acts[flip] = mirrored_features[idx[flip]].float()
        counts = torch.tensor([len(item.captions) for item in items])
        rows = torch.arange(len(items)).repeat_interleave(counts)
        captions = [t for item, f in zip(items, flip.tolist()) for t in (item.mirrored if f else item.captions)]
        tokens = torch.nn.utils.rnn.pad_sequence(captions, batch_first=True, padding_value=PAD)
        return acts, tokens, rows
    return collate


@torch.no_grad()
def generate_captions(model: CaptionModel, tokenizer: Tokenizer, features: torch.Tensor, decode: DecodeConfig,
                      batch_size: int = 100, progress: bool = False) -> List[str]:
    """Captions for cached stem activations (M, ...) in order."""
    device = next(model.parameters()).device
    out: List[str] = []
    for s in tqdm(range(0, len(features), batch_size), desc="generating", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        feats: ImageFeatures = model.vision.tail(features[s:s + batch_size].float().to(device))
        out += [tokenizer.decode(ids) for ids, _ in model.generate(feats, decode)]
    return out


def references_and_hypotheses(data: CaptionSet, captions: List[str]) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    refs = {str(p.name): caps for p, caps in zip(data.images, data.captions)}
    hyps = {str(p.name): c for p, c in zip(data.images, captions)}
    return refs, hyps


def train(raw_config: dict, resume: bool = False) -> Dict:
    """Train a caption model from a config mapping (see CaptionExperiment); returns a summary."""
    from ..metrics.caption import score_captions

    exp = from_dict(CaptionExperiment, raw_config)
    t_start = time.time()
    train_set = load_split(exp.data, exp.data.train_split, exp.data.train_limit)
    val_set = load_split(exp.data, exp.data.val_split, exp.data.val_limit)
    out = Path(exp.train.out_dir)
    init = _initial_model(exp)
    if init is not None:
        tokenizer = init.tokenizer
    elif resume and (out / "vocab.json").is_file():
        tokenizer = Tokenizer.load(out)
    else:
        tokenizer = Tokenizer.build((c for caps in train_set.captions for c in caps), exp.data.min_count)
    seed_everything(exp.train.seed)  # initial weights too, not only the training order, follow train.seed
    model = init.model.train() if init is not None else CaptionModel(exp.model, len(tokenizer))
    cache = FeatureCache(exp.data.cache_dir, model.vision)
    train_feats, train_set, bad_train = cached_features(cache, train_set, exp.train.progress)
    val_feats, val_set, bad_val = cached_features(cache, val_set, exp.train.progress)
    for path, err in bad_train + bad_val:
        tqdm.write(f"skipped image: {err}")
    cache_minutes = (time.time() - t_start) / 60
    items = encode_items(train_set, tokenizer, exp.model.max_len, exp.data.group_by_image)
    resolved = to_dict(exp)
    if out and not resume:
        out.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    save_json(resolved, out / "config.resolved.json")

    def evaluate(m: CaptionModel) -> Dict[str, float]:
        caps = generate_captions(m, tokenizer, val_feats, exp.val_decode)
        refs, hyps = references_and_hypotheses(val_set, caps)
        scores = score_captions(refs, hyps, metrics=("BLEU", "CIDEr"), tokenizer="simple")
        return {k: v for k, v in scores.items() if isinstance(v, float)}

    def save_best(m: CaptionModel, directory: Path) -> None:
        # the model's decoding default is the decoding it was selected with on val
        Captioner(m, tokenizer).save_pretrained(directory, training=resolved, decode=to_dict(exp.val_decode))

    if init is not None:  # SCST only: the given model stands in for the cross-entropy phase's best
        if not (resume and (out / "best" / "model.safetensors").is_file()):
            save_best(model, out / "best")
        result = {"best": evaluate(model)[exp.train.select_metric], "best_epoch": 0}
        tqdm.write(f"starting SCST from {exp.scst.init_from}: val {exp.train.select_metric} {result['best']:.4f}")
    else:
        mirrored = None
        if exp.data.mirror > 0:  # the kept training images, mirrored: a second cache entry per image
            mirrored, _, _ = cached_features(FeatureCache(exp.data.cache_dir, model.vision, mirrored=True),
                                             train_set, exp.train.progress)
        collate = make_collate(train_feats, exp.data.mirror, mirrored)
        trainer = Trainer(model, items, collate, lambda net, b: net(*b), evaluate, save_best,
                          exp.train, lengths=[max(len(t) for t in item.captions) for item in items],
                          frozen_prefixes=model.persistent_prefixes(),
                          pretrained_prefixes=model.pretrained_prefixes())
        if resume and trainer.resume():
            tqdm.write(f"resumed from {trainer.last_path} at epoch {trainer.state['epoch'] + 1}, "
                       f"step {trainer.state['global_step']}")
        result = trainer.fit()
    best_dir = out / "best"
    if exp.scst.epochs:
        result, best_dir = _scst_phase(exp, model, tokenizer, train_set, train_feats, evaluate, save_best,
                                       result, resume)
    memory_minutes = 0.0
    if exp.memory.build and is_main_process():  # the training captions (of the images kept), for reranking
        t_memory = time.time()
        build_and_attach(best_dir, train_set, exp.memory, progress=exp.train.progress)
        memory_minutes = (time.time() - t_memory) / 60
    summary = {"best_" + exp.train.select_metric: result["best"], "best_epoch": result["best_epoch"],
               "train_images": len(train_set), "train_captions": sum(len(item.captions) for item in items),
               "vocab_size": len(tokenizer),
               "skipped_images": len(bad_train) + len(bad_val),
               "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "feature_cache_minutes": cache_minutes, "memory_minutes": memory_minutes,
               "total_minutes": (time.time() - t_start) / 60,
               "best_dir": str(best_dir)}
    save_json(summary, out / "summary.json")
    return summary


def _initial_model(exp: CaptionExperiment) -> Optional[Captioner]:
    """The trained model named by ``scst.init_from`` (its own parts and vocabulary win over ``model:``)."""
    if not exp.scst.init_from:
        return None
    if not exp.scst.epochs:
        raise ConfigError("scst.init_from is set but scst.epochs is 0: nothing would be trained")
    init = Captioner.from_pretrained(exp.scst.init_from, device="cpu")
    if to_dict(init.model.config) != to_dict(exp.model):
        tqdm.write(f"note: using the model parts of {exp.scst.init_from}, not the config's model section")
        exp.model = init.model.config
    return init


def _scst_phase(exp: CaptionExperiment, model: CaptionModel, tokenizer: Tokenizer, train_set: CaptionSet,
                train_feats: torch.Tensor, evaluate, save_best, xe_result: Dict, resume: bool):
    """Fine-tune the best cross-entropy model with self-critical training; keep it only if val improves."""
    from ..checkpoint import load_weights

    out = Path(exp.train.out_dir)
    load_weights(out / "best", model, allowed_missing_prefixes=model.persistent_prefixes())
    cfg = exp.scst.train_config(exp.train, out_dir=str(out / "scst"))
    rows = list(range(len(train_set)))

    def collate(items: List[int]):
        idx = torch.tensor(items)
        return train_feats[idx].float(), idx

    loss_fn = make_scst_loss(model, tokenizer, train_set.captions, exp.scst)
    trainer = Trainer(model, rows, collate, loss_fn,
                      evaluate, save_best, cfg, frozen_prefixes=model.persistent_prefixes(),
                      pretrained_prefixes=model.pretrained_prefixes())
    if resume and trainer.resume():
        tqdm.write(f"resumed SCST from {trainer.last_path}")
    result = trainer.fit()
    if result["best"] > xe_result["best"]:
        return result, out / "scst" / "best"
    tqdm.write("SCST did not beat the cross-entropy model on val; keeping the cross-entropy model")
    return xe_result, out / "best"
