"""Decoding, written once for every generative model.

A model provides ``step(tokens (B, t), state) -> (logprobs (B, V), state)`` where ``state`` is a dict of
tensors whose first dimension is the batch; beam search reorders it with ``index_select``. Entries named in
``per_image`` hold one row per image for all of that image's rows (its beams), which are consecutive: they are
never copied per beam or reordered (the step function reads them by image).

Sampling draws from one random stream per image (``seeds``, see ``content_seeds``), so an image's samples do not
depend on which other images share its batch. Task strategies built on these (a caption model's consensus
reranking) live with their task.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Callable, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from .errors import ConfigError

StepFn = Callable[[torch.Tensor, Dict[str, torch.Tensor]], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


@dataclasses.dataclass(frozen=True)  # hashable: the service batches requests that decode alike
class DecodeConfig:
    strategy: str = "beam"        # greedy | beam | sample
    beam_size: int = 3
    max_len: int = 20             # words, not counting <bos>/<eos>
    length_penalty: float = 0.0   # final beam score = sum logprob / length ** length_penalty
    no_repeat_ngram: int = 3      # forbid repeating any n-gram of this size (0 = off)
    top_p: float = 0.9            # nucleus size for sampling
    temperature: float = 1.0
    seed: Optional[int] = None    # sampling: None draws a fresh seed per call; an int makes samples reproducible

    # What ``generate`` runs. A task's config may add strategies of its own (built on these) that its pipeline
    # runs, as the caption task's ``CaptionDecodeConfig`` adds consensus reranking.
    strategies: ClassVar[Tuple[str, ...]] = ("greedy", "beam", "sample")

    def __post_init__(self):
        if self.strategy not in self.strategies:
            raise ConfigError(f"decoding strategy must be one of {self.strategies}, got '{self.strategy}'")
        if self.beam_size < 1:
            raise ConfigError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.max_len < 1:
            raise ConfigError(f"max_len must be at least 1, got {self.max_len}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")

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


def content_seeds(inputs: torch.Tensor, seed: Optional[int]) -> List[int]:
    """One sampling seed per input (row of ``inputs``, e.g. an image's transformed pixels): a hash of its values
    and ``seed``. An input's samples then depend only on the input and ``seed``, never on its batch; equal inputs
    get equal seeds. ``seed`` None draws a fresh base seed (different samples every call). SHA-1 for speed (~0.3 ms
    for a 224 px image), not secrecy."""
    base = random.SystemRandom().getrandbits(63) if seed is None else seed
    seeds = []
    for row in inputs.detach().cpu().float().contiguous().reshape(len(inputs), -1).numpy():
        digest = hashlib.sha1(f"{base}|".encode())
        digest.update(memoryview(row).cast("B"))
        seeds.append(int.from_bytes(digest.digest()[:8], "little") >> 1)  # < 2 ** 63, as manual_seed takes
    return seeds


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
    """Additive masks over the vocabulary for step ``t``: <pad>, <bos> and (given its id) <unk> are never
    generated, <eos> not first (no empty captions) and, at ``max_len``, nothing but <eos>. One addition per step,
    which also gives the loop its own float copy of the step's log-probabilities to edit."""

    def __init__(self, vocab: int, cfg: DecodeConfig, bos: int, eos: int, pad: int, device,
                 unk: Optional[int] = None):
        inf = float("-inf")
        self.base = torch.zeros(vocab, device=device)
        self.base[[pad, bos] + ([] if unk is None else [unk])] = inf
        self.first = self.base.clone()
        self.first[eos] = inf
        self.last = torch.full((vocab,), inf, device=device)
        self.last[eos] = 0.0
        self.max_len = cfg.max_len

    def apply(self, logp: torch.Tensor, t: int) -> torch.Tensor:
        if t == self.max_len:
            return logp.float() + self.last
        return logp.float() + (self.first if t == 0 else self.base)


class WordBias:
    """Log-probability bonuses a row gets for words until it has written them: ``bias`` (B, V), one row per
    sequence (all zeros: none). A decoder told which words a sequence should contain (a caption model told its
    photo's concepts) makes them likelier this way — a soft form of constrained decoding (Anderson et al. 2017)
    that needs no extra beams — and the bonus of a word ends once it is written, so it is not repeated for it."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias.float().clone()

    def apply(self, logp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return logp + self.bias.index_select(0, rows)

    def written(self, rows: torch.Tensor, words: torch.Tensor) -> None:
        self.bias[rows, words] = 0.0

    def reorder(self, index: torch.Tensor) -> None:
        self.bias = self.bias.index_select(0, index)


@torch.no_grad()
def generate(step: StepFn, state: Dict[str, torch.Tensor], batch_size: int, cfg: DecodeConfig,
             bos: int = 1, eos: int = 2, pad: int = 0, per_image: FrozenSet[str] = frozenset(),
             seeds: Optional[Sequence[int]] = None, greedy_first: bool = False,
             word_bias: Optional[torch.Tensor] = None, unk: Optional[int] = None,
             must_include: Optional[torch.Tensor] = None, all_beams: bool = False):
    """Decode ``batch_size`` sequences; returns (token ids without <bos>/<eos>, score) per item.

    ``unk``, the id of the unknown word, is never generated: a caption that says "<unk>" says nothing there, and
    decoded text drops it (a Chinese model with a 1,407-word vocabulary wrote it in 1 greedy caption in 10).

    Sampling takes ``seeds``, one per image, whose rows are consecutive (``batch_size // len(seeds)`` each): every
    row draws from its image's own random stream, so an image's samples are the same whatever else is in the batch
    (without ``seeds`` all rows share one stream seeded with ``cfg.seed``). With ``greedy_first`` the first row of
    each image takes the most likely word at every step instead: its greedy caption, decoded beside its samples.
    ``word_bias`` (batch_size, V) adds to each sequence's log-probabilities until it writes the word (``WordBias``);
    the scores returned leave it out. ``must_include`` (batch_size, V) bool: beam search then returns, for each row
    with any word marked, the best sequence containing at least one of them (``constrained_beam_search``); with
    ``all_beams`` each item is instead the list of its finished beams that do, best first.
    """
    if cfg.strategy not in DecodeConfig.strategies:
        raise ConfigError(f"generate decodes with {DecodeConfig.strategies}, not '{cfg.strategy}': a task's own "
                          f"strategy runs in its pipeline (e.g. a Captioner's rerank)")
    bias = None if word_bias is None else WordBias(word_bias)
    if must_include is not None and bool(must_include.any()):
        if cfg.strategy != "beam":
            raise ConfigError(f"words a caption must include need beam search, not '{cfg.strategy}'")
        beams = constrained_beam_search(step, state, batch_size, cfg, must_include, bos, eos, pad, per_image, bias,
                                        unk)
        return beams if all_beams else [row[0] for row in beams]
    if all_beams:
        raise ConfigError("all_beams returns the beams of a search for words a caption must include (must_include)")
    if cfg.strategy == "beam":
        return beam_search(step, state, batch_size, cfg, bos, eos, pad, per_image, bias, unk)
    device = next(iter(state.values())).device
    if cfg.strategy == "greedy":
        return _greedy_or_sample(step, state, batch_size, cfg, bos, eos, pad, per_image, None, None, bias, unk)
    uniforms = _uniforms(batch_size, cfg, seeds, device)
    greedy_rows = None
    if greedy_first:
        if seeds is None:
            raise ConfigError("greedy_first needs the images' seeds, which say where each image's rows start")
        greedy_rows = torch.arange(batch_size, device=device) % (batch_size // len(seeds)) == 0  # (B,)
    return _greedy_or_sample(step, state, batch_size, cfg, bos, eos, pad, per_image, uniforms, greedy_rows, bias,
                             unk)


def _uniforms(batch_size: int, cfg: DecodeConfig, seeds: Optional[Sequence[int]], device) -> torch.Tensor:
    """The uniform numbers sampling inverts, drawn up front: (batch_size, max_len + 1), one per row and step.
    Row ``r`` of image ``i`` takes row ``r`` of a table drawn from a generator seeded with ``seeds[i]`` (the
    table's rows do not depend on its length: an image's first 8 samples are the same whether 8 or 16 are
    drawn)."""
    steps = cfg.max_len + 1
    if seeds is None:
        gen = torch.Generator().manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        return torch.rand(batch_size, steps, generator=gen).to(device)
    if not seeds or batch_size % len(seeds):
        raise ConfigError(f"sampling seeds must be one per image, dividing the {batch_size} rows evenly; "
                          f"got {len(seeds)}")
    rows = batch_size // len(seeds)
    return torch.cat([torch.rand(rows, steps, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


def _greedy_or_sample(step, state, batch_size, cfg, bos, eos, pad, per_image: FrozenSet[str],
                      uniforms: Optional[torch.Tensor], greedy_rows: Optional[torch.Tensor],
                      bias: Optional[WordBias] = None, unk: Optional[int] = None):
    """Greedy decoding where ``uniforms`` is None, else sampling (but the ``greedy_rows`` decode greedily).

    A finished row leaves the batch where the rest can decode without it: where every state entry is one row per
    row, or the batch holds one image (the rows of several images must stay in equal groups for their per-image
    entries). Elsewhere it stays, extending with <pad> at no cost. (Rerank's 17 rows of a photo: ~25 % fewer
    row-steps, the longest of them sets the steps, not every row.)"""
    device = next(iter(state.values())).device
    rows = torch.arange(batch_size, device=device)  # (R,) the batch's rows still in the step's batch
    words = torch.full((batch_size, cfg.max_len + 1), pad, dtype=torch.long, device=device)
    scores = torch.zeros(batch_size, device=device)
    tokens = torch.full((batch_size, 1), bos, dtype=torch.long, device=device)  # (R, t) of the rows in the batch
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)  # (R,)
    rows_leave = all(state[k].shape[0] == 1 for k in per_image if k in state)
    specials = None
    for t in range(cfg.max_len + 1):
        logp, state = step(tokens, state)
        specials = specials or _SpecialTokens(logp.shape[1], cfg, bos, eos, pad, device, unk)
        logp = specials.apply(logp, t)
        _apply_ngram_block(logp, tokens, cfg.no_repeat_ngram)
        biased = logp if bias is None else bias.apply(logp, rows)
        if uniforms is None:
            nxt = biased.argmax(-1)
        else:
            nxt = _sample_top_p(biased / cfg.temperature, cfg.top_p, uniforms[rows, t:t + 1])
            if greedy_rows is not None:
                nxt = torch.where(greedy_rows[rows], biased.argmax(-1), nxt)
        chosen = logp.gather(1, nxt[:, None]).squeeze(1)
        if bias is not None:
            bias.written(rows, nxt)
        scores[rows] += torch.where(done, torch.zeros_like(chosen), chosen)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        words[rows, t] = nxt
        done = done | (nxt == eos)
        if bool(done.all()):
            break
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        if rows_leave and bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            rows, tokens, done = rows[keep], tokens[keep], done[keep]
            state = reorder_state(state, keep, keep=per_image)
    return [(_strip(row, eos, pad), float(s)) for row, s in zip(words.tolist(), scores.tolist())]


def _sample_top_p(logits: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row from the smallest set of tokens whose probability reaches ``top_p`` (renormalised),
    picked by inverting the cumulative distribution at the row's ``uniform`` number (B, 1) in [0, 1):
    ``torch.multinomial`` and a full sort cost ~10 ms each per step at 160 rows x 3k words on a CPU, this
    ~0.3 ms; the vocabulary is sorted only when a nucleus is asked for (``top_p`` < 1)."""
    probs = logits.softmax(-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)  # keep the smallest set reaching top_p
    cum = probs.cumsum(-1)
    u = uniform.to(cum.dtype) * cum[:, -1:]
    pick = torch.searchsorted(cum, u, right=True).clamp_(max=probs.shape[1] - 1)  # cum[i-1] <= u < cum[i]
    # rounding can land u on the very end of the last interval: never return a token of probability zero
    zero = probs.gather(1, pick) <= 0
    if bool(zero.any()):
        pick = torch.where(zero, probs.argmax(-1, keepdim=True), pick)
    return (order.gather(1, pick) if order is not None else pick).squeeze(1)


def beam_search(step: StepFn, state: Dict[str, torch.Tensor], batch_size: int, cfg: DecodeConfig,
                bos: int = 1, eos: int = 2, pad: int = 0, per_image: FrozenSet[str] = frozenset(),
                bias: Optional[WordBias] = None, unk: Optional[int] = None) -> List[Tuple[List[int], float]]:
    """Batched beam search. Finished beams stay in their slot and extend with <pad> at no cost;
    at the end beams are ranked by score / length ** length_penalty (with ``bias``, its bonuses included)."""
    k = cfg.beam_size
    device = next(iter(state.values())).device
    state = reorder_state(state, torch.arange(batch_size, device=device).repeat_interleave(k), keep=per_image)
    if bias is not None:
        bias.reorder(torch.arange(batch_size, device=device).repeat_interleave(k))
    all_rows = torch.arange(batch_size * k, device=device)
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
        logp, state, specials = _beam_logprobs(step, tokens, state, t, cfg, specials, all_rows, finished, bias, bos,
                                               eos, pad, unk)  # (B*K, V)
        vocab = logp.shape[1]
        cand = (scores.view(-1, 1) + logp).view(batch_size, k * vocab)
        scores, idx = cand.topk(k, dim=1)  # (B, K)
        src = (base + idx // vocab).view(-1)  # (B*K,) which beam each new beam extends
        tok = (idx % vocab).view(-1, 1)
        tokens, state, static, finished = _extend_beams(tokens, state, src, tok, static, expanded, all_rows, finished,
                                                        bias, eos)
        if bool(finished.all()):
            break
    seqs = tokens[:, 1:].tolist()
    final = scores.view(-1) / _lengths(seqs, eos, pad, device).pow(cfg.length_penalty)
    best = final.view(batch_size, k).argmax(1)
    out = []
    for b in range(batch_size):
        r = b * k + int(best[b])
        out.append((_strip(seqs[r], eos, pad), float(scores.view(-1)[r])))
    return out


def constrained_beam_search(step: StepFn, state: Dict[str, torch.Tensor], batch_size: int, cfg: DecodeConfig,
                            must_include: torch.Tensor, bos: int = 1, eos: int = 2, pad: int = 0,
                            per_image: FrozenSet[str] = frozenset(), bias: Optional[WordBias] = None,
                            unk: Optional[int] = None) -> List[List[Tuple[List[int], float]]]:
    """Beam search that must write one of a set of words (Anderson et al. 2017, constrained beam search with one
    disjunctive constraint: a finite-state machine of two states, "not yet" and "named", each with its own
    ``beam_size`` beams). ``must_include`` (batch_size, V) bool marks each sequence's words; a sequence with none
    marked starts in "named" and decodes as plain beam search. A "not yet" beam extends with any other word and
    stays, or with a marked word and moves to "named". Returns for each sequence its finished "named" beams, best
    first (its "not yet" ones only if no marked word could be placed). Costs twice the beams of ``beam_search``."""
    k = cfg.beam_size
    device = next(iter(state.values())).device
    marked = must_include.to(device=device, dtype=torch.bool)
    rows = torch.arange(batch_size, device=device).repeat_interleave(2 * k)  # (B*2K,) row b's "not yet" then "named"
    state = reorder_state(state, rows, keep=per_image)
    if bias is not None:
        bias.reorder(rows)
    all_rows = torch.arange(batch_size * 2 * k, device=device)
    expanded, static = dict(state), frozenset(state)
    tokens = torch.full((batch_size * 2 * k, 1), bos, dtype=torch.long, device=device)
    inf = float("-inf")
    scores = torch.full((batch_size, 2, k), inf, device=device)  # (B, state, K)
    constrained = marked.any(1)
    scores[:, 0, 0] = torch.where(constrained, 0.0, inf)
    scores[:, 1, 0] = torch.where(constrained, inf, 0.0)
    finished = torch.zeros(batch_size * 2 * k, dtype=torch.bool, device=device)
    base = (torch.arange(batch_size, device=device) * 2 * k)[:, None]  # (B, 1)
    specials = None
    for t in range(cfg.max_len + 1):
        logp, state, specials = _beam_logprobs(step, tokens, state, t, cfg, specials, all_rows, finished, bias, bos,
                                               eos, pad, unk)  # (B*2K, V)
        vocab = logp.shape[1]
        logp = logp.view(batch_size, 2, k, vocab)
        not_yet = scores[:, 0, :, None] + logp[:, 0].masked_fill(marked[:, None, :], inf)  # (B, K, V)
        moves = scores[:, 0, :, None] + logp[:, 0].masked_fill(~marked[:, None, :], inf)
        written = scores[:, 1, :, None] + logp[:, 1]
        top_not_yet, i_not_yet = not_yet.reshape(batch_size, -1).topk(k, dim=1)  # beams 0..K-1: "not yet" beams
        top_written, i_written = torch.cat([moves, written], 1).reshape(batch_size, -1).topk(k, dim=1)  # 0..2K-1
        scores = torch.stack([top_not_yet, top_written], 1)
        src = (base + torch.cat([i_not_yet // vocab, i_written // vocab], 1)).view(-1)  # both index rows 0..2K-1
        tok = torch.cat([i_not_yet % vocab, i_written % vocab], 1).view(-1, 1)
        tokens, state, static, finished = _extend_beams(tokens, state, src, tok, static, expanded, all_rows, finished,
                                                        bias, eos)
        if bool(finished.all()):
            break
    seqs = tokens[:, 1:].tolist()
    final = (scores.view(-1) / _lengths(seqs, eos, pad, device).pow(cfg.length_penalty)).view(batch_size, 2, k)
    final = final.masked_fill(~finished.view(batch_size, 2, k), inf)  # beams never extended: -inf anyway
    group = torch.isfinite(final[:, 1]).any(1).long()  # (B,) 1: some beam wrote a marked word
    out = []
    for b in range(batch_size):
        ranked = final[b, int(group[b])]
        rows = [b * 2 * k + int(group[b]) * k + j for j in ranked.argsort(descending=True).tolist()
                if bool(torch.isfinite(ranked[j]))]
        out.append([(_strip(seqs[r], eos, pad), float(scores.view(-1)[r])) for r in rows] or [([], inf)])
    return out


def _beam_logprobs(step: StepFn, tokens: torch.Tensor, state: Dict[str, torch.Tensor], t: int, cfg: DecodeConfig,
                   specials: Optional[_SpecialTokens], rows: torch.Tensor, finished: torch.Tensor,
                   bias: Optional[WordBias], bos: int, eos: int, pad: int, unk: Optional[int]):
    """One step of a beam search: every beam's log-probabilities of its next word (R, V), with the special tokens,
    n-gram blocking and word bonuses applied, and a finished beam extending with <pad> at no cost; the step's new
    state; the special-token masks (made at the first step)."""
    logp, state = step(tokens, state)
    specials = specials or _SpecialTokens(logp.shape[1], cfg, bos, eos, pad, logp.device, unk)
    logp = specials.apply(logp, t)
    _apply_ngram_block(logp, tokens, cfg.no_repeat_ngram)
    if bias is not None:
        logp = bias.apply(logp, rows)
    logp[finished] = float("-inf")
    logp[finished, pad] = 0.0
    return logp, state, specials


def _extend_beams(tokens: torch.Tensor, state: Dict[str, torch.Tensor], src: torch.Tensor, tok: torch.Tensor,
                  static: FrozenSet[str], expanded: Dict[str, torch.Tensor], rows: torch.Tensor,
                  finished: torch.Tensor, bias: Optional[WordBias], eos: int):
    """The new beams: beam ``r`` extends beam ``src[r]`` with word ``tok[r]``. Reorders the tokens, the state
    (except entries the step never replaced: equal for all beams of an image, they are not copied), the word
    bonuses and which beams are finished."""
    tokens = torch.cat([tokens.index_select(0, src), tok], 1)
    static = frozenset(key for key in static if state.get(key) is expanded[key])
    state = reorder_state(state, src, keep=static)
    if bias is not None:
        bias.reorder(src)
        bias.written(rows, tok.view(-1))
    finished = finished.index_select(0, src) | (tok.view(-1) == eos)
    return tokens, state, static, finished


def _lengths(seqs: List[List[int]], eos: int, pad: int, device) -> torch.Tensor:
    """Each sequence's length in words, counting its <eos> (length penalties divide by it)."""
    return torch.tensor([len(_strip(s, eos, pad)) + 1 for s in seqs], device=device, dtype=torch.float)


def _strip(ids: List[int], eos: int, pad: int) -> List[int]:
    out = []
    for i in ids:
        if i == eos or i == pad:
            break
        out.append(i)
    return out
