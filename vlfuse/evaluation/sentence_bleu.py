"""Sentence-level BLEU-n as pycocoevalcap computes it per caption — an optional SCST reward term.

Same as ``BleuScorer.compute_score(option="closest")``'s per-sentence scores (the reward self-critical.pytorch
mixes in with ``--bleu_reward_weight``): clipped n-gram precisions with pycocoevalcap's tiny smoothing, their
geometric mean, and a brevity penalty against the reference closest in length. Reference n-gram counts are
computed once per image.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import List, Sequence, Tuple

from .cider_d import _ngrams

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's smoothing constants


class SentenceBleu:
    """``SentenceBleu(references)``: ``references[i]`` lists image i's reference captions (space-separated
    tokens); ``score(i, hypothesis)`` is the hypothesis's BLEU-n (0..1) against them."""

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4):
        self.n = n
        self._refs: List[Tuple[Counter, List[int]]] = []
        for refs in references:
            most: Counter = Counter()
            for r in refs:
                for gram, count in _ngrams(r.split(), n).items():
                    most[gram] = max(most[gram], count)
            self._refs.append((most, [len(r.split()) for r in refs]))

    def score(self, image: int, hypothesis: str) -> float:
        words = hypothesis.split()
        most, lengths = self._refs[image]
        correct, guess = [0] * self.n, [max(len(words) - k, 0) for k in range(self.n)]
        for gram, count in _ngrams(words, self.n).items():
            correct[len(gram) - 1] += min(count, most.get(gram, 0))
        bleu = 1.0
        for k in range(self.n):
            bleu *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        bleu **= 1.0 / self.n
        ref_len = min(lengths, key=lambda length: (abs(length - len(words)), length)) if lengths else 0
        ratio = (len(words) + _TINY) / (ref_len + _SMALL)
        return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu
