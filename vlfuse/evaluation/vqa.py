"""Evaluate a VQA model: overall, yes/no and other accuracy (VQA accuracy for multi-answer data), and WUPS."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..config import save_json
from ..data.vqa import VQASet, load_pixels, majority_answer, read_vqa
from ..errors import ConfigError, DataError
from ..metrics.vqa import answer_accuracy, expected_calibration_error
from ..metrics.wups import Wups
from ..tasks.vqa import QuestionAnswerer
from . import EvaluationRequest


@torch.inference_mode()
def logits_set(model, data: VQASet, acts: torch.Tensor, batch_size: int = 512, progress: bool = False
               ) -> torch.Tensor:
    """Answer logits (Q, A) for every question of ``data``; ``acts`` holds the stem activations of
    ``data.images``. Each image goes through the vision tail once per batch, however many questions it has."""
    out = []
    for s in tqdm(range(0, len(data), batch_size), desc=f"answering {data.name}", unit="batch",
                  disable=not progress, dynamic_ncols=True):
        qs = data.questions[s:s + batch_size]
        used = sorted({q.image for q in qs})
        remap = {old: new for new, old in enumerate(used)}
        image = model.network.vision.tail(acts[used].float().to(model.device))
        index = torch.tensor([remap[q.image] for q in qs], device=model.device)
        out.append(model.question_logits(image, index, [q.question for q in qs]).float().cpu())
    return torch.cat(out)


def predict_set(model, data: VQASet, acts: torch.Tensor, batch_size: int = 512, top_k: int = 1,
                progress: bool = False) -> List:
    """Answers (``VQAAnswer``) for every question of ``data``; see ``logits_set``."""
    logits = logits_set(model, data, acts, batch_size, progress)
    return model.rank(model.probabilities(logits), [q.question for q in data.questions], top_k)


def score_answers(data: VQASet, predictions: Sequence[str], probabilities: Optional[Sequence[float]] = None) -> Dict:
    """accuracy overall, on yes/no questions and on the rest, with counts (as fractions in [0, 1]); for data whose
    questions carry a type (``vlfuse data make-qa``: object, number, color, location, yes/no), the accuracy per
    type too; with the answers' ``probabilities``, their expected calibration error."""
    sums = {"all": 0.0, "yes/no": 0.0, "other": 0.0}
    counts = {"all": 0, "yes/no": 0, "other": 0}
    by_type: Dict[str, List[float]] = {}
    multi = any(len(q.answers) > 1 for q in data.questions)
    correct = []
    for q, pred in zip(data.questions, predictions):
        acc = answer_accuracy(pred, q.answers)
        correct.append(acc)
        for key in ("all", q.answer_type):
            sums[key] += acc
            counts[key] += 1
        if q.qtype:
            by_type.setdefault(q.qtype, []).append(acc)
    mean = {k: (sums[k] / counts[k] if counts[k] else 0.0) for k in sums}
    metrics = {"accuracy": mean["all"], "yes_no_accuracy": mean["yes/no"], "other_accuracy": mean["other"],
               "questions": counts["all"], "yes_no_questions": counts["yes/no"], "other_questions": counts["other"],
               "metric": "vqa-accuracy min(#humans/3, 1)" if multi else "exact match"}
    if by_type:
        metrics["accuracy_by_type"] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
        metrics["questions_by_type"] = {t: len(v) for t, v in sorted(by_type.items())}
    if probabilities is not None:
        metrics["ece"] = expected_calibration_error(probabilities, correct)
    return metrics


WUPS_THRESHOLDS = (0.9, 0.0)  # the pair WUPS is reported at (Malinowski & Fritz 2014; COCO-QA)


def wups_metrics(data: VQASet, predictions: Sequence[str], wordnet: Union[str, Path, None] = None) -> Dict:
    """``wups_0.9`` and ``wups_0.0`` of ``predictions`` against each question's majority (or first) answer, over
    the WordNet in folder ``wordnet`` (None: Debian's); where WordNet or NLTK is missing, ``wups`` says why."""
    try:
        wups = Wups.from_wordnet(wordnet)
        references = [majority_answer(q.answers) for q in data.questions]
        return {f"wups_{t}": wups.mean(predictions, references, t) for t in WUPS_THRESHOLDS}
    except (DataError, OSError, LookupError) as exc:  # a missing extra never fails an evaluation
        return {"wups": f"not computed: {exc}"}


def evaluate_model(model, data: VQASet, batch_size: int = 512, progress: bool = True,
                   results_path: str | None = None, wordnet: Union[str, Path, None] = None) -> Dict:
    """Score ``model`` on every question of ``data``; questions about unreadable images are counted as failed.
    WUPS is computed over the WordNet in folder ``wordnet`` (see ``wups_metrics``)."""
    t0 = time.time()
    pixels, kept, errors = load_pixels(data.images, model.transform, progress=progress, desc=f"images {data.name}")
    for err in errors:
        tqdm.write(f"skipped image: {err}", file=sys.stderr)
    usable = data.subset_images(kept) if errors else data
    acts = model.network.stem_activations(pixels, progress=progress)
    answers = predict_set(model, usable, acts, batch_size, progress=progress)
    metrics = score_answers(usable, [a.answer for a in answers], [a.probability for a in answers])
    metrics["unsure"] = sum(not a.sure for a in answers) / max(1, len(answers))
    metrics.update(wups_metrics(usable, [a.answer for a in answers], wordnet))
    metrics.update({"data": data.name, "images": len(usable.images), "failed_images": len(errors),
                    "failed_questions": len(data) - len(usable), "skipped_lines": len(data.skipped),
                    "seconds": time.time() - t0})
    if results_path:
        save_json([{"image": usable.images[q.image], "question": q.question, "answer": a.answer,
                    "probability": round(a.probability, 4), "sure": a.sure, "type": q.qtype,
                    "references": q.answers}
                   for q, a in zip(usable.questions, answers)], results_path)
    return metrics


def evaluate(request: EvaluationRequest) -> Dict:
    """``vlfuse evaluate --task vqa --model M --data easy-vqa|file.jsonl|FOLDER --split S [--limit N] [--out m.json]``;
    a captioned Flickr-layout FOLDER is asked the questions ``vlfuse data make-qa`` makes from its split."""
    if request.lang not in (None, "en"):
        raise ConfigError(f"VQA models answer English questions; --lang {request.lang} does not apply")
    model = QuestionAnswerer.from_pretrained(request.model, device=request.device, runtime=request.runtime)
    data_arg = request.data or "easy-vqa"
    split = request.split
    data = read_vqa(data_arg, split).limit_questions(request.limit)
    for line in data.skipped:
        tqdm.write(f"skipped {line}", file=sys.stderr)
    results = request.results_path(".answers.json")
    metrics = evaluate_model(model, data, batch_size=max(64, request.batch_size), results_path=results,
                             wordnet=request.wordnet)
    metrics.update({"model": str(request.model), "split": split})
    return metrics
