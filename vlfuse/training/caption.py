"""Caption training on cached image features: ``train(experiment)`` builds every part from a typed config."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..checkpoint import load_weights, read_config
from ..config import from_dict, save_json, to_dict
from ..data.captions import CaptionSet, read_captions
from ..data.languages import language
from ..data.mirror import check_mirror_probability, draw_mirrored, mirror_text
from ..data.tokenizer import PAD, Tokenizer
from ..errors import ConfigError, DataError
from ..generation import DecodeConfig
from ..hub import resolve_model
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
    lang: str = "en"               # the captions' language (en, zh: the Flickr layout's captions_zh.txt)
    segmenter: str = ""            # how captions split into tokens (default: the language's; zh: jieba words,
                                   # chinese-char: characters); validation scores on the language's words either way
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
    # captions without photos (a Flickr-layout captions file, e.g. Flickr30k's): their words join the vocabulary,
    # and in cross-entropy training each of their photos' 5 captions is one more item, read with an empty image
    # and told, as its concepts, the concept words its captions use (a model with model.concepts only)
    text_only: str = ""
    text_only_limit: int = 0       # text-only photos drawn per epoch (0 = all); the same ones every epoch

    def __post_init__(self):
        check_mirror_probability(self.mirror)
        language(self.lang)  # an unknown language fails here, naming the known ones
        if self.mirror and self.lang != "en":
            raise ConfigError(f"data.mirror swaps English 'left'/'right' in captions; it does not know {self.lang!r}")

    @property
    def word_segmenter(self) -> str:
        """The segmenter of the vocabulary: ``segmenter``, or the language's."""
        return self.segmenter or language(self.lang).segmenter


@dataclasses.dataclass
class CaptionExperiment:
    task: str = "caption"
    # start cross-entropy training from this trained caption model's weights (a name or directory): its decoder
    # and fusion where their shapes match, its word vectors moved to the same words of the new vocabulary
    init_from: str = ""
    data: CaptionDataConfig = dataclasses.field(default_factory=CaptionDataConfig)
    model: CaptionModelConfig = dataclasses.field(default_factory=CaptionModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    val_decode: DecodeConfig = dataclasses.field(default_factory=lambda: DecodeConfig(strategy="greedy"))
    scst: SCSTConfig = dataclasses.field(default_factory=SCSTConfig)  # optional second phase: CIDEr reward
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)  # optional last step: a caption memory


def load_split(cfg: CaptionDataConfig, split: str, limit: int, lang: str = "en") -> CaptionSet:
    """The first ``limit`` images (0: all) of ``split`` with their captions in ``lang``."""
    extra = {"image_root": cfg.image_root} if cfg.image_root else {}
    data = read_captions(cfg.path, split=split, fmt=cfg.format, lang=lang, **extra)
    return data.subset(limit) if limit else data


def cached_features(cache: FeatureCache, data: CaptionSet, progress: bool) -> Tuple[torch.Tensor, CaptionSet, List]:
    """Build/load features for ``data``; images that fail are dropped (and returned as failures)."""
    feats, keep, failures = cache.features(data.images, progress=progress, desc=f"features {data.name}")
    kept = CaptionSet([data.images[i] for i in keep], [data.captions[i] for i in keep], data.name)
    return feats, kept, failures


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


def read_text_only(path: str) -> List[List[str]]:
    """The captions of each photo of a Flickr-layout captions file (``name<TAB>caption``), in file order."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data.text_only: no captions file '{path}'")
    photos: Dict[str, List[str]] = {}
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        name, tab, text = line.partition("\t")
        if not tab or not text.strip():
            raise DataError(f"{path}:{n}: expected 'image_name<TAB>caption', got {line[:80]!r}")
        photos.setdefault(name.split("#")[0], []).append(text.strip())
    return list(photos.values())


def told_concepts(captions: List[List[str]], tokenizer: Tokenizer, words: List[str], k: int, seed: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a text-only photo is told (class ids (M, k), probabilities (M, k)), as a classifier would tell a
    photo: the concepts whose caption words its captions use, most used first, with probabilities drawn in
    [0.3, 0.95] (higher for words more of its captions use), then other concepts at [0, 0.15] — the tail a
    classifier's top k also has, and the cases where the image holds no named thing."""
    generator = torch.Generator().manual_seed(seed)
    classes_of: Dict[str, List[int]] = {}
    for i, w in enumerate(words):
        classes_of.setdefault(w, []).append(i)
    ids = torch.zeros(len(captions), k, dtype=torch.long)
    probs = torch.zeros(len(captions), k)
    for row, caps in enumerate(captions):
        used: Dict[str, int] = {}
        for c in caps:
            for w in set(tokenizer.tokenize(c)):
                if w in classes_of:
                    used[w] = used.get(w, 0) + 1
        named = sorted(used, key=lambda w: -used[w])[:k]
        draws = torch.rand(k, generator=generator)
        for j, w in enumerate(named):
            options = classes_of[w]
            ids[row, j] = options[int(torch.randint(len(options), (1,), generator=generator))]
            probs[row, j] = 0.3 + 0.65 * draws[j] * used[w] / len(caps)
        for j in range(len(named), k):
            ids[row, j] = int(torch.randint(len(words), (1,), generator=generator))
            probs[row, j] = 0.15 * draws[j]
        order = probs[row].argsort(descending=True)
        ids[row], probs[row] = ids[row][order], probs[row][order]
    return ids, probs


def make_collate(features: torch.Tensor, mirror: float = 0.0, mirrored_features: Optional[torch.Tensor] = None,
                 concepts: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Training items -> (stem activations (B_img, C, H, W), tokens (B, L), rows (B,)), ``rows`` naming each
    caption's image. With probability ``mirror`` an image is replaced by its mirror image (``mirrored_features``:
    the cached stem outputs of the mirrored photos, ``FeatureCache(mirrored=True)``) and its captions by their
    mirrored token ids."""
    if mirror > 0 and mirrored_features is None:
        raise ValueError("mirroring needs the cached features of the mirrored images")

    def collate(items: List[TrainingItem]):
        idx = torch.tensor([item.row for item in items])
        photo = idx < len(features)  # rows past the photos are text-only items: an empty image
        acts = features[idx.clamp(max=len(features) - 1)].float()
        acts[~photo] = 0
        flip = draw_mirrored(len(items), mirror) & photo
        if flip.any():
            acts[flip] = mirrored_features[idx[flip]].float()
        counts = torch.tensor([len(item.captions) for item in items])
        rows = torch.arange(len(items)).repeat_interleave(counts)
        captions = [t for item, f in zip(items, flip.tolist()) for t in (item.mirrored if f else item.captions)]
        tokens = torch.nn.utils.rnn.pad_sequence(captions, batch_first=True, padding_value=PAD)
        if concepts is None:
            return acts, tokens, rows
        return acts, tokens, rows, concepts[0][idx], concepts[1][idx]
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
    if exp.memory.build and exp.data.lang != "en":  # fail now, not after training
        retriever_languages = ["en"] + read_config(resolve_model(exp.memory.rerank.retriever)).get("languages", [])
        if exp.data.lang not in retriever_languages:
            raise ConfigError(f"memory.build: retrieval model '{exp.memory.rerank.retriever}' reads "
                              f"{', '.join(retriever_languages)}, so it cannot embed {exp.data.lang!r} captions; "
                              f"name one with a {exp.data.lang} text tower or set memory.build to false")
    t_start = time.time()
    train_set = load_split(exp.data, exp.data.train_split, exp.data.train_limit, exp.data.lang)
    val_set = load_split(exp.data, exp.data.val_split, exp.data.val_limit, exp.data.lang)
    out = Path(exp.train.out_dir)
    init = _initial_model(exp)
    text_only = read_text_only(exp.data.text_only) if exp.data.text_only else []
    if text_only and not exp.model.concepts:
        raise ConfigError("data.text_only trains the language side through told concepts: set model.concepts")
    if init is not None:
        tokenizer = init.tokenizer
    elif resume and (out / "vocab.json").is_file():
        tokenizer = Tokenizer.load(out)
    else:
        tokenizer = Tokenizer.build((c for caps in train_set.captions + text_only for c in caps), exp.data.min_count,
                                    segmenter=exp.data.word_segmenter)
    seed_everything(exp.train.seed)  # initial weights too, not only the training order, follow train.seed
    model = init.model.train() if init is not None else CaptionModel(exp.model, len(tokenizer))
    if exp.model.concepts and init is None:
        known = model.set_concept_words(tokenizer.index)
        tqdm.write(f"concepts: {known} of {len(model.concept_head.words)} classes have their word in the vocabulary")
    if exp.init_from and init is None and not resume:
        _start_from(model, tokenizer, exp.init_from)
    cache = FeatureCache(exp.data.cache_dir, model.vision)
    train_feats, train_set, bad_train = cached_features(cache, train_set, exp.train.progress)
    val_feats, val_set, bad_val = cached_features(cache, val_set, exp.train.progress)
    for path, err in bad_train + bad_val:
        tqdm.write(f"skipped image: {err}")
    cache_minutes = (time.time() - t_start) / 60
    items = encode_items(train_set, tokenizer, exp.model.max_len, exp.data.group_by_image)
    concepts = None
    if exp.model.concepts:  # each photo's own, then what each text-only photo is told
        with torch.no_grad():
            photo_ids, photo_probs = zip(*(model.concepts_of(model.vision.tail(train_feats[s:s + 256].float()))
                                           for s in range(0, len(train_feats), 256)))
        if exp.data.text_only_limit:
            text_only = text_only[:exp.data.text_only_limit]
        text_ids, text_probs = told_concepts(text_only, tokenizer, model.concept_head.words, exp.model.concepts,
                                             exp.train.seed)
        concepts = (torch.cat(list(photo_ids) + [text_ids]), torch.cat(list(photo_probs) + [text_probs]))
        text = CaptionSet([Path(f"text-only-{i}") for i in range(len(text_only))], text_only, "text-only")
        items += [item._replace(row=len(train_feats) + item.row)
                  for item in encode_items(text, tokenizer, exp.model.max_len, group_by_image=True)]
    resolved = to_dict(exp)
    if out and not resume:
        out.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    save_json(resolved, out / "config.resolved.json")

    def evaluate(m: CaptionModel) -> Dict[str, float]:
        caps = generate_captions(m, tokenizer, val_feats, exp.val_decode)
        refs, hyps = references_and_hypotheses(val_set, caps)
        scores = score_captions(refs, hyps, metrics=("BLEU", "CIDEr"), tokenizer="simple", lang=exp.data.lang)
        return {k: v for k, v in scores.items() if isinstance(v, float)}

    def save_best(m: CaptionModel, directory: Path) -> None:
        # the model's decoding default is the decoding it was selected with on val
        Captioner(m, tokenizer).save_pretrained(directory, training=resolved, decode=to_dict(exp.val_decode),
                                                lang=exp.data.lang)

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
        collate = make_collate(train_feats, exp.data.mirror, mirrored, concepts)
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


def _start_from(model: CaptionModel, tokenizer: Tokenizer, name: str) -> None:
    """Copy a trained caption model's weights into ``model`` (``init_from``): every decoder tensor of the same
    name and shape, and its word vectors to the same words of ``tokenizer``'s vocabulary."""
    source = Captioner.from_pretrained(name, device="cpu")
    theirs = source.model.state_dict()
    own = model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in theirs.items():
            if key.startswith("decoder.") and key in own and own[key].shape == value.shape:
                own[key].copy_(value)
                copied += 1
        embed = model.decoder.embed.weight
        old = source.model.decoder.embed.weight
        shared = [(i, source.tokenizer.index[w]) for i, w in enumerate(tokenizer.vocab) if w in source.tokenizer.index]
        embed[torch.tensor([i for i, _ in shared])] = old[torch.tensor([j for _, j in shared])].to(embed.dtype)
    tqdm.write(f"init_from {name}: {copied} tensors, {len(shared)} of {len(tokenizer)} word vectors")


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
