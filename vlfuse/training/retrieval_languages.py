"""Training a text tower in another language into an existing retrieval model's space
(``vlfuse.tasks.retrieval.languages``).

The base model stays as it is: its image vectors of the training and val photos are computed once (with its
concept term, exactly as an index stores them) and cached, and the new tower learns to put each caption near its
photo's vector:

- text -> image: InfoNCE of each caption against *every* training photo's vector (the vectors are fixed, so all
  6,000 photos are negatives at the cost of one matrix product);
- image -> text: InfoNCE of each photo in the batch against the batch's captions;
- English (``english_weight``): InfoNCE of each caption against the mean vector of every photo's English captions
  (made by the base model's English tower). Text vectors and image vectors sit apart in a contrastive space (the
  "modality gap"); this pulls the new language to where English queries of the same photos land, not only toward
  the photos. The English captions describe the same photos independently: they are not translations.

The temperature is the base model's learnt one. Word dropout (``word_dropout``) replaces words by <unk> while
training. Validation scores recall@K on the val photos' captions in the language, against the val photos' vectors;
the best epoch is written as a copy of the base checkpoint with the tower added (``out_dir/best``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import from_dict, save_json, to_dict
from ..data.captions import CaptionSet, read_captions
from ..data.tokenizer import UNK, Tokenizer
from ..errors import ConfigError, DataError
from ..io import atomic_path, config_digest
from ..metrics.retrieval import recall_metrics
from ..nn.text import pad_batch
from ..tasks.retrieval.languages import LanguageTower, LanguageTowerConfig
from ..tasks.retrieval.pipeline import Retriever
from .trainer import TrainConfig, Trainer, best_val_scores, seed_everything


@dataclasses.dataclass
class LanguageTowerData:
    path: str = "../shared/data/flickr8k"   # a Flickr-layout folder with the language's captions file
    format: str = "auto"
    train_split: str = "train"
    val_split: str = "val"
    cache_dir: str = "cache/retrieval_languages"  # the base model's image vectors and English caption centroids
    train_limit: int = 0
    val_limit: int = 0
    min_count: int = 2                      # the vocabulary: tokens seen at least this often in training captions


@dataclasses.dataclass
class LanguageTowerExperiment:
    task: str = "retrieval-language"
    retriever: str = "flickr8k-retrieval"   # the retrieval model (name or directory) whose space the tower joins
    data: LanguageTowerData = dataclasses.field(default_factory=LanguageTowerData)
    tower: LanguageTowerConfig = dataclasses.field(default_factory=LanguageTowerConfig)
    english_weight: float = 1.0             # weight of the pull toward the photos' English captions (0: off)
    word_dropout: float = 0.1
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(select_metric="rsum", out_dir="runs/retrieval_zh", batch_size=256,
                                            lr=2e-3, epochs=10, warmup_steps=100, patience=3))

    def __post_init__(self):
        if self.english_weight < 0 or not 0 <= self.word_dropout < 1:
            raise ConfigError("english_weight must be >= 0 and word_dropout in [0, 1)")


class TowerObjective(nn.Module):
    """The tower and the fixed targets it learns against; ``forward`` returns the training losses."""

    def __init__(self, tower: LanguageTower, images: torch.Tensor, english: Optional[torch.Tensor],
                 scale: float, english_weight: float):
        super().__init__()
        self.tower = tower
        self.register_buffer("images", images.float(), persistent=False)  # (N, D) the training photos' vectors
        self.register_buffer("english", english.float() if english is not None else None, persistent=False)
        self.scale, self.english_weight = scale, english_weight

    def forward(self, owners: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        txt = self.tower(ids, mask)  # (B, D)
        t2i = F.cross_entropy(self.scale * txt @ self.images.T, owners)
        sim = self.images[owners] @ txt.T  # (B, B): a photo against the batch's captions
        same = (owners[:, None] == owners[None, :]) & ~torch.eye(len(owners), dtype=torch.bool, device=sim.device)
        i2t = F.cross_entropy(self.scale * sim.masked_fill(same, -1.0), torch.arange(len(owners), device=sim.device))
        losses = {"t2i": t2i, "i2t": i2t, "loss": t2i + i2t}
        if self.english is not None and self.english_weight:
            losses["english"] = F.cross_entropy(self.scale * txt @ self.english.T, owners)
            losses["loss"] = losses["loss"] + self.english_weight * losses["english"]
        return losses


def image_vectors(retriever: Retriever, data: CaptionSet, cache_dir: str, progress: bool
                  ) -> Tuple[torch.Tensor, CaptionSet]:
    """The base model's vectors (N, D) of ``data``'s photos, as an index stores them; cached by model id and photo
    list. Unreadable photos are dropped (with a message)."""
    path = Path(cache_dir) / f"images-{config_digest([retriever.model_id, [str(p) for p in data.images]])}.pt"
    if path.is_file():
        saved = torch.load(path)
        return saved["vectors"], CaptionSet([data.images[i] for i in saved["keep"]],
                                            [data.captions[i] for i in saved["keep"]], data.name)
    vectors, keep = [], []
    bar = tqdm(total=len(data), desc=f"image vectors {data.name}", unit="img", disable=not progress)
    for i, (_, vector, error) in enumerate(retriever.embed_files(data.images)):
        bar.update()
        if error:
            tqdm.write(f"skipped image: {error}")
            continue
        vectors.append(torch.from_numpy(vector))
        keep.append(i)
    bar.close()
    if not keep:
        raise DataError(f"none of the {len(data)} photos of '{data.name}' could be read")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"vectors": torch.stack(vectors), "keep": keep}, tmp)
    return image_vectors(retriever, data, cache_dir, progress)


def english_centroids(retriever: Retriever, data: CaptionSet, exp: LanguageTowerExperiment, split: str
                      ) -> torch.Tensor:
    """(N, D): for each of ``data``'s photos, the normalised mean of its English captions' vectors; cached."""
    english = read_captions(exp.data.path, split=split, fmt=exp.data.format)
    by_photo = dict(zip((str(p) for p in english.images), english.captions))
    missing = [p for p in data.images if str(p) not in by_photo]
    if missing:
        raise DataError(f"{len(missing)} photos have no English captions (first: {missing[0]}); set "
                        f"english_weight: 0 to train without them")
    path = Path(exp.data.cache_dir) / f"english-{config_digest([retriever.model_id, [str(p) for p in data.images]])}.pt"
    if path.is_file():
        return torch.load(path)
    captions = [c for p in data.images for c in by_photo[str(p)]]
    owner = torch.tensor([i for i, p in enumerate(data.images) for _ in by_photo[str(p)]])
    vectors = torch.from_numpy(retriever.embed_texts(captions, lang="en"))
    centroids = F.normalize(torch.zeros(len(data), vectors.shape[1]).index_add_(0, owner, vectors), dim=-1)
    with atomic_path(path) as tmp:
        torch.save(centroids, tmp)
    return centroids


def caption_rows(tokenizer: Tokenizer, data: CaptionSet, max_len: int) -> Tuple[List[List[int]], List[int]]:
    """Every caption's token ids, and the photo (row of ``data``) it describes."""
    ids = [tokenizer.encode(c, max_len) for caps in data.captions for c in caps]
    return ids, [i for i, caps in enumerate(data.captions) for _ in caps]


@torch.no_grad()
def score(tower: LanguageTower, images: torch.Tensor, ids: Sequence[List[int]], owner: Sequence[int]
          ) -> Dict[str, float]:
    tower.eval()
    texts = torch.cat([tower(*pad_batch(ids[s:s + 512])) for s in range(0, len(ids), 512)])
    return recall_metrics((images.float() @ texts.T).numpy(), owner)


def train(raw_config: dict, resume: bool = False) -> Dict:
    """Train a language tower from a config mapping (see LanguageTowerExperiment); returns a summary."""
    exp = from_dict(LanguageTowerExperiment, raw_config)
    t_start = time.time()
    lang = exp.tower.lang
    base = Retriever.from_pretrained(exp.retriever)
    if exp.tower.embed_dim != base.dim:
        raise ConfigError(f"tower.embed_dim is {exp.tower.embed_dim}, but '{exp.retriever}' embeds in {base.dim} dimensions")
    kwargs = {"fmt": exp.data.format, "lang": lang}
    train_set = read_captions(exp.data.path, split=exp.data.train_split, **kwargs)
    val_set = read_captions(exp.data.path, split=exp.data.val_split, **kwargs)
    if exp.data.train_limit:
        train_set = train_set.subset(exp.data.train_limit)
    if exp.data.val_limit:
        val_set = val_set.subset(exp.data.val_limit)
    train_images, train_set = image_vectors(base, train_set, exp.data.cache_dir, exp.train.progress)
    val_images, val_set = image_vectors(base, val_set, exp.data.cache_dir, exp.train.progress)
    english = english_centroids(base, train_set, exp, exp.data.train_split) if exp.english_weight else None

    seed_everything(exp.train.seed)
    tokenizer = Tokenizer.build((c for caps in train_set.captions for c in caps), min_count=exp.data.min_count,
                                segmenter=exp.tower.segmenter)
    tower = LanguageTower(exp.tower, tokenizer)
    train_ids, train_owner = caption_rows(tokenizer, train_set, exp.tower.max_len)
    val_ids, val_owner = caption_rows(tokenizer, val_set, exp.tower.max_len)
    objective = TowerObjective(tower, train_images, english, float(base.model.logit_scale.detach().exp()),
                               exp.english_weight)
    cache_minutes = (time.time() - t_start) / 60
    out = Path(exp.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = to_dict(exp)
    save_json(resolved, out / "config.resolved.json")

    def collate(rows: List[int]):
        ids, mask = pad_batch([train_ids[r] for r in rows])
        if exp.word_dropout:
            words = mask.bool() & (ids > UNK)  # <bos>/<eos> stay
            ids = ids.masked_fill(words & (torch.rand(ids.shape) < exp.word_dropout), UNK)
        return torch.tensor([train_owner[r] for r in rows]), ids, mask

    def save_best(m: TowerObjective, directory: Path) -> None:
        trained = LanguageTower(exp.tower, tokenizer)
        trained.load_state_dict(m.tower.state_dict())
        base.towers[lang] = trained
        base.save_pretrained(directory, **{f"training_{lang}": resolved})

    trainer = Trainer(objective, list(range(len(train_ids))), collate, lambda net, b: net(*b),
                      lambda m: score(m.tower, val_images, val_ids, val_owner), save_best, exp.train)
    if resume and trainer.resume():
        tqdm.write(f"resumed from {trainer.last_path} at epoch {trainer.state['epoch'] + 1}")
    result = trainer.fit()
    summary = {"best_" + exp.train.select_metric: result["best"], "best_epoch": result["best_epoch"],
               "lang": lang, "retriever": exp.retriever, "vocabulary": len(tokenizer), "train_images": len(train_set),
               "train_captions": len(train_ids), "val_images": len(val_set), "val_captions": len(val_ids),
               "parameters": sum(p.numel() for p in tower.parameters()),
               "cache_minutes": cache_minutes, "total_minutes": (time.time() - t_start) / 60,
               "best_dir": str(out / "best")}
    if best_val_scores(result):
        summary["best_val"] = best_val_scores(result)
    save_json(summary, out / "summary.json")
    return summary
