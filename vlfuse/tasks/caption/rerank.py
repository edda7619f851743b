"""Consensus reranking of captions with a caption memory.

A caption model may carry a *memory*: training captions embedded in a retrieval model's space. At inference the
``rerank`` decoding strategy draws candidates from the caption model (its greedy caption and a few samples),
finds the memory captions nearest the image (the retrieval model's image tower, no text encoder), and keeps the
candidate that agrees best with them (``vlfuse.metrics.consensus``). The memory is two files beside the
checkpoint — ``memory.safetensors`` (embeddings (N, D) fp16, and which training image each caption describes)
and ``memory.txt`` (the captions, tokenised as the caption model does, one per line) — and the ``rerank`` section
of its config.json (``RerankConfig``). A memory may also hold ``concept_naming.json``: how its captions name their
photos' ImageNet concepts (``naming.py``), for a decoding that names them (``CaptionDecodeConfig.name_concepts``).

Build one for a trained caption model with ``vlfuse memory --model DIR --data ... --split train``.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import ClassVar, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...checkpoint import CONFIG_NAME, read_config
from ...config import from_dict, save_json, to_dict
from ...data.captions import CaptionSet
from ...data.tokenizer import Tokenizer
from ...errors import ConfigError, ModelNotFoundError
from ...generation import DecodeConfig
from ...hub import resolve_model
from ...io import atomic_path, atomic_write
from ...metrics.cider_d import CiderD
from ...metrics.consensus import ConsensusScorer
from ...nn.vision import ImageFeatures, VisionEncoder, fold_batchnorm
from ...runtime import GraphCache, RuntimeOptions, accelerate_vision
from ..base import read_checkpoint
from .naming import ConceptNaming, concept_words, naming_of_photos

MEMORY_WEIGHTS = "memory.safetensors"
MEMORY_TEXTS = "memory.txt"


@dataclasses.dataclass(frozen=True)  # hashable: the service batches requests that decode alike
class CaptionDecodeConfig(DecodeConfig):
    """A caption model's decoding: the generic strategies (``vlfuse.generation``) and ``rerank``, which a
    Captioner with a caption memory runs: the greedy caption and ``candidates`` samples (at ``temperature`` /
    ``top_p``, seeded per image by ``seed``), the one its memory agrees with most. This is the ``decode`` section
    of a caption checkpoint's config.json."""

    candidates: int = 12  # rerank: samples drawn besides the greedy caption
    # a model told its photos' concepts: each concept's caption word gets concept_bias x its probability added to
    # its log-probability until written (vlfuse.generation.WordBias); 0 = off
    concept_bias: float = 0.0
    # rerank: a photo whose ImageNet concept (the retriever's frozen classifier) has at least this probability gets
    # a caption that names it, with the words its training captions use (naming.py; constrained beam search where
    # no candidate does); 0 = off. Other strategies ignore it.
    name_concepts: float = 0.0

    strategies: ClassVar[Tuple[str, ...]] = DecodeConfig.strategies + ("rerank",)

    def __post_init__(self):
        super().__post_init__()
        if self.candidates < 0:
            raise ConfigError(f"candidates must be >= 0, got {self.candidates}")
        if not 0.0 <= self.name_concepts <= 1.0:
            raise ConfigError(f"name_concepts must be a probability in [0, 1] (0 = off), got {self.name_concepts}")


@dataclasses.dataclass
class RerankConfig:
    retriever: str = "flickr8k-retrieval"  # retrieval model (built-in name or directory) whose space the memory is in
    neighbours: int = 40                   # memory captions an image's candidates are compared with
    bleu_weight: float = 0.0               # consensus = CIDEr-D + bleu_weight x BLEU-4 against the neighbours
                                           # (BLEU needs pycocoevalcap; on Flickr8k val it lowered CIDEr)
    logprob_weight: float = 0.5            # score = consensus + logprob_weight x the caption model's mean
                                           # log-probability per word of the candidate (fluency)
    tower_digest: str = ""                 # identity of the retriever's image tower the memory was embedded with
    concept_weight: float = 0.0            # + concept_weight x the probabilities of the photo's concepts whose
                                           # words the candidate names (a model told its concepts, or naming them)

    def __post_init__(self):
        if self.neighbours < 1:
            raise ConfigError(f"rerank.neighbours must be at least 1, got {self.neighbours}")
        if self.bleu_weight < 0:
            raise ConfigError(f"rerank.bleu_weight must be >= 0, got {self.bleu_weight}")


@dataclasses.dataclass
class MemoryConfig:
    """Giving a trained caption model a memory (``vlfuse memory``, or the ``memory`` section of a training config,
    which builds it from the training captions as the run's last step)."""

    build: bool = False            # training configs: build one for the best checkpoint
    rerank: RerankConfig = dataclasses.field(default_factory=RerankConfig)
    default: bool = True           # make rerank the model's decoding default, drawing:
    candidates: int = 12           # samples besides the greedy caption
    temperature: float = 0.5       # (top-p 1: the whole distribution, sharpened)
    seed: int = 0                  # fixed: the same photo gets the same caption
    name_concepts: float = 0.0     # > 0: also measure how the captions name their photos' concepts (naming.py) and
                                   # name each photo's concepts of at least this probability by default

    def default_decode(self, base: CaptionDecodeConfig) -> Optional[CaptionDecodeConfig]:
        """The decoding default to save with the model (``base`` with rerank), or None to keep its own."""
        if not self.default:
            return None
        return dataclasses.replace(base, strategy="rerank", top_p=1.0, candidates=self.candidates,
                                   temperature=self.temperature, seed=self.seed, name_concepts=self.name_concepts)


class CaptionMemory:
    """Captions (space-separated tokens) with unit embeddings (N, D) and the index of the image each describes."""

    def __init__(self, texts: Sequence[str], embeddings: torch.Tensor, groups: torch.Tensor):
        if not (len(texts) == embeddings.shape[0] == groups.shape[0]) or not len(texts):
            raise ConfigError(f"a caption memory needs one embedding and one image index per caption, got "
                              f"{len(texts)} captions, {embeddings.shape[0]} embeddings, {groups.shape[0]} indices")
        self.texts = list(texts)
        self.embeddings = embeddings.float()  # (N, D)
        self.groups = groups.long()           # (N,)

    def __len__(self) -> int:
        return len(self.texts)

    def references(self) -> List[List[str]]:
        """The captions grouped by image: the corpus CIDEr-D takes its document frequencies from."""
        grouped: dict = {}
        for text, g in zip(self.texts, self.groups.tolist()):
            grouped.setdefault(g, []).append(text)
        return list(grouped.values())

    def nearest(self, queries: torch.Tensor, k: int) -> List[List[str]]:
        """For each query (B, D), the texts of its ``k`` most similar memory captions, best first."""
        k = min(k, len(self))
        top = (queries.float() @ self.embeddings.T).topk(k, dim=1).indices  # (B, k)
        return [[self.texts[j] for j in row] for row in top.tolist()]

    def save(self, directory: Union[str, Path]) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_path(directory / MEMORY_WEIGHTS) as tmp:
            save_file({"embeddings": self.embeddings.half().contiguous(), "groups": self.groups.int().contiguous()},
                      str(tmp))
        atomic_write(directory / MEMORY_TEXTS, "".join(t + "\n" for t in self.texts))

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "CaptionMemory":
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (MEMORY_WEIGHTS, MEMORY_TEXTS):
            if not (directory / name).is_file():
                raise ModelNotFoundError(f"'{directory}' has a rerank section in its config.json but no {name}; "
                                         f"rebuild its memory with `vlfuse memory --model {directory}`")
        arrays = load_file(str(directory / MEMORY_WEIGHTS))
        texts = (directory / MEMORY_TEXTS).read_text(encoding="utf-8").split("\n")[:-1]
        return cls(texts, arrays["embeddings"], arrays["groups"])


def shared_depth(a: VisionEncoder, b: VisionEncoder) -> int:
    """How many leading layers of their frozen stems two image encoders have in common: the same modules with the
    same weights, for the same image transform. 0 where they share none or are not built of ``stem_layers``.
    flickr8k-caption and flickr8k-retrieval share 18 of the retriever's 20 (EfficientNet-Lite0's first
    convolution and 15 of its 16 blocks, ~88 % of its arithmetic): the caption model tunes the last block and the
    head."""
    stem_a, stem_b = getattr(a, "stem_layers", None), getattr(b, "stem_layers", None)
    if not (isinstance(stem_a, nn.Sequential) and isinstance(stem_b, nn.Sequential)) or a.transform != b.transform:
        return 0
    depth = 0
    for layer_a, layer_b in zip(stem_a, stem_b):
        state_a, state_b = layer_a.state_dict(), layer_b.state_dict()
        if type(layer_a) is not type(layer_b) or state_a.keys() != state_b.keys() or not all(
                state_a[k].shape == state_b[k].shape and torch.equal(state_a[k], state_b[k]) for k in state_a):
            break
        depth += 1
    return depth


class _SharedLayers(VisionEncoder):
    """The first ``depth`` layers of ``encoder``'s frozen stem as an image encoder of its own, whose grid is their
    output activations (B, H*W, C): the runtime runs it as it runs any image encoder (ONNX Runtime on a CPU)."""

    def __init__(self, encoder: VisionEncoder, depth: int):
        super().__init__()
        self.layers = encoder.stem_layers[:depth]
        self.transform = encoder.transform

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        grid = self.layers(images.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)
        return ImageFeatures(grid, grid.mean(1))  # (B, H*W, C), (B, C)


class _OwnLayers(VisionEncoder):
    """``encoder``'s layers after the first ``depth`` (stem and tail) as an encoder of the shared layers' output
    activations (``input_shape``, (C, H, W)): a copy for inference, BatchNorm folded into the convolutions (the
    encoder's own weights may be freed: ``Captioner.drop_unused_weights``). The runtime runs it as it runs any image
    encoder (ONNX Runtime on a CPU), so that its output, like the shared layers', does not depend on the thread
    count (in PyTorch the caption model's last block differed by up to 1.7e-5 between 1 and 2 threads, which the
    int8 decoder's rounding turned into different reranking scores)."""

    def __init__(self, encoder: VisionEncoder, depth: int, input_shape: Tuple[int, int, int]):
        super().__init__()
        layers = list(encoder.stem_layers)[depth:] + list(encoder.tail_layers)
        self.layers = fold_batchnorm(copy.deepcopy(nn.Sequential(*layers)).eval())
        self.transform, self.input_shape = encoder.transform, tuple(input_shape)

    def forward(self, acts: torch.Tensor) -> ImageFeatures:
        grid = self.layers(acts.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)
        return ImageFeatures(grid, grid.mean(1))  # (B, C, H, W) -> grid (B, H*W, C)


def _side(grid: torch.Tensor) -> Tuple[int, int]:
    """(side, channels) of a square image's grid (B, H*W, C): the transform makes square images."""
    return int(round(grid.shape[1] ** 0.5)), grid.shape[2]


class SharedImagePass:
    """A caption model's image features and the retrieval tower's embeddings of the same images from one pass
    through the CNN layers the two share (``shared_depth``), then each one's own remaining layers (for
    flickr8k-caption ~12 % of the CNN's arithmetic each). All three run as any image encoder does at inference
    (``vlfuse.runtime.accelerate_vision``: ONNX Runtime on a CPU, an image at a time), so that nothing depends on
    the other images of a batch or on the thread count. Where ``build`` finds nothing shared it returns
    None: the two models then encode the images separately."""

    def __init__(self, caption_vision: VisionEncoder, tower, depth: int, runtime: RuntimeOptions):
        device = next(tower.parameters()).device
        cache = GraphCache(runtime.cache_dir)
        shared = _SharedLayers(caption_vision, depth).to(device)
        self.shared = accelerate_vision(shared, runtime, cache)
        size = caption_vision.transform.size
        with torch.inference_mode():  # the shape of the shared layers' output, which the own layers read
            side, channels = _side(shared(torch.zeros(1, 3, size, size, device=device)).grid)
        own = (channels, side, side)
        self.caption_layers = accelerate_vision(_OwnLayers(caption_vision, depth, own).to(device), runtime, cache)
        self.tower_layers = accelerate_vision(_OwnLayers(tower.vision, depth, own).to(device), runtime, cache)
        self.tower = tower

    @classmethod
    def build(cls, caption_vision: VisionEncoder, tower, runtime: RuntimeOptions) -> Optional["SharedImagePass"]:
        depth = shared_depth(caption_vision, tower.vision)
        return cls(caption_vision, tower, depth, runtime) if depth else None

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> Tuple[ImageFeatures, torch.Tensor, torch.Tensor]:
        """Transformed images (B, 3, S, S) -> (the caption model's ImageFeatures, the tower's unit embeddings
        (B, D), the tower's CNN's pooled features (B, C))."""
        cells = self.shared(pixels).grid  # (B, H*W, C): the shared layers' output
        side, channels = _side(cells)
        acts = cells.transpose(1, 2).reshape(len(cells), channels, side, side)  # (B, C, H, W), channels-last
        grids, embeddings, pooled = [], [], []
        for image in acts.split(1):
            grids.append(self.caption_layers(image).grid)
            tower = self.tower_layers(image)
            embeddings.append(self.tower.embed_cells(tower.grid))
            pooled.append(tower.pooled)
        grid = torch.cat(grids)
        return ImageFeatures(grid, grid.mean(1)), torch.cat(embeddings).float(), torch.cat(pooled).float()


class RerankInputs(NamedTuple):
    """What ``ConsensusReranker.encode`` finds for a batch of images."""
    features: Optional[ImageFeatures]   # the caption model's, where one pass through shared layers made them
    neighbours: List[List[str]]         # each image's nearest memory captions, best first
    concepts: Optional[torch.Tensor]    # (B, C) the classifier's probabilities, where asked for


class ConsensusReranker:
    """Everything the ``rerank`` strategy needs: the retriever's image tower (sharing a pass through the CNN
    with the caption model where it can: ``SharedImagePass``), the memory and the scorer; for naming photos'
    concepts (``CaptionDecodeConfig.name_concepts``), the ImageNet classifier of the tower's frozen backbone (one
    linear layer on the pooled features the tower computes anyway; built when first asked for) and the memory's
    ``ConceptNaming``."""

    def __init__(self, tower, memory: CaptionMemory, config: RerankConfig,
                 image_pass: Optional[SharedImagePass] = None, naming: Optional[ConceptNaming] = None):

        if config.tower_digest and tower.digest() != config.tower_digest:
            raise ModelNotFoundError(
                f"the caption memory was embedded with another version of retrieval model '{config.retriever}' "
                f"(image tower {config.tower_digest}, found {tower.digest()}); rebuild it with `vlfuse memory`")
        self.tower, self.memory, self.config, self.image_pass = tower, memory, config, image_pass
        self.scorer = ConsensusScorer(CiderD(memory.references()), config.bleu_weight)
        self.naming = naming or ConceptNaming()
        self._concept_head = None

    @property
    def concept_head(self):
        """The ImageNet classifier whose input the tower's pooled features are (ConfigError where the tower's CNN
        is not a frozen pretrained backbone with one)."""
        if self._concept_head is None:
            from ..retrieval.concepts import ConceptConfig, build_head

            self._concept_head = build_head(ConceptConfig(), self.tower.config.vision).to(
                next(self.tower.parameters()).device)
        return self._concept_head

    @classmethod
    def load(cls, directory: Union[str, Path], config: RerankConfig, device: Optional[torch.device] = None,
             runtime: RuntimeOptions = RuntimeOptions(), caption_vision: Optional[VisionEncoder] = None
             ) -> "ConsensusReranker":
        """The memory in ``directory``; the retriever's tower on ``device``, run as ``runtime`` says (the caption
        model's runtime options), in one pass with ``caption_vision`` where they share layers."""
        from ..retrieval.pipeline import RetrievalImageTower

        tower = RetrievalImageTower.from_pretrained(config.retriever, runtime=runtime).to(device or "cpu")
        image_pass = SharedImagePass.build(caption_vision, tower, runtime) if caption_vision is not None else None
        if image_pass is None:
            tower.runtime.build()  # its CNN's fast copy now, not in the first photo's time
        return cls(tower, CaptionMemory.load(directory), config, image_pass, ConceptNaming.load(directory))

    def encode(self, pixels: torch.Tensor, concepts: bool = False) -> RerankInputs:
        """Transformed images (B, 3, H, W) -> the caption model's features of them where one pass through the
        shared layers makes them, the texts of each image's nearest memory captions, and with ``concepts`` its
        concepts' probabilities (``RerankInputs``)."""
        features = None
        if self.image_pass is not None:
            features, embeddings, pooled = self.image_pass(pixels)
        else:
            embeddings, pooled = self.tower.encode(pixels.to(next(self.tower.parameters()).device))
        probabilities = self.concept_head(pooled).cpu() if concepts else None
        return RerankInputs(features, self.memory.nearest(embeddings.cpu(), self.config.neighbours), probabilities)

    def concept_words(self, probabilities: torch.Tensor) -> List[Dict[str, float]]:
        """Classifier probabilities (B, C) -> each image's concepts as {caption word: probability}."""
        return concept_words(self.concept_head.words, probabilities)

    def words_to_name(self, concepts: Dict[str, float], vocabulary: Dict[str, int], threshold: float) -> List[str]:
        """The words of which an image's caption must include one (``ConceptNaming``), for its concepts (caption
        word -> probability) at or above ``threshold``, those in the caption model's ``vocabulary``; none where
        ``threshold`` is 0 (naming off) or no concept reaches it."""
        if not threshold:
            return []
        words = [w for c, p in concepts.items() if p >= threshold for w in self.naming.words_for(c)]
        return [w for w in dict.fromkeys(words) if w in vocabulary]

    def choose(self, candidates: Sequence[str], neighbours: Sequence[str],
               logprobs: Optional[Sequence[float]] = None, concepts: Optional[Dict[str, float]] = None) -> int:
        """Index of the best of ``candidates`` (space-separated tokens) given the image's ``neighbours``;
        ``logprobs`` are the candidates' mean log-probabilities per word under the caption model, ``concepts``
        the image's concept words and their probabilities (``concept_weight`` rewards naming them)."""
        bonus = [0.0] * len(candidates)
        if logprobs is not None:
            bonus = [b + self.config.logprob_weight * lp for b, lp in zip(bonus, logprobs)]
        if concepts and self.config.concept_weight:
            bonus = [b + self.config.concept_weight * sum(p for w, p in concepts.items() if w in set(c.split()))
                     for b, c in zip(bonus, candidates)]
        return self.scorer.choose(candidates, neighbours, bonus)


def build_memory(retriever, data: CaptionSet, tokenizer: Tokenizer, batch_size: int = 256,
                 progress: bool = True, lang: str = "en") -> CaptionMemory:
    """Embed every caption of ``data`` (in language ``lang``) with ``retriever`` (a ``Retriever``: its text tower
    in that language) into a memory whose texts are tokenised by ``tokenizer`` (the caption model's, so candidates
    and neighbours compare alike)."""
    from tqdm import tqdm

    texts = [c for caps in data.captions for c in caps]
    groups = torch.tensor([i for i, caps in enumerate(data.captions) for _ in caps])
    chunks = []
    bar = tqdm(total=len(texts), desc="memory captions", unit="cap", disable=not progress)
    for s in range(0, len(texts), batch_size):
        chunks.append(torch.from_numpy(retriever.embed_texts(texts[s:s + batch_size], lang=lang)))
        bar.update(min(batch_size, len(texts) - s))
    bar.close()
    tokenised = [" ".join(tokenizer.tokenize(t)) for t in texts]
    return CaptionMemory(tokenised, torch.cat(chunks), groups)


def rerank_config(raw: Optional[dict]) -> Optional[RerankConfig]:

    return None if raw is None else from_dict(RerankConfig, raw, "rerank")


def attach_memory(directory: Union[str, Path], memory: CaptionMemory, config: RerankConfig,
                  default_decode: Optional[dict] = None) -> Path:
    """Write ``memory`` into the caption checkpoint ``directory`` and its ``rerank`` section into config.json;
    with ``default_decode`` (CaptionDecodeConfig fields) that also becomes the model's decoding default."""

    directory, raw = read_checkpoint(directory, "caption")
    memory.save(directory)
    raw["rerank"] = to_dict(config)
    if default_decode is not None:
        raw["decode"] = default_decode
    save_json(raw, directory / CONFIG_NAME)
    return directory


def build_and_attach(directory: Union[str, Path], data: CaptionSet, config: MemoryConfig,
                     progress: bool = True) -> CaptionMemory:
    """Embed ``data``'s captions (in the caption model's language) with ``config.rerank.retriever`` and attach them
    to the caption checkpoint in ``directory`` (with the decoding default ``config`` asks for)."""
    from ..retrieval.pipeline import RetrievalImageTower, Retriever

    directory = resolve_model(directory)  # a built-in name is written in place too
    raw = read_config(directory)
    base = from_dict(CaptionDecodeConfig, raw.get("decode", {}), "decode")
    rerank = dataclasses.replace(config.rerank,
                                 tower_digest=RetrievalImageTower.from_pretrained(config.rerank.retriever).digest())
    retriever, tokenizer = Retriever.from_pretrained(rerank.retriever), Tokenizer.load(directory)
    memory = build_memory(retriever, data, tokenizer, progress=progress, lang=raw.get("lang", "en"))
    if config.name_concepts:  # how the same captions name their photos' concepts
        naming_of_photos(retriever, data, tokenizer, progress=progress).save(directory)
    decode = config.default_decode(base)
    attach_memory(directory, memory, rerank, to_dict(decode) if decode else None)
    return memory
