"""Visual question answering: ``VQAModel`` (vision encoder + question encoder + fusion module + classifier
head over the answer vocabulary, every part from the shared registries) and the user-facing ``QuestionAnswerer``.

>>> vqa = QuestionAnswerer.from_pretrained()             # the default, "flickr8k-vqa": questions about photos
>>> vqa("dog.jpg", "what color is the dog?")             # VQAAnswer(answer='black', probability=0.8, ...)
>>> QuestionAnswerer.from_pretrained("easyvqa")("shape.png", "what color is the triangle?")   # synthetic shapes

A checkpoint whose config.json lists ``members`` loads as an ``AnswerEnsemble``: several such models on one frozen
image encoder, answering by the mean of their probabilities (the shipped "flickr8k-vqa" is one).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ...checkpoint import load_weights, read_config, save_checkpoint
from ...config import from_dict, save_json, to_dict
from ...data.images import ImageInput, load_image
from ...data.tokenizer import Tokenizer
from ...errors import ConfigError, InputError, ModelNotFoundError
from ...nn.text import WordPieceTokenizer, pad_batch
from ...nn.vision import ImageFeatures
from ...registry import SEGMENTERS, TEXT_ENCODERS
from ...runtime import Runtime, RuntimeOptions
from ..base import Pipeline
from .model import VQAModel, VQAModelConfig

MAX_QUESTION_CHARS = 1000
QUESTION_WORDS = SEGMENTERS.build("english")  # how AnswerCalibration's words and openings split a question
ANSWERS_FILE = "answers.json"


@dataclasses.dataclass
class VQAAnswer:
    answer: str
    probability: float
    top: List[Tuple[str, float]]  # the top-k answers with probabilities, best first
    sure: bool = True             # False: the model should not be trusted here; ``doubt`` says why
    doubt: str = ""


@dataclasses.dataclass
class AnswerCalibration:
    """How a model's scores become probabilities and when an answer is flagged as unsure; fitted on the
    validation questions after training and saved in config.json under "calibration"."""

    temperature: float = 1.0       # probabilities are softmax(logits / temperature) (temperature scaling)
    unsure_below: float = 0.0      # an answer whose probability is under this is flagged unsure
    min_known_words: float = 0.0   # flagged unsure when under this share of the question's words are in
                                   # ``words``: another language, another topic
    # what the training questions were like, in English words (``QUESTION_WORDS``; taken from the training
    # questions whatever tokenizer the model has): every word they use, and how they begin (their first two words,
    # e.g. "how many", "what color": a question beginning otherwise, "why is", is of a kind never trained on).
    # Empty: not checked.
    words: List[str] = dataclasses.field(default_factory=list)
    openings: List[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"calibration.temperature must be positive, got {self.temperature}")
        if not (0 <= self.unsure_below <= 1 and 0 <= self.min_known_words <= 1):
            raise ConfigError("calibration.unsure_below and calibration.min_known_words must be in [0, 1]")
        self._known = frozenset(self.words)

    def known_word_share(self, question: str) -> Optional[float]:
        """The share of the question's words that training questions had (None when no words are listed). A
        question in another script has no English words at all: share 0."""
        if not self._known:
            return None
        words = QUESTION_WORDS(question)
        return sum(w in self._known for w in words) / len(words) if words else 0.0

    def doubt(self, question: str, probability: float) -> str:
        """Why an answer of this probability to ``question`` should not be trusted ('' when nothing says so)."""
        share = self.known_word_share(question)
        words = QUESTION_WORDS(question)
        if share is not None and share < self.min_known_words:
            unknown = [w for w in words if w not in self._known]
            if not unknown:
                return "the question has no words this model knows (it was trained on English questions)"
            return (f"the question has words this model never saw in training ({', '.join(unknown[:5])}); "
                    "it can only answer questions like those it was trained on")
        if self.openings and len(words) >= 2 and " ".join(words[:2]) not in self.openings:
            return (f"the model was never trained on questions beginning \"{' '.join(words[:2])}\"; it answers "
                    f"questions like {', '.join(repr(o + ' ...') for o in self.openings[:4])}")
        if probability < self.unsure_below:
            return (f"the model is not sure (probability {probability:.2f}, under {self.unsure_below:.2f}); "
                    "the answer is likely wrong")
        return ""


def check_question(question: str) -> str:
    """The stripped question, or InputError saying what is wrong with it."""
    if not isinstance(question, str):
        raise InputError(f"question must be text, got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise InputError("question is empty; ask something about the image, e.g. 'what color is the dog?'")
    if len(text) > MAX_QUESTION_CHARS:
        raise InputError(f"question is {len(text):,} characters long, over the limit of {MAX_QUESTION_CHARS:,}")
    return text


def make_question_tokenizer(config: VQAModelConfig, directory: Optional[Path] = None):
    """The question tokenizer a config needs: MiniLM's own WordPiece, or a word vocabulary loaded from disk."""
    if TEXT_ENCODERS.get(config.text.name).own_tokenizer:
        return WordPieceTokenizer.load(directory) if directory else TEXT_ENCODERS.get(config.text.name).make_tokenizer()
    if directory is None:
        raise ConfigError(f"text encoder '{config.text.name}' needs a vocabulary built from training questions")
    return Tokenizer.load(directory)


class QuestionAnswerer(Pipeline):
    """Answer questions about images with a trained VQA network, its question tokenizer and answer list. Images
    are encoded by the copy of the vision encoder that ``self.runtime`` makes as the ``runtime`` options say (ONNX
    Runtime on a CPU by default)."""

    task = "vqa"
    default_model = "flickr8k-vqa"

    def __init__(self, network: VQAModel, tokenizer, answers: Sequence[str], extra_config: Optional[dict] = None,
                 runtime: RuntimeOptions = RuntimeOptions(), calibration: Optional[AnswerCalibration] = None):
        if len(answers) != network.config.num_answers:
            raise ConfigError(f"{len(answers)} answers given for a network with {network.config.num_answers} outputs")
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.answers = list(answers)
        self.extra_config = extra_config or {}
        self.calibration = calibration or AnswerCalibration()  # a fresh one each: it is not frozen
        self.runtime = Runtime(runtime, vision=network.vision)

    # -- loading and saving -------------------------------------------------------------------------
    @classmethod
    def _from_checkpoint(cls, directory: Path, raw: dict, device: Optional[str] = None,
                         runtime: RuntimeOptions = RuntimeOptions()) -> "QuestionAnswerer":
        """``from_pretrained``'s options: ``device``, and ``runtime`` (how inference runs)."""
        if MEMBERS_KEY in raw:
            return AnswerEnsemble._from_checkpoint(directory, raw, device, runtime)
        config = from_dict(VQAModelConfig, raw["model"], "model")
        answers_path = directory / ANSWERS_FILE
        if not answers_path.is_file():
            raise ModelNotFoundError(f"VQA checkpoint '{directory}' has no {ANSWERS_FILE}")
        import json

        answers = json.loads(answers_path.read_text(encoding="utf-8"))
        network = VQAModel(config)
        load_weights(directory, network, allowed_missing_prefixes=network.persistent_prefixes())
        calibration = from_dict(AnswerCalibration, raw.get("calibration") or {}, "calibration")
        extra = {k: v for k, v in raw.items() if k not in ("task", "model", "calibration")}
        return cls(network.to(device or "cpu"), make_question_tokenizer(config, directory), answers, extra, runtime,
                   calibration)

    def save_pretrained(self, directory: Union[str, Path], half: bool = True, **extra) -> Path:
        """config.json (task 'vqa') + model.safetensors (fp16) + question vocabulary + answers.json."""
        config = {"task": "vqa", "model": to_dict(self.network.config), "calibration": to_dict(self.calibration),
                  "transform": self.network.vision.transform.to_dict(), **self.extra_config, **extra}
        directory = save_checkpoint(directory, self.network, config, self.network.persistent_prefixes(), half=half)
        self.tokenizer.save(directory)
        save_json(self.answers, Path(directory) / ANSWERS_FILE)
        return directory

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def transform(self):
        return self.network.vision.transform

    # -- inference ------------------------------------------------------------------------------------
    def encode_questions(self, questions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Questions -> padded (ids, mask); unknown words become <unk>."""
        ids = [self.tokenizer.encode(q, self.network.config.max_question_len) for q in questions]
        ids, mask = pad_batch(ids, getattr(self.tokenizer, "pad_id", 0))
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def answer_features(self, image: ImageFeatures, image_index: Sequence[int], questions: Sequence[str],
                        top_k: int = 3) -> List[VQAAnswer]:
        """Answers for questions about already-encoded images (M images); question q is about image
        ``image_index[q]``; no input checks."""
        index = torch.as_tensor(list(image_index), dtype=torch.long, device=self.device)
        return self.rank(self.probabilities(self.question_logits(image, index, questions)), questions, top_k)

    def question_logits(self, image: ImageFeatures, image_index: torch.Tensor, questions: Sequence[str]
                        ) -> torch.Tensor:
        """Answer logits (Q, A) of questions about encoded images (question q about image ``image_index[q]``)."""
        ids, mask = self.encode_questions(questions)
        return self.network.answer_logits(image, image_index, ids, mask)

    def rank(self, probs: torch.Tensor, questions: Sequence[str], top_k: int = 3) -> List[VQAAnswer]:
        """Answer probabilities (Q, A) of ``questions`` -> each question's top-k answers, flagged when unsure."""
        k = max(1, min(top_k, len(self.answers)))
        values, indices = probs.topk(k, dim=-1)
        results = []
        for question, vals, idxs in zip(questions, values.tolist(), indices.tolist()):
            top = [(self.answers[i], float(v)) for v, i in zip(vals, idxs)]
            doubt = self.calibration.doubt(question, top[0][1])
            results.append(VQAAnswer(top[0][0], top[0][1], top, sure=not doubt, doubt=doubt))
        return results

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Answer logits (Q, A) -> calibrated probabilities (temperature scaling)."""
        return (logits.float() / self.calibration.temperature).softmax(-1)

    def predict(self, images: Sequence[ImageInput], questions: Sequence[str], top_k: int = 3,
                batch_size: int = 64) -> List[VQAAnswer]:
        """One answer per (image, question) pair. Raises InputError for a bad question or top_k and
        ImageError for an unreadable image (before any work is done)."""
        if isinstance(questions, str) or isinstance(images, (str, bytes)):
            raise InputError("predict takes a list of images and a list of questions; use model(image, question)")
        if len(images) != len(questions):
            raise InputError(f"got {len(images)} images but {len(questions)} questions; give one image per question")
        if not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        questions = [check_question(q) for q in questions]
        return self.predict_pixels([self.transform(load_image(im)) for im in images], questions, top_k, batch_size)

    def predict_pixels(self, pixels: Sequence[torch.Tensor], questions: Sequence[str], top_k: int = 3,
                       batch_size: int = 64) -> List[VQAAnswer]:
        """Like ``predict`` for images already through ``transform`` ((3, H, W) each); the service preprocesses
        uploads in its request threads and batches only this part."""
        questions = [check_question(q) for q in questions]
        results: List[VQAAnswer] = []
        for s in range(0, len(questions), batch_size):
            batch = torch.stack(list(pixels[s:s + batch_size])).to(self.device)
            with torch.inference_mode():
                image = self.runtime.image_encoder(batch)
            results += self.answer_features(image, range(len(batch)), questions[s:s + batch_size], top_k)
        return results

    def __call__(self, image: ImageInput, question: str, top_k: int = 3) -> VQAAnswer:
        """Answer one question about one image."""
        return self.predict([image], [question], top_k)[0]




MEMBERS_KEY = "members"  # an ensemble checkpoint's config.json: its members' names, each a sub-directory


class AnswerEnsemble(QuestionAnswerer):
    """VQA models that answer together: every member reads the question its own way (its own tokenizer, question
    encoder, fusion and head), all share one frozen image encoder, and the ensemble's answer probabilities are the
    mean of the members' (each at its own calibrated temperature). Its "logits" are the log of that mean, so the
    ensemble has a calibration of its own on top, like any ``QuestionAnswerer``. Members with the same frozen
    question encoder (MiniLM, say, with their own fusions and heads) share it too, and it runs once per question.

    A checkpoint is a directory with config.json (task "vqa", ``members``: their names, the ensemble's
    ``calibration``) and each member's own VQA checkpoint in the sub-directory of its name."""

    def __init__(self, members: Dict[str, QuestionAnswerer], extra_config: Optional[dict] = None,
                 runtime: RuntimeOptions = RuntimeOptions(), calibration: Optional[AnswerCalibration] = None):
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        (first_name, first), *others = members.items()
        for name, member in others:
            if member.answers != first.answers:
                raise ConfigError(f"ensemble members '{first_name}' and '{name}' answer from different answer lists; "
                                  "train them on the same questions with the same data.max_answers")
            if not _same_weights(member.network.vision, first.network.vision):
                raise ConfigError(f"ensemble members '{first_name}' and '{name}' encode images differently; members "
                                  "must share one frozen vision encoder (same name and options, trainable_blocks 0)")
            member.network.vision = first.network.vision  # one image encoder in memory
        members = dict(members)
        for i, (name, member) in enumerate(members.items()):
            for earlier in list(members.values())[:i]:
                if _same_frozen_question_encoder(member, earlier):
                    member.network.text = earlier.network.text  # question_logits runs it once for both
                    break
        self.members = members
        super().__init__(first.network, first.tokenizer, first.answers, extra_config, runtime, calibration)

    @classmethod
    def _from_checkpoint(cls, directory: Path, raw: dict, device: Optional[str] = None,
                         runtime: RuntimeOptions = RuntimeOptions()) -> "AnswerEnsemble":
        names = raw[MEMBERS_KEY]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ModelNotFoundError(f"'{directory}': '{MEMBERS_KEY}' in config.json must be a list of member names")
        members = {}
        for name in names:
            if not (directory / name / "config.json").is_file():
                raise ModelNotFoundError(f"ensemble '{directory}' lists member '{name}' but has no checkpoint in "
                                         f"'{directory / name}'")
            members[name] = QuestionAnswerer._from_checkpoint(directory / name, read_config(directory / name), device,
                                                              runtime)
        calibration = from_dict(AnswerCalibration, raw.get("calibration") or {}, "calibration")
        extra = {k: v for k, v in raw.items() if k not in ("task", MEMBERS_KEY, "calibration")}
        return cls(members, extra, runtime, calibration)

    def save_pretrained(self, directory: Union[str, Path], half: bool = True, **extra) -> Path:
        """Each member into its sub-directory, then config.json (written last: a half-written ensemble does not
        load)."""
        directory = Path(directory)
        for name, member in self.members.items():
            member.save_pretrained(directory / name, half=half)
        config = {"task": "vqa", MEMBERS_KEY: list(self.members), "calibration": to_dict(self.calibration),
                  "transform": self.network.vision.transform.to_dict(), **self.extra_config, **extra}
        save_json(config, directory / "config.json")
        return directory

    def encode_questions(self, questions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("each member of an ensemble encodes questions with its own tokenizer")

    def question_logits(self, image: ImageFeatures, image_index: torch.Tensor, questions: Sequence[str]
                        ) -> torch.Tensor:
        encoded = {}  # id of a question encoder -> the questions' features: a shared encoder runs once
        probs = []
        for member in self.members.values():
            text = id(member.network.text)
            if text not in encoded:
                encoded[text] = member.network.question_features(*member.encode_questions(questions))
            logits = member.network.answer(image, image_index, encoded[text])
            probs.append(member.probabilities(logits))
        mean = torch.stack(probs).mean(0)
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()


def _same_frozen_question_encoder(a: QuestionAnswerer, b: QuestionAnswerer) -> bool:
    """Whether two models read a question into the same features: the same text encoder config, question length
    and tokenizer, no trained weights in the encoder (a frozen pretrained one), and equal weights."""
    ca, cb = a.network.config, b.network.config
    frozen = not any(p.requires_grad for p in (*a.network.text.parameters(), *b.network.text.parameters()))
    return (frozen and ca.text == cb.text and ca.max_question_len == cb.max_question_len
            and type(a.tokenizer) is type(b.tokenizer) and _same_weights(a.network.text, b.network.text))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
