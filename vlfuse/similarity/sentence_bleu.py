"""Sentence-level BLEU-n per caption — an optional SCST reward term (self-critical.pytorch's
``--bleu_reward_weight``). Scored by pycocoevalcap's own ``BleuScorer`` (``option="closest"``), the scorer behind
the evaluation's BLEU, so the reward and the reported metric cannot drift apart.
"""
from __future__ import annotations

from typing import List, Sequence


class SentenceBleu:
    """``SentenceBleu(references)``: ``references[i]`` lists image i's reference captions (space-separated
    tokens); ``score(i, hypothesis)`` is the hypothesis's BLEU-n (0..1) against them."""

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4):
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer

        self._scorer, self.n = BleuScorer, n
        self._refs: List[List[str]] = [list(refs) for refs in references]

    def score(self, image: int, hypothesis: str) -> float:
        scorer = self._scorer(test=hypothesis, refs=self._refs[image], n=self.n)
        _, per_caption = scorer.compute_score(option="closest", verbose=0)
        return float(per_caption[self.n - 1][0])
