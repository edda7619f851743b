"""Consensus reranking of captions with a caption memory.

A caption model may carry a *memory*: training captions embedded in a retrieval model's space. At inference the
``rerank`` decoding strategy draws candidates from the caption model (its greedy caption and a few samples),
finds the memory captions nearest the image (the retrieval model's image tower, no text encoder), and keeps the
candidate that agrees best with them (``vlfuse.metrics.consensus``). The memory is two files beside the
checkpoint — ``memory.safetensors`` (embeddings (N, D) fp16, and which training image each caption describes)
and ``memory.txt`` (the captions, tokenised as the caption model does, one per line) — and the ``rerank`` section
of its config.json (``RerankConfig``).

Build one for a trained caption model with ``vlfuse memory --model DIR --data ... --split train``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from ...data.captions import CaptionSet
from ...data.tokenizer import Tokenizer
from ...errors import ConfigError, ModelNotFoundError
from ...generation import DecodeConfig
from ...io import atomic_path, atomic_write
from ...runtime import RuntimeOptions
from ..base import read_checkpoint

MEMORY_WEIGHTS = "memory.safetensors"
MEMORY_TEXTS = "memory.txt"


@dataclasses.dataclass
class RerankConfig:
    retriever: str = "flickr8k-retrieval"  # retrieval model (built-in name or directory) whose space the memory is in
    neighbours: int = 50                   # memory captions an image's candidates are compared with
    bleu_weight: float = 2.0               # consensus = CIDEr-D + bleu_weight x BLEU-4 against the neighbours
    logprob_weight: float = 0.5            # score = consensus + logprob_weight x the caption model's mean
                                           # log-probability per word of the candidate (fluency)
    tower_digest: str = ""                 # identity of the retriever's image tower the memory was embedded with

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
    candidates: int = 16           # samples besides the greedy caption
    temperature: float = 0.5       # (top-p 1: the whole distribution, sharpened)
    seed: int = 0                  # fixed: the same photo gets the same caption

    def default_decode(self, base: DecodeConfig) -> Optional[DecodeConfig]:
        """The decoding default to save with the model (``base`` with rerank), or None to keep its own."""
        if not self.default:
            return None
        return dataclasses.replace(base, strategy="rerank", top_p=1.0, candidates=self.candidates,
                                   temperature=self.temperature, seed=self.seed)


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


class ConsensusReranker:
    """Everything the ``rerank`` strategy needs: the retriever's image tower, the memory and the scorer."""

    def __init__(self, tower, memory: CaptionMemory, config: RerankConfig):
        from ...metrics.cider_d import CiderD
        from ...metrics.consensus import ConsensusScorer

        if config.tower_digest and tower.digest() != config.tower_digest:
            raise ModelNotFoundError(
                f"the caption memory was embedded with another version of retrieval model '{config.retriever}' "
                f"(image tower {config.tower_digest}, found {tower.digest()}); rebuild it with `vlfuse memory`")
        self.tower, self.memory, self.config = tower, memory, config
        self.scorer = ConsensusScorer(CiderD(memory.references()), config.bleu_weight)

    @classmethod
    def load(cls, directory: Union[str, Path], config: RerankConfig, device: Optional[torch.device] = None,
             runtime: RuntimeOptions = RuntimeOptions()) -> "ConsensusReranker":
        """The memory in ``directory``; the retriever's tower on ``device``, run as ``runtime`` says (the caption
        model's runtime options)."""
        from ..retrieval.pipeline import RetrievalImageTower

        tower = RetrievalImageTower.from_pretrained(config.retriever, runtime=runtime).to(device or "cpu")
        tower.runtime.build()  # its CNN's fast copy now, not in the first photo's time
        return cls(tower, CaptionMemory.load(directory), config)

    def neighbours(self, pixels: torch.Tensor) -> List[List[str]]:
        """Transformed images (B, 3, H, W) -> the texts of each image's nearest memory captions."""
        return self.memory.nearest(self.tower(pixels.to(next(self.tower.parameters()).device)).cpu(),
                                   self.config.neighbours)

    def choose(self, candidates: Sequence[str], neighbours: Sequence[str],
               logprobs: Optional[Sequence[float]] = None) -> int:
        """Index of the best of ``candidates`` (space-separated tokens) given the image's ``neighbours``;
        ``logprobs`` are the candidates' mean log-probabilities per word under the caption model."""
        bonus = None if logprobs is None else [self.config.logprob_weight * lp for lp in logprobs]
        return self.scorer.choose(candidates, neighbours, bonus)


def build_memory(retriever, data: CaptionSet, tokenizer: Tokenizer, batch_size: int = 256,
                 progress: bool = True) -> CaptionMemory:
    """Embed every caption of ``data`` with ``retriever`` (a ``Retriever``: its text tower) into a memory whose
    texts are tokenised by ``tokenizer`` (the caption model's, so candidates and neighbours compare alike)."""
    from tqdm import tqdm

    texts = [c for caps in data.captions for c in caps]
    groups = torch.tensor([i for i, caps in enumerate(data.captions) for _ in caps])
    chunks = []
    bar = tqdm(total=len(texts), desc="memory captions", unit="cap", disable=not progress)
    for s in range(0, len(texts), batch_size):
        chunks.append(torch.from_numpy(retriever.embed_texts(texts[s:s + batch_size])))
        bar.update(min(batch_size, len(texts) - s))
    bar.close()
    tokenised = [" ".join(tokenizer.tokenize(t)) for t in texts]
    return CaptionMemory(tokenised, torch.cat(chunks), groups)


def rerank_config(raw: Optional[dict]) -> Optional[RerankConfig]:
    from ...config import from_dict

    return None if raw is None else from_dict(RerankConfig, raw, "rerank")


def attach_memory(directory: Union[str, Path], memory: CaptionMemory, config: RerankConfig,
                  default_decode: Optional[dict] = None) -> Path:
    """Write ``memory`` into the caption checkpoint ``directory`` and its ``rerank`` section into config.json;
    with ``default_decode`` (DecodeConfig fields) that also becomes the model's decoding default."""
    from ...checkpoint import CONFIG_NAME
    from ...config import save_json, to_dict

    directory, raw = read_checkpoint(directory, "caption")
    memory.save(directory)
    raw["rerank"] = to_dict(config)
    if default_decode is not None:
        raw["decode"] = default_decode
    save_json(raw, directory / CONFIG_NAME)
    return directory


def build_and_attach(directory: Union[str, Path], data: CaptionSet, config: MemoryConfig,
                     progress: bool = True) -> CaptionMemory:
    """Embed ``data``'s captions with ``config.rerank.retriever`` and attach them to the caption checkpoint in
    ``directory`` (with the decoding default ``config`` asks for)."""
    from ...checkpoint import read_config
    from ...config import from_dict, to_dict
    from ...hub import resolve_model
    from ..retrieval.pipeline import RetrievalImageTower, Retriever

    directory = resolve_model(directory)  # a built-in name is written in place too
    base = from_dict(DecodeConfig, read_config(directory).get("decode", {}), "decode")
    rerank = dataclasses.replace(config.rerank,
                                 tower_digest=RetrievalImageTower.from_pretrained(config.rerank.retriever).digest())
    memory = build_memory(Retriever.from_pretrained(rerank.retriever), data, Tokenizer.load(directory),
                          progress=progress)
    decode = config.default_decode(base)
    attach_memory(directory, memory, rerank, to_dict(decode) if decode else None)
    return memory
