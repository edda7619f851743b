"""VQA training: ``train(raw_config)`` builds every part from a typed config and runs the shared Trainer.

Images are decoded and transformed once into an in-memory tensor (and a frozen stem, if any, is run once, and
once more over the mirror images when training mirrors); a training item is one image with all of its questions,
so the vision encoder sees each image once per step however many questions are asked about it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..config import from_dict, merge_over, save_json, to_dict
from ..data.mirror import check_mirror_probability, draw_mirrored, mirror_pixels, mirror_text
from ..data.tokenizer import Tokenizer
from ..data.vqa import (
    EASY_VQA,
    EASY_VQA_VAL_FRACTION,
    VQASet,
    build_answer_vocab,
    load_pixels,
    majority_answer,
    read_vqa,
    split_images,
)
from ..errors import DataError
from ..evaluation.vqa import logits_set, predict_set, score_answers
from ..metrics.vqa import answer_accuracy, expected_calibration_error, soft_scores
from ..nn.text import pad_batch
from ..registry import TEXT_ENCODERS
from ..tasks.vqa.model import VQAModel, VQAModelConfig, soft_cross_entropy
from ..tasks.vqa.pipeline import (
    QUESTION_WORDS,
    AnswerCalibration,
    AnswerEnsemble,
    QuestionAnswerer,
    make_question_tokenizer,
)
from .features import FeatureCache
from .trainer import TrainConfig, Trainer, seed_everything


@dataclasses.dataclass
class VQADataConfig:
    path: str = EASY_VQA             # 'easy-vqa', a JSONL file, or a folder with <split>.jsonl files
    train_split: str = "train"
    val_split: str = ""              # empty: hold out val_fraction of the training images instead
    val_fraction: float = EASY_VQA_VAL_FRACTION
    test_split: str = "test"         # scored with the best checkpoint after training (empty: skip)
    max_answers: int = 1000          # answer vocabulary: the most frequent training answers
    train_limit: int = 0             # use only the first N training questions (0 = all)
    val_limit: int = 0
    mirror: float = 0.0              # probability of training on an image's mirror image, "left"/"right" swapped
                                     # in its questions and answers (vlfuse.data.mirror)
    cache_dir: str = "cache/features"  # stem outputs of a frozen pretrained encoder, kept across runs (FeatureCache)

    def __post_init__(self):
        check_mirror_probability(self.mirror)


# VQA's own training defaults (a batch is 32 images with all their questions); keys a config sets win
TRAIN_DEFAULTS = {"select_metric": "accuracy", "out_dir": "runs/vqa", "lr": 2e-3, "batch_size": 32,
                  "warmup_steps": 100, "epochs": 12, "patience": 4, "checkpoint_every": 0}


@dataclasses.dataclass
class VQAExperiment:
    task: str = "vqa"
    data: VQADataConfig = dataclasses.field(default_factory=VQADataConfig)
    model: VQAModelConfig = dataclasses.field(default_factory=VQAModelConfig)
    # when answers are flagged unsure; the temperature is fitted on the validation questions after training
    calibration: AnswerCalibration = dataclasses.field(default_factory=AnswerCalibration)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(**TRAIN_DEFAULTS))
    # an ensemble (``AnswerEnsemble``): member name -> settings over this config (e.g. another question encoder);
    # each member is trained into train.out_dir/<name>, then they are put together in train.out_dir/best
    members: Dict[str, dict] = dataclasses.field(default_factory=dict)


def parse_experiment(raw_config: dict) -> VQAExperiment:
    """Typed experiment from a mapping, with VQA's training defaults under whatever the mapping sets."""
    raw = dict(raw_config)
    raw["train"] = {**TRAIN_DEFAULTS, **(raw.get("train") or {})}
    return from_dict(VQAExperiment, raw)


def load_splits(cfg: VQADataConfig) -> Tuple[VQASet, VQASet]:
    train = read_vqa(cfg.path, cfg.train_split).limit_questions(cfg.train_limit)
    if cfg.val_split:
        val = read_vqa(cfg.path, cfg.val_split)
    else:
        train, val = split_images(train, cfg.val_fraction, seed=0)
    return train, val.limit_questions(cfg.val_limit)


class Question(NamedTuple):
    """A training question: its token ids and soft answer scores {answer index: score}, as asked and as it
    reads for the image's mirror image (``mirror_text`` of the question and of every answer)."""

    ids: torch.Tensor
    targets: Dict[int, float]
    mirrored_ids: torch.Tensor
    mirrored_targets: Dict[int, float]


def encode_items(data: VQASet, tokenizer, answers: List[str], max_len: int) -> List[Tuple[int, List[Question]]]:
    """One item per image: (image index, its questions)."""
    index = {a: i for i, a in enumerate(answers)}

    def targets(answer_scores: Dict[str, float]) -> Dict[int, float]:
        return {index[a]: s for a, s in answer_scores.items() if a in index}

    per_image: Dict[int, List[Question]] = {}
    for q in data.questions:
        scores = soft_scores(q.answers)
        ids = torch.tensor(tokenizer.encode(q.question, max_len))
        mirrored = mirror_text(q.question)
        mirrored_ids = ids if mirrored == q.question else torch.tensor(tokenizer.encode(mirrored, max_len))
        mirrored_scores = {mirror_text(a): s for a, s in scores.items()}  # "left" <-> "right": one to one
        question = Question(ids, targets(scores), mirrored_ids, targets(mirrored_scores))
        per_image.setdefault(q.image, []).append(question)
    return sorted(per_image.items())


QuestionStates = Dict[Tuple[int, ...], torch.Tensor]  # question token ids -> its frozen_states (T, D), fp16


@torch.no_grad()
def frozen_question_states(text, items: List[Tuple[int, List[Question]]], pad_id: int, batch_size: int = 256,
                           progress: bool = False) -> QuestionStates:
    """A pretrained question encoder's frozen part (``frozen_states``: MiniLM's embeddings and frozen layers) run
    once over every distinct training question, as asked and mirrored: it gives the same output every epoch (no
    dropout in it), so training then runs only the encoder's trainable top, if any."""
    distinct = sorted({tuple(ids.tolist()) for _, questions in items for q in questions
                       for ids in (q.ids, q.mirrored_ids)}, key=len)  # similar lengths together: less padding
    states: QuestionStates = {}
    for s in tqdm(range(0, len(distinct), batch_size), desc="question states", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        chunk = distinct[s:s + batch_size]
        batch = text.frozen_states(*pad_batch(chunk, pad_id)).half()  # (B, T, D)
        for row, ids in enumerate(chunk):
            states[ids] = batch[row, :len(ids)]
    return states


def make_collate(acts: torch.Tensor, num_answers: int, pad_id: int, mirror: float = 0.0,
                 mirrored_acts: Optional[torch.Tensor] = None, question_states: Optional[QuestionStates] = None):
    """Items (see ``encode_items``) -> (stem activations (M, ...), each question's image (Q,), question ids (Q, T),
    their mask, soft answer targets (Q, A)). With probability ``mirror`` an image is replaced by its mirror image
    (``mirrored_acts``) and its questions and answers by their mirrored forms. With ``question_states``
    (``frozen_question_states``), each question's cached states (Q, T, D) stand in for its ids."""
    if mirror > 0 and mirrored_acts is None:
        raise ValueError("mirroring needs the stem activations of the mirror images")

    def collate(items):
        images = torch.tensor([i for i, _ in items])
        batch_acts = acts[images].float()  # (M, ...)
        flip = draw_mirrored(len(items), mirror)
        if flip.any():
            batch_acts[flip] = mirrored_acts[images[flip]].float()
        image_index, seqs, targets = [], [], []
        for m, ((_, questions), mirrored) in enumerate(zip(items, flip.tolist())):
            for q in questions:
                ids, scores = (q.mirrored_ids, q.mirrored_targets) if mirrored else (q.ids, q.targets)
                image_index.append(m)
                seqs.append(ids)
                row = torch.zeros(num_answers)
                for a, s in scores.items():
                    row[a] = s
                targets.append(row)
        if question_states is not None:
            states = [question_states[tuple(ids.tolist())] for ids in seqs]
            mask = pad_batch([[1] * len(ids) for ids in seqs])[1]
            padded = torch.nn.utils.rnn.pad_sequence(states, batch_first=True).float()  # (Q, T, D)
            return batch_acts, torch.tensor(image_index), padded, mask, torch.stack(targets)
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
        return batch_acts, torch.tensor(image_index), ids, ids != pad_id, torch.stack(targets)
    return collate


def vqa_loss(net, batch) -> Dict[str, torch.Tensor]:
    acts, image_index, ids, mask, targets = batch
    logits = net(acts, image_index, ids, mask)  # (Q, A)
    loss = soft_cross_entropy(logits, targets)
    acc = targets.gather(1, logits.argmax(-1, keepdim=True)).clamp(max=1).mean()
    return {"loss": loss, "acc": acc.detach()}


def prepare_images(network: VQAModel, data: VQASet, progress: bool, mirrored: bool = False, cache_dir: str = ""
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], VQASet]:
    """Run the frozen stem once over every image (and over the mirror images, when ``mirrored``); drop questions
    about unreadable images. A pretrained stem's outputs go through the on-disk ``FeatureCache`` under
    ``cache_dir`` (shared with caption training), so a second run or another fusion never re-runs the CNN; a
    stem trained from scratch (small-cnn) is run in memory. Returns (activations, mirrored or None, data)."""
    if cache_dir and getattr(network.vision, "pretrained", False):
        return _cached_stem(network, data, progress, mirrored, cache_dir)
    pixels, kept, errors = load_pixels(data.images, network.vision.transform, progress, desc=f"images {data.name}")
    for err in errors:
        tqdm.write(f"skipped image: {err}", file=sys.stderr)
    if errors:
        data = data.subset_images(kept)
    show = progress and len(pixels) > 1000
    acts = network.stem_activations(pixels, progress=show)
    return acts, network.stem_activations(mirror_pixels(pixels), progress=show) if mirrored else None, data


def _cached_stem(network: VQAModel, data: VQASet, progress: bool, mirrored: bool, cache_dir: str
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor], VQASet]:
    acts, kept, failures = FeatureCache(cache_dir, network.vision).features(data.images, progress,
                                                                            f"features {data.name}")
    for path, why in failures:
        tqdm.write(f"skipped image {path}: {why}", file=sys.stderr)
    if len(kept) < len(data.images):
        data = data.subset_images(kept)
    if not mirrored:
        return acts, None, data
    mirror = FeatureCache(cache_dir, network.vision, mirrored=True)
    mirrored_acts, mirror_kept, _ = mirror.features(data.images, progress, f"mirrored features {data.name}")
    if len(mirror_kept) < len(data.images):  # an image that changed or vanished between the two passes
        raise DataError(f"{len(data.images) - len(mirror_kept)} images of {data.name} could not be read a second time")
    return acts, mirrored_acts, data


def train(raw_config: dict, resume: bool = False) -> Dict:
    """Train a VQA model from a config mapping (see VQAExperiment); returns a summary (with test accuracy)."""
    exp = parse_experiment(raw_config)
    if exp.members:
        return train_ensemble(raw_config, exp, resume)
    t_start = time.time()
    train_set, val_set = load_splits(exp.data)
    for line in train_set.skipped:
        tqdm.write(f"skipped {line}", file=sys.stderr)
    if train_set.skipped:
        tqdm.write(f"{len(train_set.skipped)} bad lines skipped in {train_set.name}; training goes on", file=sys.stderr)
    out = Path(exp.train.out_dir)
    answers = build_answer_vocab(train_set, exp.data.max_answers)
    if not answers:
        raise DataError(f"no answers found in {train_set.name}")
    tokenizer = _question_tokenizer(exp, train_set, out, resume)
    model_cfg = dataclasses.replace(exp.model, num_answers=len(answers), vocab_size=len(tokenizer))
    seed_everything(exp.train.seed)  # the initial weights follow train.seed too, not only the training order
    network = VQAModel(model_cfg)
    train_acts, mirrored_acts, train_set = prepare_images(network, train_set, exp.train.progress,
                                                          mirrored=exp.data.mirror > 0, cache_dir=exp.data.cache_dir)
    val_acts, _, val_set = prepare_images(network, val_set, exp.train.progress, cache_dir=exp.data.cache_dir)
    prep_minutes = (time.time() - t_start) / 60
    items = encode_items(train_set, tokenizer, answers, model_cfg.max_question_len)
    resolved = to_dict(dataclasses.replace(exp, model=model_cfg))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    save_json(resolved, out / "config.resolved.json")

    def evaluate(net: VQAModel) -> Dict[str, float]:
        preds = predict_set(QuestionAnswerer(net, tokenizer, answers), val_set, val_acts)
        return {k: v for k, v in score_answers(val_set, [p.answer for p in preds]).items() if isinstance(v, float)}

    def save_best(net: VQAModel, directory: Path) -> None:
        QuestionAnswerer(net, tokenizer, answers).save_pretrained(directory, training=resolved)

    pad_id = getattr(tokenizer, "pad_id", 0)
    states = None
    if hasattr(network.text, "frozen_states"):
        network.text.eval()  # no dropout in the frozen part (it is never trained, MiniLMEncoder.train)
        states = frozen_question_states(network.text, items, pad_id, progress=exp.train.progress)
    collate = make_collate(train_acts, len(answers), pad_id, exp.data.mirror, mirrored_acts, states)
    trainer = Trainer(network, items, collate, vqa_loss, evaluate, save_best, exp.train)
    if resume and trainer.resume():
        tqdm.write(f"resumed from {trainer.last_path} at epoch {trainer.state['epoch'] + 1}")
    t_train = time.time()
    result = trainer.fit()
    train_minutes = (time.time() - t_train) / 60
    calibration = with_training_questions(exp.calibration, train_set)
    summary = {"calibration": calibrate(out / "best", val_set, val_acts, calibration)}
    summary.update({"best_val_" + exp.train.select_metric: result["best"], "best_epoch": result["best_epoch"],
               "epochs_run": len(result["history"]), "train_images": len(train_set.images),
               "train_questions": len(train_set), "val_questions": len(val_set), "answers": len(answers),
               "question_vocab": len(tokenizer), "skipped_lines": len(train_set.skipped),
               "parameters": sum(p.numel() for p in network.parameters() if p.requires_grad),
               "prepare_minutes": prep_minutes, "train_minutes": train_minutes, "best_dir": str(out / "best")})
    if exp.data.test_split:
        from ..evaluation.vqa import evaluate_model

        best = QuestionAnswerer.from_pretrained(out / "best", device=str(trainer.device))
        test = read_vqa(exp.data.path, exp.data.test_split)
        summary["test"] = evaluate_model(best, test, progress=exp.train.progress)
    summary["total_minutes"] = (time.time() - t_start) / 60
    save_json(summary, out / "summary.json")
    return summary


def train_ensemble(raw_config: dict, exp: VQAExperiment, resume: bool = False) -> Dict:
    """Train each of ``exp.members`` (this config with the member's settings over it) into out_dir/<name>, put them
    together as an ``AnswerEnsemble`` in out_dir/best, calibrate it on val and score it there. With ``resume``, a
    member that finished (its summary.json is written) is not trained again."""
    t_start = time.time()
    out = Path(exp.train.out_dir)
    shared = {k: v for k, v in raw_config.items() if k != "members"}
    summaries = {}
    for name, settings in exp.members.items():
        member_dir = out / name
        done = member_dir / "summary.json"
        if resume and done.is_file():
            tqdm.write(f"ensemble member '{name}': trained already ({done})", file=sys.stderr)
            summaries[name] = json.loads(done.read_text(encoding="utf-8"))
            continue
        tqdm.write(f"ensemble member '{name}' ({len(summaries) + 1}/{len(exp.members)}) -> {member_dir}",
                   file=sys.stderr)
        raw = merge_over(merge_over(shared, settings or {}), {"train": {"out_dir": str(member_dir)}})
        summaries[name] = train(raw, resume=resume)
    members = {name: QuestionAnswerer.from_pretrained(out / name / "best") for name in exp.members}
    ensemble = AnswerEnsemble(members, {"training": to_dict(exp)})
    ensemble.save_pretrained(out / "best")
    # the members were trained on the same questions: the first one's calibration already lists their words
    first = next(iter(members.values())).calibration
    calibration = dataclasses.replace(exp.calibration, words=first.words, openings=first.openings)
    val_set = read_vqa(exp.data.path, exp.data.val_split) if exp.data.val_split else load_splits(exp.data)[1]
    val_acts, _, val_set = prepare_images(next(iter(members.values())).network, val_set, exp.train.progress,
                                          cache_dir=exp.data.cache_dir)
    summary = {"calibration": calibrate(out / "best", val_set, val_acts, calibration)}
    best = QuestionAnswerer.from_pretrained(out / "best")
    scores = score_answers(val_set, [a.answer for a in predict_set(best, val_set, val_acts)])
    summary.update({"best_val_accuracy": scores["accuracy"], "val": scores,
                    "members": {name: {k: s.get(k) for k in ("best_val_accuracy", "best_epoch", "train_minutes",
                                                              "parameters", "best_dir")}
                                for name, s in summaries.items()},
                    "parameters": sum(s.get("parameters", 0) for s in summaries.values()),
                    "train_minutes": sum(s.get("train_minutes", 0.0) for s in summaries.values()),
                    "total_minutes": (time.time() - t_start) / 60, "best_dir": str(out / "best")})
    save_json(summary, out / "summary.json")
    return summary


TEMPERATURES = torch.logspace(-2, 3, 81, base=2.0)  # 0.25 ... 8, a grid fine enough for one scalar


OPENING_MIN_COUNT = 3  # a question opening (first two words) seen this often in training counts as known


def with_training_questions(calibration: AnswerCalibration, train: VQASet) -> AnswerCalibration:
    """``calibration`` with the words and openings of the training questions (what ``AnswerCalibration.doubt``
    compares a question with)."""
    asked = [QUESTION_WORDS(q.question) for q in train.questions]
    openings = Counter(" ".join(words[:2]) for words in asked if len(words) >= 2)
    return dataclasses.replace(calibration, words=sorted({w for words in asked for w in words}),
                               openings=[o for o, c in openings.most_common() if c >= OPENING_MIN_COUNT])


@torch.inference_mode()
def calibrate(best_dir: Path, val: VQASet, val_acts: torch.Tensor, calibration: AnswerCalibration) -> Dict:
    """Temperature scaling (Guo et al. 2017): the temperature that minimises the negative log-likelihood of the
    validation answers, written into the best checkpoint's config with ``calibration`` (its thresholds and the
    training questions' words and openings: ``with_training_questions``). Returns the fitted temperature and the
    validation ECE before and after."""
    model = QuestionAnswerer.from_pretrained(best_dir)
    logits = logits_set(model, val, val_acts)
    index = {a: i for i, a in enumerate(model.answers)}
    targets = torch.tensor([index.get(majority_answer(q.answers), -1) for q in val.questions])
    known = targets >= 0
    nll = torch.stack([torch.nn.functional.cross_entropy(logits[known] / t, targets[known]) for t in TEMPERATURES])
    temperature = float(TEMPERATURES[int(nll.argmin())])

    def ece(t: float) -> float:
        probs, best = (logits / t).softmax(-1).max(-1)
        correct = [answer_accuracy(model.answers[b], q.answers) for b, q in zip(best.tolist(), val.questions)]
        return expected_calibration_error(probs.tolist(), correct)

    model.calibration = dataclasses.replace(calibration, temperature=temperature)
    model.save_pretrained(best_dir)
    return {"temperature": temperature, "val_ece_before": ece(1.0), "val_ece_after": ece(temperature),
            "unsure_below": calibration.unsure_below, "min_known_words": calibration.min_known_words,
            "words": len(calibration.words), "openings": len(calibration.openings)}


def _question_tokenizer(exp: VQAExperiment, train_set: VQASet, out: Path, resume: bool):

    if TEXT_ENCODERS.get(exp.model.text.name).own_tokenizer:
        return make_question_tokenizer(exp.model)
    if resume and (out / "vocab.json").is_file():
        return Tokenizer.load(out)
    return Tokenizer.build((q.question for q in train_set.questions), min_count=1)  # every training word
