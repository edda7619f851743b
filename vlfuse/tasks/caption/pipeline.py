"""The Hugging-Face-style ``Captioner``: a ``CaptionModel`` bundled with its tokenizer, image transform, decoding
defaults and (optionally) caption memory; inference runs on the fast copies ``vlfuse.runtime`` makes."""
from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...checkpoint import load_weights, save_checkpoint
from ...config import from_dict, to_dict
from ...data.images import ImageInput, load_image
from ...data.languages import LANGUAGES, language
from ...data.tokenizer import BOS, Tokenizer
from ...errors import ConfigError, ImageError
from ...generation import content_seeds
from ...nn.vision import ImageFeatures
from ...runtime import Runtime, RuntimeOptions
from ..base import Pipeline
from .model import CaptionModel, CaptionModelConfig
from .naming import ConceptNaming
from .rerank import CaptionDecodeConfig, CaptionMemory, ConsensusReranker, rerank_config


@dataclasses.dataclass
class CaptionResult:
    caption: str
    score: float
    tokens: List[str]


class Captioner(Pipeline):
    """Caption images with a trained model.

    >>> cap = Captioner.from_pretrained("flickr8k-caption")
    >>> cap(["photo.jpg", pil_image])          # -> ["a dog runs on the grass", ...]
    >>> cap("photo.jpg", beam=5)               # beam search of width 5 instead of the model's default
    >>> cap("photo.jpg", strategy="rerank")    # consensus reranking with the model's caption memory

    A checkpoint may carry its own decoding default (``"decode"`` in its config.json, as Hugging Face's
    generation config): the decoding it was selected with on val. ``decode_defaults`` holds it
    (``CaptionDecodeConfig()`` where a checkpoint has none); every option given to a call overrides it.

    A caption depends only on its image, the model and the decoding options, never on the other images of a
    batch or the batch size: sampling (the ``sample`` and ``rerank`` strategies) draws each image's random
    numbers from a seed made of its pixels and ``seed`` (``content_seeds``).

    A checkpoint names the language its captions are in (``"lang"`` in its config.json, ``self.lang``: 'en' where it
    has none); each language has its built-in default model (``default_models``).

    A checkpoint may also carry a caption memory (``"rerank"`` in its config.json, see ``caption_memory``) for
    the ``rerank`` strategy; ``memory_dir`` is the directory its files are in (``from_pretrained`` sets it).

    Inference runs on the fast copies that ``self.runtime`` (a ``vlfuse.runtime.Runtime``) makes as the
    ``runtime`` options say (by default on a CPU: images encoded by ONNX Runtime, captions decoded by an int8 copy
    of the decoder whose step runs in ONNX Runtime or TorchScript); ``self.runtime.backends(n)`` says which.
    ``self.model`` stays the PyTorch modules, for saving, attention maps and training.
    """

    task = "caption"
    default_models = {"en": "flickr8k-caption", "zh": "flickr8k-caption-zh"}  # the built-in model of each language
    default_model = default_models["en"]

    def __init__(self, model: CaptionModel, tokenizer: Tokenizer, extra_config: Optional[dict] = None,
                 runtime: RuntimeOptions = RuntimeOptions(), memory_dir: Optional[Path] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.extra_config = extra_config or {}
        self.lang = language(self.extra_config.get("lang", "en")).code
        self.decode_defaults = from_dict(CaptionDecodeConfig, self.extra_config.get("decode", {}), "decode")
        self.rerank_config = rerank_config(self.extra_config.get("rerank"))
        self.memory_dir = memory_dir
        self._reranker: Optional[ConsensusReranker] = None  # loaded on first use of the rerank strategy
        if self.decode_defaults.strategy == "rerank" and self.rerank_unavailable():
            import warnings

            warnings.warn(f"{self.rerank_unavailable()}; decoding greedily instead", stacklevel=2)
            self.decode_defaults = self.decode_defaults.override(strategy="greedy")
        self._reranker_lock = threading.Lock()
        self.runtime = Runtime(runtime, vision=model.vision, decoder=model.decoder)
        self._threads: Optional[ThreadPoolExecutor] = None  # decodes images at once (int8 copies: _generate)
        self._dropped_device: Optional[torch.device] = None  # set by drop_unused_weights

    @classmethod
    def default_model_for(cls, lang: str) -> str:
        """The built-in caption model of language ``lang``; a language without one is a ConfigError."""
        if language(lang).code not in cls.default_models:
            raise ConfigError(f"no built-in caption model writes {LANGUAGES[lang].name}")
        return cls.default_models[lang]

    @property
    def generator(self) -> nn.Module:
        """The copy of the decoder that generates captions (``self.runtime.decoder``)."""
        return self.runtime.decoder

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
        with self._reranker_lock:
            if self._reranker is None:
                why = self.rerank_unavailable()
                if why:
                    raise ConfigError(f"{why}; decode with greedy, beam or sample instead")
                self._reranker = ConsensusReranker.load(self.memory_dir, self.rerank_config, self.device,
                                                        self.runtime.options, caption_vision=self.model.vision)
            return self._reranker

    # -- loading and saving -------------------------------------------------------------------------
    @classmethod
    def _from_checkpoint(cls, directory: Path, raw: dict, device: Optional[str] = None,
                         int8: Optional[bool] = None, onnx: Optional[bool] = None,
                         runtime: RuntimeOptions = RuntimeOptions()) -> "Captioner":
        """``from_pretrained``'s options: inference runs as ``runtime`` says (by default on a CPU: images encoded
        by ONNX Runtime, captions decoded with int8 weights, the step in ONNX Runtime). ``int8`` and ``onnx``,
        where given, stand for those fields of ``runtime``: ``int8=False`` decodes with the float decoder,
        ``onnx=False`` keeps PyTorch's encoder and TorchScript's step."""
        config = from_dict(CaptionModelConfig, raw["model"], "model")
        tokenizer = Tokenizer.load(directory)
        model = CaptionModel(config, len(tokenizer))
        load_weights(directory, model, allowed_missing_prefixes=model.persistent_prefixes())
        extra = {k: v for k, v in raw.items() if k not in ("task", "model")}
        given = {name: value for name, value in (("int8", int8), ("onnx", onnx)) if value is not None}
        return cls(model.to(device or "cpu"), tokenizer, extra, dataclasses.replace(runtime, **given),
                   memory_dir=Path(directory))

    def drop_unused_weights(self) -> int:
        """Free the PyTorch weights that captioning no longer reads once its fast copies are built
        (``Runtime.drop_replaced_weights``). For a process that only captions, such as the server; afterwards
        ``save_pretrained`` and ``attention_map`` raise ConfigError (load the model again for those). Returns the
        bytes freed."""
        device = self.device
        freed = self.runtime.drop_replaced_weights()
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
                naming = ConceptNaming.load(self.memory_dir)  # how its captions name concepts, where measured
                if naming is not None:
                    naming.save(directory)
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
        return self.runtime.image_encoder(pixels)

    # Beam search of a float decoding copy on a CPU in chunks of 16 images: per image ~35 % faster than chunks of 8
    # (6.5 vs 9-10 ms at beam 3, one thread) now that the image's state is not copied per beam; 32 gains ~10 %
    # more for ~20 MB more peak memory per inference worker. (An int8 copy decodes an image at a time.)
    cpu_beam_chunk = 16

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, decode: CaptionDecodeConfig) -> List[CaptionResult]:
        """Transformed images (B, 3, H, W) -> one caption each."""
        if decode.strategy == "rerank":
            return self._rerank(pixels, decode)
        return self.caption_features(self.encode(pixels), decode, pixels)

    @torch.inference_mode()
    def caption_features(self, image: ImageFeatures, decode: CaptionDecodeConfig,
                         pixels: Optional[torch.Tensor] = None) -> List[CaptionResult]:
        """Encoded images -> one caption each. The sample strategy also needs the images' ``pixels``: each
        image's samples are seeded from them. (The rerank strategy encodes the images itself: caption_pixels.)"""
        if decode.strategy == "rerank":
            raise ConfigError("the rerank strategy encodes the images itself (in one pass with the retriever's "
                              "image tower): use caption_pixels(), not caption_features(), or another strategy")
        seeds = self._sampling_seeds(decode, pixels) if decode.strategy == "sample" else None
        return [self._result(ids, score) for ids, score in self._generate(image, decode, seeds=seeds)]

    def _sampling_seeds(self, decode: CaptionDecodeConfig, pixels: Optional[torch.Tensor]) -> List[int]:
        if pixels is None:
            raise ConfigError(f"the {decode.strategy} strategy seeds each image's samples from its pixels: use "
                              f"caption_pixels(), not caption_features(), or decode with greedy or beam")
        return content_seeds(pixels, decode.seed)

    def _generate(self, image: ImageFeatures, decode: CaptionDecodeConfig, per_image: int = 1,
                  seeds: Optional[List[int]] = None, greedy_first: bool = False,
                  must_include: Optional[torch.Tensor] = None, all_beams: bool = False) -> List:
        """``self.model.generate`` on the decoding copy. An int8 copy quantizes each step's activations with one
        scale for all the rows it decodes at once, so an image's words would depend on the other images' (greedy
        captions of 200 Flickr8k val photos: 13 changed between batches of 1 and 32; 6 with ONNX Runtime's step
        at every batch size, 17 with TorchScript's): there every image is decoded on its own, its rows together,
        on ``torch.get_num_threads()`` threads at once (ONNX Runtime runs a step on one). A float copy decodes the
        images together (beam search on a CPU in chunks of ``cpu_beam_chunk``). ``must_include`` (B, V) bool: words
        of which each image's caption must include one, and ``all_beams`` (each image's list of beams that do), are
        beam search's (``vlfuse.generation.generate``)."""
        n, generator = image.grid.shape[0], self.generator

        def decode_images(start: int, stop: int) -> List[Tuple[List[int], float]]:
            with torch.inference_mode():  # (per thread)
                return self.model.generate(ImageFeatures(image.grid[start:stop], image.pooled[start:stop]), decode,
                                           per_image=per_image, decoder=generator,
                                           seeds=None if seeds is None else seeds[start:stop],
                                           greedy_first=greedy_first,
                                           must_include=None if must_include is None else must_include[start:stop],
                                           all_beams=all_beams)

        if self.runtime.decodes_int8:
            return [out for outs in self._decoding_threads().map(lambda i: decode_images(i, i + 1), range(n))
                    for out in outs]
        chunk = self.cpu_beam_chunk if decode.strategy == "beam" and image.grid.device.type == "cpu" else n
        return [out for i in range(0, n, chunk) for out in decode_images(i, i + chunk)]

    def _decoding_threads(self) -> ThreadPoolExecutor:
        with self._reranker_lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="vlfuse-decode")
            return self._threads

    def _result(self, ids: List[int], score: float) -> CaptionResult:
        return CaptionResult(self.tokenizer.decode(ids), score, [self.tokenizer.vocab[i] for i in ids])

    def rerank_candidates(self, pixels: torch.Tensor, decode: CaptionDecodeConfig
                          ) -> Tuple[List[List[CaptionResult]], List[List[str]], List[Dict[str, float]]]:
        """What the rerank strategy chooses from, for transformed images (B, 3, H, W): each image's candidates (its
        greedy caption, then ``decode.candidates`` samples, repeats included), the texts of its nearest memory
        captions, and its concepts (caption word -> probability; empty for a model not told concepts and a decoding
        that does not name them, ``decode.name_concepts``)."""
        _, drawn, neighbours, concepts = self._rerank_inputs(pixels, decode)
        return drawn, neighbours, concepts

    def _rerank_inputs(self, pixels: torch.Tensor, decode: CaptionDecodeConfig):
        """``rerank_candidates``, after the images' caption-model features."""
        seen = self.reranker.encode(pixels, concepts=bool(decode.name_concepts) and not self.model.config.concepts)
        image = seen.features if seen.features is not None else self.encode(pixels)  # no shared layers: two passes
        rows = decode.candidates + 1  # per image: its greedy caption, then its samples, decoded together
        drawn = [self._result(ids, score) for ids, score in self._generate(
            image, decode.override(strategy="sample"), per_image=rows, seeds=self._sampling_seeds(decode, pixels),
            greedy_first=True)]
        if self.model.config.concepts:
            concepts = self._concept_words(image)
        elif seen.concepts is not None:
            concepts = self.reranker.concept_words(seen.concepts)
        else:
            concepts = [{} for _ in range(len(pixels))]
        return image, [drawn[i:i + rows] for i in range(0, len(drawn), rows)], seen.neighbours, concepts

    def _concept_words(self, image: ImageFeatures) -> List[Dict[str, float]]:
        """Each image's concepts as {caption word: score} (``CaptionModel.word_scores``), for a model told them."""
        scores = self.model.word_scores(*self.model.concepts_of(image))
        return [{self.tokenizer.vocab[i]: float(row[i]) for i in row.nonzero().flatten().tolist()} for row in scores]

    def _naming_captions(self, image: ImageFeatures, words: List[List[str]], decode: CaptionDecodeConfig
                         ) -> List[List[CaptionResult]]:
        """For each image with words to name (``ConsensusReranker.words_to_name``), the captions of beam search
        (``decode.beam_size`` beams) that include one of them (``vlfuse.generation.constrained_beam_search``), best
        first; none for the others."""
        rows = [i for i, w in enumerate(words) if w]
        out: List[List[CaptionResult]] = [[] for _ in words]
        if not rows:
            return out
        index = torch.tensor(rows, device=image.grid.device)
        must = torch.zeros(len(rows), len(self.tokenizer.vocab), dtype=torch.bool)
        for r, i in enumerate(rows):
            must[r, [self.tokenizer.index[w] for w in words[i]]] = True
        subset = ImageFeatures(image.grid.index_select(0, index), image.pooled.index_select(0, index))
        found = self._generate(subset, decode.override(strategy="beam"), must_include=must.to(image.grid.device),
                               all_beams=True)
        for i, beams in zip(rows, found):
            named = [self._result(ids, score) for ids, score in beams]
            out[i] = [r for r in named if set(words[i]) & set(r.tokens)]  # none where no word could be placed
        return out

    def _rerank(self, pixels: torch.Tensor, decode: CaptionDecodeConfig) -> List[CaptionResult]:
        """Of each image's ``rerank_candidates``, the one that agrees most with its nearest memory captions, plus
        a little of the model's own preference (``ConsensusReranker.choose``). An image with a concept to name
        (``decode.name_concepts``) chooses among its candidates that name it, or where none does, among the beams
        of a search for captions that do."""
        image, drawn, neighbours, concepts = self._rerank_inputs(pixels, decode)
        words = [self.reranker.words_to_name(c, self.tokenizer.index, decode.name_concepts) for c in concepts]
        # the search runs only where no candidate names the concept already (most Flickr8k-like photos' do)
        search = [w if w and not any(set(w) & set(r.tokens) for r in options) else [] for w, options in
                  zip(words, drawn)]
        naming = self._naming_captions(image, search, decode)
        results = []
        for options, refs, concepts_i, words_i, named in zip(drawn, neighbours, concepts, words, naming):
            unique: Dict[str, CaptionResult] = {}
            for r in options:  # the greedy caption first; a caption sampled again is scored once
                unique.setdefault(" ".join(r.tokens), r)
            if words_i and (named or any(set(words_i) & set(r.tokens) for r in unique.values())):
                unique = {t: r for t, r in unique.items() if set(words_i) & set(r.tokens)}
                for r in named:
                    unique.setdefault(" ".join(r.tokens), r)
            texts = list(unique)
            logprobs = [unique[t].score / max(1, len(unique[t].tokens)) for t in texts]
            results.append(unique[texts[self.reranker.choose(texts, refs, logprobs, concepts_i)]])
        return results

    def decode_config(self, beam: Optional[int] = None, **options) -> CaptionDecodeConfig:
        """The model's decoding default with ``options`` (CaptionDecodeConfig fields) overriding it; ``beam`` (or
        a ``beam_size`` given without ``strategy``) is a width: 1 = greedy, more = beam search."""
        if beam is None and "beam_size" in options and "strategy" not in options:
            beam = options.pop("beam_size")
        return self.decode_defaults.override(beam=beam, **options)

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]], batch_size: int = 32,
                 **decode_options) -> Union[str, List[str]]:
        """Caption one image (-> str) or a list (-> list of str). ``decode_options`` override the model's
        decoding default (``beam=``, or any CaptionDecodeConfig field)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        decode = self.decode_config(**decode_options)
        captions: List[str] = []
        for start in range(0, len(items), batch_size):
            pixels = self.preprocess(items[start:start + batch_size])
            captions += [r.caption for r in self.caption_pixels(pixels, decode)]
        return captions[0] if single else captions

    def caption_files(self, paths: Sequence[Union[str, Path]], decode: Optional[CaptionDecodeConfig] = None,
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
    def attention_map(self, image: ImageInput, decode: Optional[CaptionDecodeConfig] = None
                      ) -> Tuple[List[str], Optional[torch.Tensor]]:
        """Caption one image and return (words, attention (T, h, w)) over the image grid, if the fusion attends."""
        self._needs_weights("attention_map")
        pixels = self.preprocess([image])
        feats = self.encode(pixels)
        result = self.caption_pixels(pixels, decode or self.decode_defaults)[0]
        ids = [BOS] + [self.tokenizer.index[w] for w in result.tokens]
        _, att = self.model.decoder(feats, torch.tensor([ids], device=self.device), need_weights=True)
        if att is None:
            return result.tokens, None
        side = int(round(att.shape[-1] ** 0.5))
        return result.tokens, att[0, : len(result.tokens)].reshape(-1, side, side).cpu()
