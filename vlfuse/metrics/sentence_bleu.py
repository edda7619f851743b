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
        self.n = n
        self._refs: List[List[str]] = [list(refs) for refs in references]

    def score(self, image: int, hypothesis: str) -> float:
        return bleu_against([hypothesis], self._refs[image], self.n)[0]


def bleu_against(hypotheses: Sequence[str], references: Sequence[str], n: int = 4) -> List[float]:
    """Each hypothesis's sentence BLEU-n (0..1) against the same ``references``, which pycocoevalcap's scorer
    cooks once for all of them (``SentenceBleu`` cooks them per call)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer, cook_refs, cook_test

    if not hypotheses:
        return []
    scorer, cooked = BleuScorer(n=n), cook_refs(list(references), n=n)
    for hypothesis in hypotheses:
        scorer.crefs.append(cooked)
        scorer.ctest.append(cook_test(hypothesis, cooked, n=n))
    _, per_caption = scorer.compute_score(option="closest", verbose=0)
    return [float(b) for b in per_caption[n - 1]]
