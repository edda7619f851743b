"""Image–text retrieval for users: ``Retriever`` (a ``RetrievalModel`` with its tokenizer and transform) and
``RetrievalImageTower`` (its image side alone, for reranking captions).

Image tower: a registered vision encoder's grid (B, N, C) -> attention pooling -> projection.
Text tower: a registered text encoder (MiniLM by default, frozen or with its top layers tuned),
mean-pooled -> projection. Both land L2-normalised in one ``embed_dim`` space; training uses the
symmetric InfoNCE loss with a learned temperature, plus an optional VSE++ hardest-negative term.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ...checkpoint import _storable_state, load_weights, save_checkpoint
from ...config import REMOVED_OPTIONS, from_dict, to_dict
from ...data.images import ImageInput, load_image
from ...data.languages import LANGUAGES, detect_language, language
from ...errors import ImageError, InputError
from ...io import tensors_digest
from ...nn.pooling import AttentionPool, Projection
from ...nn.text import WordPieceTokenizer, pad_batch
from ...registry import VISION_ENCODERS
from ...runtime import Runtime, RuntimeOptions
from ..base import Pipeline, read_checkpoint
from .concepts import ConceptEmbedding, concepts_config, load_concepts, save_concepts
from .languages import LanguageTower
from .model import RetrievalModel, RetrievalModelConfig


class RetrievalImageTower(nn.Module):
    """The image side of a trained ``RetrievalModel`` alone, without its text encoder: pixels -> unit vectors in
    the retrieval space, exactly as ``Retriever.embed_pixels`` without the concept term
    (``retriever.without_concepts()``; the checkpoint's ``concepts`` section is not read here). Loads in a fraction
    of the time (no MiniLM); consensus reranking of captions uses it to find an image's neighbours in a caption
    memory. Its CNN runs on the copy ``self.runtime`` makes as the ``runtime`` options say (ONNX Runtime on a CPU by
    default)."""

    PREFIXES = ("vision.", "pool.", "image_proj.")

    def __init__(self, config: RetrievalModelConfig, runtime: RuntimeOptions = RuntimeOptions()):
        super().__init__()
        self.config = config
        self.vision = VISION_ENCODERS.build(config.vision.name, **config.vision.kwargs)
        self.pool = AttentionPool(self.vision.out_dim, config.pool_heads, config.cell_dropout)
        self.image_proj = Projection(self.vision.out_dim, config.hidden_dim, config.embed_dim, config.dropout)
        self.runtime = Runtime(runtime, vision=self.vision)
        self.eval()

    # the image tower's own code is the dual encoder's
    embed_cells = RetrievalModel.embed_cells

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path],
                        runtime: RuntimeOptions = RuntimeOptions()) -> "RetrievalImageTower":
        """The image tower of a retrieval model (a built-in name or a checkpoint directory), to run as ``runtime``
        says."""
        directory, raw = read_checkpoint(name_or_path, "retrieval")
        tower = cls(from_dict(RetrievalModelConfig, raw["model"], "model"), runtime)
        load_weights(directory, tower, allowed_missing_prefixes=tower.persistent_prefixes(),
                     only_prefixes=cls.PREFIXES)
        return tower

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Transformed images (B, 3, H, W) -> (B, D) float32, unit length."""
        return self.encode(pixels)[0]

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Transformed images (B, 3, H, W) -> (their unit vectors (B, D), their CNN's pooled features (B, C)),
        float32: a frozen pretrained CNN's pooled features are its ImageNet classifier's input."""
        image = self.runtime.image_encoder(pixels)
        return self.embed_cells(image.grid).float(), image.pooled.float()

    def persistent_prefixes(self) -> Tuple[str, ...]:
        return ("vision.stem_layers.",) if getattr(self.vision, "pretrained", False) else ()

    def digest(self) -> str:
        """Hash of the tower's config and saved (fp16) weights: a caption memory records the tower it was
        embedded with, and refuses another."""
        return weights_digest(self, identity_config(self.config))


# Config fields removed after models shipped, which the model id hashed: they enter it at the value every
# checkpoint that still loads has (config.REMOVED_OPTIONS), so the ids that indexes and caption memories recorded
# stay valid. (mirror_average, also removed, was left out of the id at that value.)
_REMOVED_FIELDS = ("init_temperature", "hard_negative_weight", "hard_negative_margin")


def identity_config(config: RetrievalModelConfig) -> dict:
    """The model config as it enters the model id."""
    return {**to_dict(config), **{k: REMOVED_OPTIONS[f"RetrievalModelConfig.{k}"] for k in _REMOVED_FIELDS}}


def weights_digest(model: nn.Module, config: dict, extra: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Digest of the saved config and the fp16 saved weights (and ``extra`` tensors as saved): identical before
    saving and after loading."""
    state, _ = _storable_state(model, model.persistent_prefixes(), half=True)
    return tensors_digest({**state, **(extra or {})}, config)


class Retriever(Pipeline):
    """Embed images and texts into one space for search.

    >>> r = Retriever.from_pretrained("flickr8k-retrieval")
    >>> q = r.embed_texts(["two dogs playing in the snow"])   # (1, 256) float32, unit length
    >>> v = r.embed_images(["a.jpg", "b.jpg"])                  # (2, 256)
    >>> scores = v @ q[0]

    Images are encoded by the copy of the CNN that ``self.runtime`` makes as the ``runtime`` options say (ONNX
    Runtime on a CPU by default: the same recall@K on Flickr8k val as PyTorch's CNN, docs/retrieval.md). A
    checkpoint with a ``concepts`` section (``vlfuse.tasks.retrieval.concepts``) adds the backbone's ImageNet
    concepts to every image vector (``self.concepts``); text vectors are the same either way.

    Texts in English go through the model's own text tower; a checkpoint listing ``languages`` has a text tower for
    each of them trained into the same space (``vlfuse.tasks.retrieval.languages``: ``self.towers``), so the same
    image vectors answer queries in all of them:

    >>> r.languages                                              # ('en', 'zh') for flickr8k-retrieval
    >>> q = r.embed_texts(["两只狗在雪地里玩"])                    # the language is told from the text
    >>> q = r.embed_texts(["两只狗在雪地里玩"], lang="zh")         # or named
    """

    task = "retrieval"
    default_model = "flickr8k-retrieval"

    def __init__(self, model: RetrievalModel, tokenizer, name: str = "retrieval", extra_config: Optional[dict] = None,
                 runtime: RuntimeOptions = RuntimeOptions(), concepts: Optional[ConceptEmbedding] = None,
                 towers: Optional[Dict[str, LanguageTower]] = None):
        self.model = model.eval()
        self.towers: Dict[str, LanguageTower] = {k: t.to(self.device) for k, t in (towers or {}).items()}
        self.tokenizer = tokenizer
        self.name = name
        self.extra_config = extra_config or {}
        self.concepts = concepts.to(self.device) if concepts is not None else None
        self._model_id: Optional[str] = None
        self.runtime = Runtime(runtime, vision=model.vision)

    # -- loading and saving -------------------------------------------------------------------------
    @classmethod
    def _from_checkpoint(cls, directory: Path, raw: dict, device: Optional[str] = None,
                         runtime: RuntimeOptions = RuntimeOptions()) -> "Retriever":
        """``from_pretrained``'s options: ``device``, and ``runtime`` (how inference runs)."""
        config = from_dict(RetrievalModelConfig, raw["model"], "model")
        model = RetrievalModel(config)
        load_weights(directory, model, allowed_missing_prefixes=model.persistent_prefixes())
        tokenizer = WordPieceTokenizer.load(directory)
        concept_config = concepts_config(raw.get("concepts"))
        concepts = load_concepts(directory, concept_config, config.vision) if concept_config else None
        towers = {lang: LanguageTower.load(directory, lang) for lang in raw.get("languages", [])}
        extra = {k: v for k, v in raw.items() if k not in ("task", "model", "concepts", "languages")}
        return cls(model.to(device or "cpu"), tokenizer, raw.get("name") or Path(directory).name, extra, runtime,
                   concepts, towers)

    @classmethod
    def from_config(cls, config: RetrievalModelConfig, name: str = "retrieval") -> "Retriever":
        """A fresh (untrained) model; used by training."""
        model = RetrievalModel(config)
        return cls(model, model.text.make_tokenizer(), name)

    def _saved_config(self) -> dict:
        concepts = {"concepts": to_dict(self.concepts.config)} if self.concepts is not None else {}
        languages = {"languages": sorted(self.towers)} if self.towers else {}
        return {"task": "retrieval", "name": self.name, "model": to_dict(self.model.config),
                "transform": self.model.vision.transform.to_dict(), **concepts, **languages, **self.extra_config}

    def save_pretrained(self, directory: Union[str, Path], half: bool = True, **extra) -> Path:
        self.extra_config.update(extra)
        directory = save_checkpoint(directory, self.model, self._saved_config(), self.model.persistent_prefixes(),
                                    half=half)
        if self.concepts is not None:
            save_concepts(directory, self.concepts)
        for tower in self.towers.values():
            tower.save(directory)
        self.tokenizer.save(directory)
        self._model_id = None
        return directory

    @property
    def model_id(self) -> str:
        """Identity stored in indexes: the model name plus a hash of its config and weights, and of the concept
        term where it changes the image vectors (without it, the id the model had before concepts existed)."""
        if self._model_id is None:
            config = {"model": identity_config(self.model.config), "transform": self.model.vision.transform.to_dict()}
            extra = None
            if self.concepts is not None and self.concepts.config.active:
                config["concepts"] = to_dict(self.concepts.config)
                extra = {f"concepts.{k}": v for k, v in self.concepts.stored().items()}
            self._model_id = f"{self.name}@{weights_digest(self.model, config, extra)}"
        return self._model_id

    def without_concepts(self) -> "Retriever":
        """This retriever without the concept term (sharing its model and runtime): image vectors as the model
        alone makes them, e.g. to search or extend an index built before the model had concepts."""
        plain = copy.copy(self)
        plain.concepts, plain._model_id = None, None
        return plain

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    # -- text ---------------------------------------------------------------------------------------
    @property
    def languages(self) -> Tuple[str, ...]:
        """The languages this model reads queries in: English, and each language it has a text tower for."""
        return ("en",) + tuple(sorted(self.towers))

    def query_language(self, text: str, lang: Optional[str] = None) -> str:
        """The language ``text`` is read in: ``lang`` where given (one of ``languages``), else the one its script
        tells (``vlfuse.data.languages.detect_language``). A text in a language the model cannot read is an
        InputError saying which it reads."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("the text query is empty; type some words to search for")
        code = lang or detect_language(text)
        if code not in self.languages:
            raise InputError(f"retrieval model '{self.name}' reads {', '.join(language(c).name for c in self.languages)}"
                             f" queries, not {LANGUAGES[code].name if code in LANGUAGES else repr(code)} "
                             f"(query: {text[:40]!r})")
        return code

    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """English texts -> the English tower's padded token ids and mask."""
        ids, mask = pad_batch([self.tokenizer.encode(t, self.model.config.max_len) for t in texts])
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, lang: Optional[str] = None) -> np.ndarray:
        """Texts -> (B, D) float32, L2-normalised, in the order given. Each text is read in ``lang`` where given,
        else in the language its script tells; raises InputError for an empty text or one in a language the model
        does not read."""
        if isinstance(texts, str):
            raise InputError("embed_texts takes a list of strings, not one string")
        if len(texts) == 0:
            raise InputError("no text given to embed")
        codes = [self.query_language(t, lang) for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        for code in dict.fromkeys(codes):
            rows = [i for i, c in enumerate(codes) if c == code]
            out[rows] = self._embed_in(code, [texts[i] for i in rows], batch_size)
        return out

    def _embed_in(self, code: str, texts: Sequence[str], batch_size: int) -> np.ndarray:
        if code != "en":
            return self.towers[code].embed(texts, batch_size)
        out = []
        for s in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[s:s + batch_size])
            out.append(self.model.embed_text_features(self.model.encode_text(ids, mask)).float().cpu().numpy())
        return np.concatenate(out)

    # -- images -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Transformed images (B, 3, H, W) -> (B, D) float32; with the concept term where the model has one."""
        features = self.runtime.image_encoder(pixels.to(self.device))
        vectors = self.model.embed_cells(features.grid)  # (B, D)
        if self.concepts is not None:
            vectors = self.concepts(features.pooled, vectors)
        return vectors.float().cpu().numpy()

    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Image files / bytes / PIL images / arrays -> (B, D) float32, L2-normalised.
        Raises ImageError naming the first bad image."""
        tf = self.model.vision.transform
        out = [np.zeros((0, self.dim), np.float32)]
        for s in range(0, len(images), batch_size):
            out.append(self.embed_pixels(torch.stack([tf(load_image(im)) for im in images[s:s + batch_size]])))
        return np.concatenate(out)

    def embed_files(self, paths: Sequence[Union[str, Path]], batch_size: int = 32
                    ) -> Iterator[Tuple[str, Optional[np.ndarray], Optional[str]]]:
        """Yield (path, vector (D,), None) or (path, None, error) for every path, in order;
        a bad file yields its error and never stops the rest. Decoding overlaps with the network."""
        from concurrent.futures import ThreadPoolExecutor

        tf = self.model.vision.transform

        def prepare(path):
            try:
                return str(path), tf(load_image(path)), None
            except ImageError as exc:
                return str(path), None, str(exc)

        chunks = [list(paths[s:s + batch_size]) for s in range(0, len(paths), batch_size)]
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(lambda c: [prepare(p) for p in c], chunks[0]) if chunks else None
            for i in range(len(chunks)):
                prepared = pending.result()
                pending = pool.submit(lambda c: [prepare(p) for p in c], chunks[i + 1]) if i + 1 < len(chunks) else None
                good = [x for x in prepared if x[1] is not None]
                vectors = iter(self.embed_pixels(torch.stack([x[1] for x in good]))) if good else iter(())
                for path, pixels, error in prepared:
                    yield (path, None, error) if pixels is None else (path, next(vectors), None)
