"""VQA accuracy: plain for one reference answer, the VQA benchmark's min(#humans / 3, 1) for several."""
from __future__ import annotations

from collections import Counter
from typing import Dict, Sequence

from ..data.vqa import normalize_answer


def soft_scores(answers: Sequence[str]) -> Dict[str, float]:
    """Answer -> target score: 1 for a single answer; min(#humans / 3, 1) for a list of human answers."""
    if len(answers) == 1:
        return {answers[0]: 1.0}
    return {a: min(c / 3.0, 1.0) for a, c in Counter(answers).items()}


def answer_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Plain accuracy for one reference answer; VQA accuracy min(#humans who said it / 3, 1) for several."""
    return soft_scores(answers).get(normalize_answer(prediction), 0.0)
