"""CIDEr-D (Vedantam et al. 2015) with document frequencies from a fixed reference corpus — the SCST reward.

pycocoevalcap's ``Cider`` takes its idf from whatever references it is given, which inside a training step is
one batch: the reward then changes with the batch and rewards n-grams that are rare only in those 32 images.
Like self-critical.pytorch, this scorer computes the idf once over all training references and adds CIDEr-D's
clipping and Gaussian length penalty (sigma 6), so samples cannot game the reward with repetition or length.
Reference vectors are computed once per image. Scores are on pycocoevalcap's scale (x10).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Dict, List, Sequence, Tuple

Vec = Tuple[List[Dict[tuple, float]], List[float], int]


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """``CiderD(references)``: ``references[i]`` lists image i's reference captions (space-separated tokens)."""

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        cooked = [[_ngrams(r.split(), n) for r in refs] for refs in references]
        self.df: Counter = Counter()
        for refs in cooked:
            self.df.update(set(g for c in refs for g in c))
        self.log_docs = math.log(float(max(len(references), 1)))
        self._refs = [[self._vec(c) for c in refs] for refs in cooked]

    def _vec(self, counts: Counter) -> Vec:
        vec: List[Dict[tuple, float]] = [defaultdict(float) for _ in range(self.n)]
        norm = [0.0] * self.n
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = float(tf) * (self.log_docs - math.log(max(1.0, self.df[gram])))
            vec[k][gram] = w
            norm[k] += w * w
        length = sum(tf for g, tf in counts.items() if len(g) == 1)
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, hyp: Vec, ref: Vec) -> float:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for k in range(self.n):
            if nh[k] == 0 or nr[k] == 0:
                continue
            dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            total += dot / (nh[k] * nr[k])
        return total / self.n * penalty

    def score(self, image: int, hypothesis: str) -> float:
        """CIDEr-D of one caption against the references of image ``image`` (index into the corpus)."""
        hyp = self._vec(_ngrams(hypothesis.split(), self.n))
        refs = self._refs[image]
        return 10.0 * sum(self._sim(hyp, r) for r in refs) / max(len(refs), 1)
