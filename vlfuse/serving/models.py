"""The models behind the service, loaded once at start, and the batch functions the batchers call.

Every function here is a thin call into the library's own API (``Captioner``, ``QuestionAnswerer``, ``Retriever``,
``ImageIndex``, ``Tagger``); nothing is re-implemented. Any subset of the models may be loaded.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..data.images import load_image
from ..data.languages import language
from ..errors import ConfigError, ModelNotFoundError, VlfuseError
from ..generation import DecodeConfig
from ..runtime import RuntimeOptions

log = logging.getLogger(__name__)

# tagging's "model" is a backbone with a concept head (vlfuse.nn.concepts): its frozen ImageNet classifier
DEFAULT_MODELS = {"caption": "flickr8k-caption", "vqa": "flickr8k-vqa", "retrieval": "flickr8k-retrieval",
                  "tagging": "efficientnet-lite0"}
DISABLED = "none"


@dataclasses.dataclass
class ModelChoice:
    """Which model to load for a task: ``name`` (built-in name or checkpoint dir) or None for the default.
    The default is loaded only if it is installed; an explicitly named model must load or startup fails."""

    name: Optional[str] = None

    @property
    def disabled(self) -> bool:
        return self.name is not None and self.name.lower() == DISABLED

    @property
    def explicit(self) -> bool:
        return self.name is not None


def _device_kw(device: Optional[str]) -> dict:
    return {"device": device} if device else {}


# Run in a child process: load a model with a pipeline class and build its ONNX Runtime graphs into the cache.
_BUILD_GRAPHS = """
import importlib, json, sys, torch
torch.set_num_threads(1)
from vlfuse.runtime import RuntimeOptions
module, pipeline, name, device, options = sys.argv[1:6]
runtime = RuntimeOptions(**json.loads(options))
getattr(importlib.import_module(module), pipeline).from_pretrained(name, device=device or None, runtime=runtime
                                                                   ).runtime.build()
"""


def build_graphs_in_child(pipeline, name: str, device: Optional[str], what: Sequence[str]) -> bool:
    """Export the ONNX Runtime graphs (``what``) of model ``name``, loaded as ``pipeline`` (a Captioner,
    QuestionAnswerer or Retriever) is, into its cache folder from a child process, so that the exporter's memory
    (torch's exporter, ``onnx``, the quantizer: ~60 MB that stay resident, and a peak of ~600 MB for the
    three-model server) never enters the server's. True if the child succeeded."""
    import json
    import os
    import subprocess
    import sys

    import vlfuse

    log.info("building the ONNX Runtime graphs of %s (%s) once, in a child process", name, ", ".join(what))
    root = str(Path(vlfuse.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    options, cls = pipeline.runtime.options, type(pipeline)
    folder = pipeline.runtime.cache.folder  # the folder this process reads the graphs from, resolved here
    runtime = {"onnx": options.onnx, "int8": options.int8, "cache_dir": str(folder) if folder else None}
    try:
        proc = subprocess.run([sys.executable, "-c", _BUILD_GRAPHS, cls.__module__, cls.__qualname__, name,
                               device or "", json.dumps(runtime)], env=env, capture_output=True, text=True,
                              timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not build the ONNX Runtime graphs in a child process (%s); building them here", exc)
        return False
    if proc.returncode != 0:
        log.warning("building the ONNX Runtime graphs in a child process failed (%s); building them here",
                    (proc.stderr.strip().splitlines() or ["no output"])[-1])
        return False
    return True


def build_fast_copies(pipeline, name: str, device: Optional[str]) -> None:
    """Make ``pipeline``'s inference copies now, not during the first request; graphs not in the cache yet (the
    first start with this model) are exported in a child process first, then read from the cache."""
    missing = pipeline.runtime.graphs_to_build()
    if missing:
        build_graphs_in_child(pipeline, name, device, missing)
    pipeline.runtime.build()


def _load_captioner(name: str, device: Optional[str], runtime: RuntimeOptions, rerank: bool = False):
    from ..tasks.caption.pipeline import Captioner

    captioner = Captioner.from_pretrained(name, device=device, runtime=runtime)
    if captioner.decode_defaults.strategy == "rerank" and not rerank:
        # consensus reranking costs ~4x the time per image and ~130 MB (memory, idf, retriever tower): the
        # service decodes greedily unless started with --caption-rerank
        captioner.decode_defaults = captioner.decode_defaults.override(strategy="greedy")
        log.info("caption model: decoding greedily (its default, rerank, needs --caption-rerank)")
    elif rerank:
        captioner.reranker  # load the memory now, not during the first request (raises if the model has none)
    build_fast_copies(captioner, str(name), device)
    # free the PyTorch weights the decoding copy and the ONNX Runtime image encoder replace (the server never
    # saves the model or draws attention maps): ~29 MB
    freed = captioner.drop_unused_weights()
    log.info("caption model: %.0f MB of PyTorch weights not needed for captioning freed", freed / 2 ** 20)
    return captioner


def _load_vqa(name: str, device: Optional[str], runtime: RuntimeOptions):
    try:
        from ..tasks.vqa.pipeline import QuestionAnswerer
    except ImportError as exc:
        raise ModelNotFoundError(f"VQA is not available in this vlfuse build ({exc})") from None
    vqa = QuestionAnswerer.from_pretrained(name, runtime=runtime, **_device_kw(device))
    build_fast_copies(vqa, str(name), device)
    return vqa


def _load_retriever(name: str, device: Optional[str], runtime: RuntimeOptions):
    try:
        from ..tasks.retrieval.pipeline import Retriever
    except ImportError as exc:
        raise ModelNotFoundError(f"retrieval is not available in this vlfuse build ({exc})") from None
    retriever = Retriever.from_pretrained(name, runtime=runtime, **_device_kw(device))
    build_fast_copies(retriever, str(name), device)
    return retriever


def _load_tagger(name: str, device: Optional[str], runtime: RuntimeOptions):
    from ..tasks.tagging.pipeline import Tagger

    tagger = Tagger.from_pretrained(name, runtime=runtime, **_device_kw(device))
    build_fast_copies(tagger, str(name), device)
    # where ONNX Runtime encodes the images, the backbone's PyTorch weights are not read again: ~13 MB
    tagger.runtime.drop_replaced_weights()
    return tagger


def _load_index(path: str, retriever):
    """(the index, ``retriever`` as it embedded the index's images: without its concept term where the index was
    built before the model had one)."""
    from ..tasks.retrieval.index import ImageIndex

    index = ImageIndex.load(path)
    matching = index.compatible_retriever(retriever)
    if matching is not retriever:
        log.info("index %s was built before the retrieval model knew concepts: image queries are embedded as then; "
                 "rebuild it for concept-aware search", path)
    return index, matching


LOADERS = {"caption": _load_captioner, "vqa": _load_vqa, "retrieval": _load_retriever, "tagging": _load_tagger}


class ServiceModels:
    """Loaded models (any of them may be None) and the batch functions over them."""

    def __init__(self, captioner=None, vqa=None, retriever=None, index=None, names: Optional[Dict[str, str]] = None,
                 problems: Optional[Dict[str, str]] = None, thumbnail_size: int = 192, tagger=None,
                 more_captioners: Sequence[Any] = (), more_caption_names: Sequence[str] = ()):
        self.captioner, self.vqa, self.retriever, self.index = captioner, vqa, retriever, index
        # the captioner of each language served: ``captioner``'s (the default of a request without ``lang``), then
        # ``more_captioners``' (one per other language, named ``more_caption_names``)
        self.captioners = {c.lang: c for c in ([captioner] if captioner is not None else []) + list(more_captioners)}
        self.tagger = tagger
        self.names = dict(names or {})
        self.caption_names = dict(zip([c.lang for c in more_captioners], more_caption_names))
        if captioner is not None:
            self.caption_names[captioner.lang] = self.names.get("caption", "")
        self.problems = dict(problems or {})  # task -> why it is not loaded
        self.thumbnail_size = thumbnail_size
        self._index_paths = frozenset(index.paths) if index is not None else frozenset()

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, caption: ModelChoice = ModelChoice(), vqa: ModelChoice = ModelChoice(),
             retrieval: ModelChoice = ModelChoice(), index: Optional[str] = None, device: Optional[str] = None,
             thumbnail_size: int = 192, runtime: RuntimeOptions = RuntimeOptions(),
             caption_rerank: bool = False, tagging: ModelChoice = ModelChoice(),
             caption_langs: Sequence[str] = ()) -> "ServiceModels":
        """Load the chosen models. Raises VlfuseError if an explicitly chosen model or the index fails.
        ``runtime`` is every model's (``from_pretrained``): by default ONNX Runtime's image encoders and decoding
        step on a CPU where it is installed; ``RuntimeOptions(onnx=False)``: PyTorch's encoders and TorchScript's
        step.
        ``caption_rerank`` keeps a caption model's rerank decoding default (else it decodes greedily).
        ``tagging`` names the backbone whose concept head tags photos (default efficientnet-lite0).
        ``caption_langs`` are more languages to caption in, each by its built-in model (``Captioner.default_models``)
        beside the caption model's own; a language that cannot be served fails the start."""
        loaded: Dict[str, Any] = {}
        names: Dict[str, str] = {}
        problems: Dict[str, str] = {}
        for task, choice in (("caption", caption), ("vqa", vqa), ("retrieval", retrieval), ("tagging", tagging)):
            if choice.disabled:
                problems[task] = "disabled at startup"
                continue
            if task == "retrieval" and index is None and not choice.explicit:
                # search needs an index; without one, do not pay for the text encoder's memory
                problems[task] = "no image index given (start with --index FILE)"
                continue
            name = choice.name or DEFAULT_MODELS[task]
            try:
                options = {"rerank": caption_rerank} if task == "caption" else {}
                loaded[task] = LOADERS[task](name, device, runtime, **options)
                names[task] = str(name)
            except VlfuseError as exc:
                if choice.explicit:
                    raise
                problems[task] = str(exc)
                log.warning("%s model not loaded: %s", task, exc)
        idx = None
        if index is not None:
            if "retrieval" not in loaded:
                raise ModelNotFoundError(f"--index {index} needs a retrieval model, but none is loaded "
                                         f"({problems.get('retrieval', '')})")
            idx, loaded["retrieval"] = _load_index(index, loaded["retrieval"])
            names["index"] = str(index)
        elif "retrieval" in loaded:
            problems["retrieval"] = "no image index given (start with --index FILE)"
            loaded.pop("retrieval")
            names.pop("retrieval")
        more, more_names = [], []
        primary = loaded.get("caption")
        for lang in caption_langs:
            if primary is not None and language(lang).code == primary.lang:
                continue
            if primary is None:
                raise ModelNotFoundError(f"captions in {lang!r} were asked for, but no caption model is loaded "
                                         f"({problems.get('caption', '')})")
            from ..tasks.caption.pipeline import Captioner

            name = Captioner.default_model_for(lang)
            more.append(_load_captioner(name, device, runtime, rerank=caption_rerank))
            more_names.append(name)
        return cls(primary, loaded.get("vqa"), loaded.get("retrieval"), idx, names, problems,
                   thumbnail_size, tagger=loaded.get("tagging"), more_captioners=more, more_caption_names=more_names)

    # -- status ---------------------------------------------------------------------------------------
    def loaded(self) -> Dict[str, bool]:
        return {"caption": self.captioner is not None, "vqa": self.vqa is not None,
                "retrieval": self.retriever is not None and self.index is not None,
                "tagging": self.tagger is not None}

    def describe(self) -> Dict[str, dict]:
        out = {}
        for task, ok in self.loaded().items():
            entry: Dict[str, Any] = {"loaded": ok}
            if ok:
                entry["model"] = self.names.get(task)
            else:
                entry["reason"] = self.problems.get(task, "not loaded")
            out[task] = entry
        if out["caption"]["loaded"]:
            out["caption"]["lang"] = self.captioner.lang  # a request without ``lang`` gets this language
            out["caption"]["langs"] = {lang: self.caption_names.get(lang, "") for lang in self.captioners}
            out["caption"]["decode"] = dataclasses.asdict(self.captioner.decode_defaults)
            # what runs the image encoder and the decoding step: "onnxruntime", "torchscript" or "torch"
            out["caption"].update(self.captioner.runtime.backends())
        if out["retrieval"]["loaded"]:
            out["retrieval"]["index"] = {"path": self.names.get("index"), "images": len(self.index.paths)}
            out["retrieval"]["langs"] = list(self.search_languages())  # what a text search's ``lang`` may name
        if out["tagging"]["loaded"]:
            from ..nn.concepts import CONCEPT_THRESHOLD

            out["tagging"].update(self.tagger.runtime.backends(), threshold=CONCEPT_THRESHOLD,
                                  concepts=len(self.tagger.head.names))
        return out

    # -- captioning -----------------------------------------------------------------------------------
    def caption_lang(self, lang: Optional[str]) -> str:
        """A request's ``lang`` (None: the caption model's own) checked: ConfigError for a language vlfuse does not
        know or this service does not caption in."""
        if lang is None:
            return self.captioner.lang
        code = language(lang.strip()).code
        if code not in self.captioners:
            raise ConfigError(f"this service captions in {', '.join(self.captioners)}, not {code!r} (start it "
                              f"with --caption-lang {','.join([*self.captioners, code])})")
        return code

    def caption_pixels(self, lang: str, image) -> Any:
        """Decoded PIL image -> the ``lang`` captioner's (1, 3, H, W) input (runs in the request's worker thread)."""
        return self.captioners[lang].preprocess([image])

    def caption_decode(self, lang: str, beam: Optional[int], max_len: Optional[int]) -> DecodeConfig:
        """The ``lang`` caption model's own decoding default with a request's ``beam`` / ``max_len`` (None = keep)."""
        return self.captioners[lang].decode_config(beam=beam, max_len=max_len)

    def caption_batch(self, key: Tuple[str, DecodeConfig], pixels: Sequence[Any]) -> List[Any]:
        """key: (language, decoding). Encode and decode in chunks of ``captioner.cpu_beam_chunk`` images: beam
        search gains up to about 16 on a CPU, and a chunk's activations are freed before the next one, which keeps
        the server's peak memory low."""
        import torch

        lang, decode = key
        captioner = self.captioners[lang]
        step, out = captioner.cpu_beam_chunk, []
        for i in range(0, len(pixels), step):
            out += captioner.caption_pixels(torch.cat(list(pixels[i:i + step])), decode)
        return out

    # -- VQA ------------------------------------------------------------------------------------------
    def vqa_pixels(self, image) -> Any:
        """Decoded PIL image -> the VQA model's (3, H, W) input (runs in the request's worker thread)."""
        return self.vqa.transform(image)

    def vqa_batch(self, top_k: int, items: Sequence[Tuple[Any, str]]) -> List[Any]:
        """items: (vqa_pixels output, checked question)."""
        return self.vqa.predict_pixels([px for px, _ in items], [q for _, q in items], top_k=top_k)

    # -- tagging --------------------------------------------------------------------------------------
    def tag_pixels(self, image) -> Any:
        """Decoded PIL image -> the tagger's (1, 3, S, S) input (runs in the request's worker thread)."""
        return self.tagger.preprocess([image])

    def tag_batch(self, _key, pixels: Sequence[Any]) -> List[Any]:
        """tag_pixels outputs -> each image's concept probabilities (C,); each request picks its own top and
        threshold from them (``Tagger.concepts``), so requests with different ones share a batch."""
        import torch

        return list(self.tagger.probabilities_of_pixels(torch.cat(list(pixels))))

    # -- retrieval ------------------------------------------------------------------------------------
    def search_languages(self) -> Tuple[str, ...]:
        """The languages text queries may be in (the retrieval model's text towers); none without retrieval."""
        return self.retriever.languages if self.retriever is not None else ()

    def search_batch(self, key: Tuple[str, Optional[str]], items: Sequence[Tuple[Any, int]]) -> List[List[Any]]:
        """key ('text', lang or None: told from each text) with items (query, k), or ('image', None) with items
        (PIL image, k) -> hits per item."""
        kind, lang = key
        queries = [q for q, _ in items]
        vectors = (self.retriever.embed_texts(queries, lang=lang) if kind == "text"
                   else self.retriever.embed_images(queries))
        k_max = min(max(k for _, k in items), len(self.index.paths))
        hits = self.index.search(vectors, k_max)
        return [h[:k] for h, (_, k) in zip(hits, items)]

    def in_index(self, path: str) -> bool:
        return path in self._index_paths

    def thumbnail(self, path: str) -> bytes:
        """JPEG thumbnail of an indexed image (callers check ``in_index`` first)."""
        return self._thumbnail_cached(path)

    @functools.lru_cache(maxsize=1024)
    def _thumbnail_cached(self, path: str) -> bytes:
        image = load_image(Path(path))
        image.thumbnail((self.thumbnail_size, self.thumbnail_size))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
