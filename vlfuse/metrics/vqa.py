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


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[float], bins: int = 15) -> float:
    """ECE (Guo et al. 2017): answers binned by confidence into ``bins`` equal-width bins; the mean over bins,
    weighted by their share of answers, of |accuracy - mean confidence|. 0 is perfectly calibrated."""
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness values")
    if not len(confidences):
        return 0.0
    sums: Dict[int, list] = {}
    for c, ok in zip(confidences, correct):
        b = min(int(float(c) * bins), bins - 1)
        s = sums.setdefault(b, [0, 0.0, 0.0])
        s[0] += 1
        s[1] += float(c)
        s[2] += float(ok)
    return sum(abs(acc - conf) for n, conf, acc in sums.values()) / len(confidences)
