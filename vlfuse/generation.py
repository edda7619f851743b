"""Decoding, written once for every generative model.

A model provides ``step(tokens (B, t), state) -> (logprobs (B, V), state)`` where ``state`` is a dict of
tensors whose first dimension is the batch; beam search reorders it with ``index_select``. Entries named in
``per_image`` hold one row per image for all of that image's rows (its beams), which are consecutive: they are
never copied per beam or reordered (the step function reads them by image).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from .errors import ConfigError

StepFn = Callable[[torch.Tensor, Dict[str, torch.Tensor]], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
STRATEGIES = ("greedy", "beam", "sample", "rerank")


@dataclasses.dataclass(frozen=True)  # hashable: the service batches requests that decode alike
class DecodeConfig:
    strategy: str = "beam"        # greedy | beam | sample | rerank (a Captioner with a caption memory: the
                                  # greedy caption and `candidates` samples, the one its memory agrees with most)
    beam_size: int = 3
    max_len: int = 20             # words, not counting <bos>/<eos>
    length_penalty: float = 0.0   # final beam score = sum logprob / length ** length_penalty
    no_repeat_ngram: int = 3      # forbid repeating any n-gram of this size (0 = off)
    top_p: float = 0.9            # nucleus size for sampling
    temperature: float = 1.0
    seed: Optional[int] = None
    candidates: int = 16          # rerank: samples drawn (at temperature / top_p) besides the greedy caption

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"decoding strategy must be one of {STRATEGIES}, got '{self.strategy}'")
        if self.beam_size < 1:
            raise ConfigError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.max_len < 1:
            raise ConfigError(f"max_len must be at least 1, got {self.max_len}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.candidates < 0:
            raise ConfigError(f"candidates must be >= 0, got {self.candidates}")

    def override(self, beam: Optional[int] = None, **fields) -> "DecodeConfig":
        """This config with the given fields changed; ``None`` keeps a field as it is. ``beam`` is the
        user-facing width of the CLI, API and service: 1 means greedy, more means beam search of that width
        (unless ``strategy`` is given too). A model's saved decoding default is overridden this way."""
        changes = {k: v for k, v in fields.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown decoding option(s): {', '.join(unknown)}")
        if beam is not None:
            changes.setdefault("strategy", "greedy" if beam == 1 else "beam")
            changes["beam_size"] = beam
        return dataclasses.replace(self, **changes)

    @property
    def width(self) -> int:
        """Beams kept per image: the beam size for beam search, 1 for greedy decoding and sampling."""
        return self.beam_size if self.strategy == "beam" else 1


def reorder_state(state: Dict[str, torch.Tensor], index: torch.Tensor, keep: FrozenSet[str] = frozenset()
                  ) -> Dict[str, torch.Tensor]:
    """Rows of every state entry picked by ``index``; entries named in ``keep`` are passed through as they are."""
    return {k: v if k in keep else v.index_select(0, index) for k, v in state.items()}


def _banned_ngram_tokens(rows: List[List[int]], n: int) -> List[List[int]]:
    """For each sequence, tokens that would complete an n-gram already present in it."""
    banned = []
    for seq in rows:
        out = []
        if n > 0 and len(seq) >= n:
            prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
            for i in range(len(seq) - n + 1):
                if tuple(seq[i:i + n - 1]) == prefix:
                    out.append(seq[i + n - 1])
        banned.append(out)
    return banned


def _apply_ngram_block(logp: torch.Tensor, tokens: torch.Tensor, n: int, skip_first: int = 1) -> None:
    if n <= 0 or tokens.shape[1] - skip_first < n - 1:
        return
    rows = tokens[:, skip_first:].tolist()
    for r, toks in enumerate(_banned_ngram_tokens(rows, n)):
        if toks:
            logp[r, toks] = float("-inf")


class _SpecialTokens:
    """Additive masks over the vocabulary for step ``t``: <pad> and <bos> are never generated, <eos> not first
    (no empty captions) and, at ``max_len``, nothing but <eos>. One addition per step, which also gives the
    loop its own float copy of the step's log-probabilities to edit."""

    def __init__(self, vocab: int, cfg: DecodeConfig, bos: int, eos: int, pad: int, device):
        inf = float("-inf")
        self.base = torch.zeros(vocab, device=device)
        self.base[[pad, bos]] = inf
        self.first = self.base.clone()
        self.first[eos] = inf
        self.last = torch.full((vocab,), inf, device=device)
        self.last[eos] = 0.0
        self.max_len = cfg.max_len

    def apply(self, logp: torch.Tensor, t: int) -> torch.Tensor:
        if t == self.max_len:
            return logp.float() + self.last
        return logp.float() + (self.first if t == 0 else self.base)


@torch.no_grad()
def generate(step: StepFn, state: Dict[str, torch.Tensor], batch_size: int, cfg: DecodeConfig,
             bos: int = 1, eos: int = 2, pad: int = 0, per_image: FrozenSet[str] = frozenset()
             ) -> List[Tuple[List[int], float]]:
    """Decode ``batch_size`` sequences; returns (token ids without <bos>/<eos>, score) per item."""
    if cfg.strategy == "rerank":
        raise ConfigError("the rerank strategy picks among a caption model's greedy caption and samples with its "
                          "caption memory: use a Captioner whose checkpoint has one (or greedy, beam or sample)")
    if cfg.strategy == "beam":
        return beam_search(step, state, batch_size, cfg, bos, eos, pad, per_image)
    return _greedy_or_sample(step, state, batch_size, cfg, bos, eos, pad)


def _greedy_or_sample(step, state, batch_size, cfg, bos, eos, pad):
    device = next(iter(state.values())).device
    gen = None
    if cfg.strategy == "sample":
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    tokens = torch.full((batch_size, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(batch_size, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    specials = None
    for t in range(cfg.max_len + 1):
        logp, state = step(tokens, state)
        specials = specials or _SpecialTokens(logp.shape[1], cfg, bos, eos, pad, device)
        logp = specials.apply(logp, t)
        _apply_ngram_block(logp, tokens, cfg.no_repeat_ngram)
        if cfg.strategy == "greedy":
            chosen, nxt = logp.max(-1)
        else:
            nxt = _sample_top_p(logp / cfg.temperature, cfg.top_p, gen)
            chosen = logp.gather(1, nxt[:, None]).squeeze(1)
        scores = scores + torch.where(done, torch.zeros_like(chosen), chosen)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done = done | (nxt == eos)
        if bool(done.all()):
            break
    return [(_strip(row, eos, pad), float(s)) for row, s in zip(tokens[:, 1:].tolist(), scores.tolist())]


def _sample_top_p(logits: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row from the smallest set of tokens whose probability reaches ``top_p`` (renormalised).
    Sampled by inverting the cumulative distribution (one uniform number per row): ``torch.multinomial`` and a
    full sort cost ~10 ms each per step at 160 rows x 3k words on a CPU, this ~0.3 ms; the vocabulary is
    sorted only when a nucleus is asked for (``top_p`` < 1)."""
    probs = logits.softmax(-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)  # keep the smallest set reaching top_p
    cum = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=gen, device=probs.device, dtype=cum.dtype) * cum[:, -1:]
    pick = torch.searchsorted(cum, u, right=True).clamp_(max=probs.shape[1] - 1)  # cum[i-1] <= u < cum[i]
    # rounding can land u on the very end of the last interval: never return a token of probability zero
    pick = torch.where(probs.gather(1, pick) > 0, pick, probs.argmax(-1, keepdim=True))
    return (order.gather(1, pick) if order is not None else pick).squeeze(1)


def beam_search(step: StepFn, state: Dict[str, torch.Tensor], batch_size: int, cfg: DecodeConfig,
                bos: int = 1, eos: int = 2, pad: int = 0, per_image: FrozenSet[str] = frozenset()
                ) -> List[Tuple[List[int], float]]:
    """Batched beam search. Finished beams stay in their slot and extend with <pad> at no cost;
    at the end beams are ranked by score / length ** length_penalty."""
    k = cfg.beam_size
    device = next(iter(state.values())).device
    state = reorder_state(state, torch.arange(batch_size, device=device).repeat_interleave(k), keep=per_image)
    # Entries the step function never replaces (the image's memory, its cross-attention keys/values) are equal
    # for all beams of an image, so picking beams within an image leaves them unchanged: they are not copied.
    expanded, static = dict(state), frozenset(state)
    tokens = torch.full((batch_size * k, 1), bos, dtype=torch.long, device=device)
    scores = torch.full((batch_size, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step has no duplicates
    finished = torch.zeros(batch_size * k, dtype=torch.bool, device=device)
    base = (torch.arange(batch_size, device=device) * k)[:, None]  # (B, 1)
    specials = None
    for t in range(cfg.max_len + 1):
        logp, state = step(tokens, state)  # (B*K, V)
        vocab = logp.shape[1]
        specials = specials or _SpecialTokens(vocab, cfg, bos, eos, pad, device)
        logp = specials.apply(logp, t)
        _apply_ngram_block(logp, tokens, cfg.no_repeat_ngram)
        logp[finished] = float("-inf")
        logp[finished, pad] = 0.0
        cand = (scores.view(-1, 1) + logp).view(batch_size, k * vocab)
        scores, idx = cand.topk(k, dim=1)  # (B, K)
        src = (base + idx // vocab).view(-1)  # (B*K,) which beam each new beam extends
        tok = (idx % vocab).view(-1, 1)
        tokens = torch.cat([tokens.index_select(0, src), tok], 1)
        static = frozenset(key for key in static if state.get(key) is expanded[key])
        state = reorder_state(state, src, keep=static)
        finished = finished.index_select(0, src) | (tok.view(-1) == eos)
        if bool(finished.all()):
            break
    seqs = tokens[:, 1:].tolist()
    lengths = torch.tensor([len(_strip(s, eos, pad)) + 1 for s in seqs], device=device, dtype=torch.float)
    final = scores.view(-1) / lengths.pow(cfg.length_penalty)
    best = final.view(batch_size, k).argmax(1)
    out = []
    for b in range(batch_size):
        r = b * k + int(best[b])
        out.append((_strip(seqs[r], eos, pad), float(scores.view(-1)[r])))
    return out


def _strip(ids: List[int], eos: int, pad: int) -> List[int]:
    out = []
    for i in ids:
        if i == eos or i == pad:
            break
        out.append(i)
    return out
