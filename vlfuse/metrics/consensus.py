"""Consensus scoring: which of several candidate captions of one image agrees best with a set of
reference-like captions (at inference: the training captions nearest the image in a retrieval space).

A caption's score is its mean CIDEr-D against those captions (idf from a fixed corpus) plus ``bleu_weight``
times its sentence BLEU-4 against them, the two metrics captioning is judged by: a minimum-Bayes-risk choice
with the neighbours' captions as evidence (consensus reranking, as Devlin et al. 2015 and Mun et al. 2017 rank
retrieved or generated captions).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from .cider_d import CiderD


class ConsensusScorer:
    def __init__(self, cider: CiderD, bleu_weight: float = 2.0):
        if bleu_weight < 0:
            raise ValueError(f"bleu_weight must be >= 0, got {bleu_weight}")
        self.cider = cider
        self.bleu_weight = bleu_weight

    def scores(self, candidates: Sequence[str], references: Sequence[str]) -> List[float]:
        """One score per candidate (space-separated tokens) against ``references`` (the same)."""
        if not references:
            return [0.0] * len(candidates)
        scores = self.cider.similarities(candidates, references)
        if self.bleu_weight:
            from .sentence_bleu import bleu_against

            scores = [s + self.bleu_weight * b for s, b in zip(scores, bleu_against(candidates, references))]
        return scores

    def choose(self, candidates: Sequence[str], references: Sequence[str],
               bonus: Optional[Sequence[float]] = None) -> int:
        """Index of the best candidate (the first of equals); ``bonus`` adds a term per candidate to its score."""
        scores = self.scores(candidates, references)
        if bonus is not None:
            scores = [s + b for s, b in zip(scores, bonus)]
        return max(range(len(candidates)), key=lambda i: (scores[i], -i))
