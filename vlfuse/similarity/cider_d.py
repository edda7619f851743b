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
    """``CiderD(references)``: ``references[i]`` lists image i's reference captions (space-separated tokens).
    The document frequencies come from all of them (one document per image); ``score`` compares a caption with
    image i's references, ``similarity`` with any captions (consensus reranking). Vectors are computed on first
    use and kept (reference vectors per image; up to ``cache_size`` other captions)."""

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0,
                 cache_size: int = 200_000):
        self.n, self.sigma = n, sigma
        self._references = [list(refs) for refs in references]
        self.df: Counter = Counter()
        for refs in self._references:
            grams = set()
            for r in refs:
                words = r.split()
                for k in range(1, n + 1):
                    grams.update(zip(*[words[i:] for i in range(k)]))
            self.df.update(grams)
        self.log_docs = math.log(float(max(len(self._references), 1)))
        self._refs: Dict[int, List[Vec]] = {}
        self._texts: Dict[str, Vec] = {}
        self.cache_size = cache_size

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
        refs = self._refs.get(image)
        if refs is None:
            refs = self._refs[image] = [self._vec(_ngrams(r.split(), self.n)) for r in self._references[image]]
        hyp = self._vec(_ngrams(hypothesis.split(), self.n))
        return 10.0 * sum(self._sim(hyp, r) for r in refs) / max(len(refs), 1)

    def text_vector(self, text: str) -> Vec:
        """The CIDEr-D vector of any caption (kept for reuse: neighbours recur across queries)."""
        vec = self._texts.get(text)
        if vec is None:
            if len(self._texts) >= self.cache_size:
                self._texts.clear()
            vec = self._texts[text] = self._vec(_ngrams(text.split(), self.n))
        return vec

    def similarity(self, hypothesis: str, references: Sequence[str]) -> float:
        """CIDEr-D of ``hypothesis`` against ``references`` (any captions), with this corpus's idf."""
        hyp = self.text_vector(hypothesis)
        return 10.0 * sum(self._sim(hyp, self.text_vector(r)) for r in references) / max(len(references), 1)
