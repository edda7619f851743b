"""CIDEr-D (Vedantam et al. 2015) with document frequencies from a fixed reference corpus — the SCST reward.

pycocoevalcap's ``Cider`` takes its idf from whatever references it is given, which inside a training step is
one batch: the reward then changes with the batch and rewards n-grams that are rare only in those 32 images.
Like self-critical.pytorch, this scorer computes the idf once over all training references and adds CIDEr-D's
clipping and Gaussian length penalty (sigma 6), so samples cannot game the reward with repetition or length.
Caption vectors are computed once and cached. Scores are on pycocoevalcap's scale (x10).
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
    image i's references, ``similarity`` with any captions (consensus reranking). Caption vectors are computed on
    first use and kept (up to ``cache_size`` of them)."""

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

    def score(self, image: int, hypothesis: str) -> float:
        """CIDEr-D of one caption against the references of image ``image`` (index into the corpus)."""
        return self.similarities([hypothesis], self._references[image])[0]

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
        return self.similarities([hypothesis], references)[0]

    def similarities(self, hypotheses: Sequence[str], references: Sequence[str]) -> List[float]:
        """``similarity`` of each hypothesis against the same references. The references' n-grams are indexed
        once, so a hypothesis costs a look-up per n-gram of its own instead of a pass over every reference."""
        if not references:
            return [0.0] * len(hypotheses)
        refs = [self.text_vector(r) for r in references]
        postings: List[Dict[tuple, List[Tuple[int, float]]]] = [defaultdict(list) for _ in range(self.n)]
        for j, (vr, _, _) in enumerate(refs):
            for k in range(self.n):
                for gram, w in vr[k].items():
                    postings[k][gram].append((j, w))
        scores = []
        for hypothesis in hypotheses:
            vh, nh, lh = self.text_vector(hypothesis)
            total = [0.0] * len(refs)
            for k in range(self.n):
                if nh[k] == 0:
                    continue
                dot = [0.0] * len(refs)
                for gram, w in vh[k].items():
                    for j, wr in postings[k].get(gram, ()):
                        dot[j] += min(w, wr) * wr
                for j, (_, nr, _) in enumerate(refs):
                    if nr[k]:
                        total[j] += dot[j] / (nh[k] * nr[k])
            penalties = [math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2)) for _, _, lr in refs]
            scores.append(10.0 * sum(t / self.n * p for t, p in zip(total, penalties)) / len(refs))
        return scores
