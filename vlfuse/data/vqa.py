"""VQA data: the easy-VQA package and a general JSONL format, read into one ``VQASet``.

JSONL, one object per line (image paths relative to the file's folder)::

    {"image": "imgs/1.jpg", "question": "what color is the bus?", "answer": "red"}
    {"image": "imgs/2.jpg", "question": "how many dogs?", "answers": ["2", "2", "two", ...]}   # VQAv2 style

With an ``answers`` list (several humans), training uses soft scores min(#humans / 3, 1) and accuracy is
the standard VQA accuracy; with a single ``answer`` it is plain accuracy. A malformed line, or one whose
image is missing, is skipped and reported with its line number; reading goes on.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..errors import DataError, ImageError
from .captions import read_captions
from .images import ImageTransform, load_image
from .questions import generate_questions

EASY_VQA = "easy-vqa"
YES_NO = ("yes", "no")


def normalize_answer(text: str) -> str:
    """Lower-case, collapse spaces, drop a trailing period: 'Yes.' and ' yes' are the same answer."""
    return re.sub(r"\s+", " ", str(text).strip().lower()).rstrip(".").strip()


@dataclasses.dataclass
class VQAQuestion:
    image: int            # index into VQASet.images
    question: str
    answers: List[str]    # one answer, or every human's answer (VQAv2: 10)
    line: int = 0         # source line (JSONL) for messages
    qtype: str = ""       # the question's type where the data names it ("type"; e.g. object, number, color)

    @property
    def answer_type(self) -> str:
        """'yes/no' when the majority answer is yes or no, else 'other'."""
        return "yes/no" if majority_answer(self.answers) in YES_NO else "other"


@dataclasses.dataclass
class VQASet:
    images: List[str]                     # image paths
    questions: List[VQAQuestion]
    name: str = ""
    skipped: List[str] = dataclasses.field(default_factory=list)  # "line N: why" for every skipped line

    def __len__(self) -> int:
        return len(self.questions)

    def subset_images(self, keep: Sequence[int], name: str = "") -> "VQASet":
        """The questions about the images ``keep`` (re-indexed)."""
        remap = {old: new for new, old in enumerate(keep)}
        qs = [dataclasses.replace(q, image=remap[q.image]) for q in self.questions if q.image in remap]
        return VQASet([self.images[i] for i in keep], qs, name or self.name, list(self.skipped))

    def limit_questions(self, n: int) -> "VQASet":
        """The first ``n`` questions (and only the images they need)."""
        if not n or n >= len(self.questions):
            return self
        questions = self.questions[:n]
        used = sorted({q.image for q in questions})
        remap = {old: new for new, old in enumerate(used)}
        return VQASet([self.images[i] for i in used], [dataclasses.replace(q, image=remap[q.image]) for q in questions],
                      self.name, list(self.skipped))


def majority_answer(answers: Sequence[str]) -> str:
    return Counter(answers).most_common(1)[0][0] if answers else ""


# -- readers ----------------------------------------------------------------------------------------
def read_easy_vqa(split: str) -> VQASet:
    """easy-VQA from its PyPI package: split 'train' (4,000 images) or 'test' (1,000 images)."""
    try:
        import easy_vqa
    except ImportError:
        raise DataError("easy-VQA data needs the package easy-vqa: pip install easy-vqa") from None
    if split == "train":
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise DataError(f"easy-VQA has splits 'train' and 'test' (validation is held out of train), got '{split}'")
    order = sorted(paths)
    index = {image_id: i for i, image_id in enumerate(order)}
    questions = [VQAQuestion(index[i], t, [normalize_answer(a)]) for t, a, i in zip(texts, answers, ids)]
    return VQASet([paths[i] for i in order], questions, f"easy-vqa/{split}")


def read_jsonl(path: str | Path) -> VQASet:
    """Read a VQA JSONL file; bad lines are skipped and listed in ``VQASet.skipped``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"VQA data file '{path}' does not exist")
    images: List[str] = []
    image_index: Dict[str, int] = {}
    questions: List[VQAQuestion] = []
    skipped: List[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                q = _parse_record(record)
            except (json.JSONDecodeError, ValueError) as exc:
                skipped.append(f"line {n}: {exc}")
                continue
            image_path = (path.parent / q[0]).resolve() if not Path(q[0]).is_absolute() else Path(q[0])
            if not image_path.is_file():
                skipped.append(f"line {n}: image '{q[0]}' does not exist")
                continue
            key = str(image_path)
            if key not in image_index:
                image_index[key] = len(images)
                images.append(key)
            questions.append(VQAQuestion(image_index[key], q[1], q[2], n, q[3]))
    if not questions:
        raise DataError(f"'{path}' has no usable questions ({len(skipped)} lines skipped"
                        + (f", first: {skipped[0]}" if skipped else "") + ")")
    return VQASet(images, questions, path.stem, skipped)


def _parse_record(record) -> Tuple[str, str, List[str], str]:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    image, question = record.get("image"), record.get("question")
    if not isinstance(image, str) or not image:
        raise ValueError("missing 'image' (a path)")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing or empty 'question'")
    if "answers" in record:
        raw = record["answers"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("'answers' must be a non-empty list")
        # VQAv2 stores {"answer": ..., "answer_id": ...} objects; plain strings are accepted too
        answers = [normalize_answer(a["answer"] if isinstance(a, dict) else a) for a in raw]
    elif "answer" in record:
        answers = [normalize_answer(record["answer"])]
    else:
        raise ValueError("needs 'answer' or 'answers'")
    if not all(answers):
        raise ValueError("empty answer")
    qtype = record.get("type", "")
    if "type" in record and (not isinstance(qtype, str) or not qtype.strip()):
        raise ValueError("'type' must be a non-empty string")
    return image, question.strip(), answers, qtype.strip()


EASY_VQA_VAL_FRACTION = 0.1  # images of easy-VQA train held out for validation (seed 0), as training does


def read_vqa(data: str, split: str = "train") -> VQASet:
    """``easy-vqa`` with split train | val (10 % of train images held out, seed 0) | test, or a JSONL file;
    for a folder, ``<folder>/<split>.jsonl``, or, for a captioned photo folder without one (Flickr layout:
    ``captions.txt``), the questions ``vlfuse data make-qa`` makes from its captions (``read_caption_questions``)."""
    if data == EASY_VQA:
        if split == "val":
            return split_images(read_easy_vqa("train"), EASY_VQA_VAL_FRACTION, 0)[1]
        return read_easy_vqa(split)
    path = Path(data)
    if path.is_dir():
        if not (path / f"{split}.jsonl").is_file() and (path / "captions.txt").is_file():
            return read_caption_questions(path, split)
        path = path / f"{split}.jsonl"
    return read_jsonl(path)


def read_caption_questions(folder: str | Path, split: str, seed: int = 0) -> VQASet:
    """The questions made from a captioned folder's ``split`` (``vlfuse.data.questions``, default settings: the
    same set ``vlfuse data make-qa`` writes), without writing a file."""
    generated = generate_questions(read_captions(folder, split), seed=seed, progress=True)
    questions = [VQAQuestion(item.image, item.question, [item.answer], n, item.qtype)
                 for n, item in enumerate(generated.items, 1)]
    if not questions:
        raise DataError(f"no questions could be made from the captions of '{folder}' ({split})")
    return VQASet([str(p) for p in generated.images], questions, f"{Path(folder).name}/{split}")


def split_images(data: VQASet, val_fraction: float, seed: int = 0) -> Tuple[VQASet, VQASet]:
    """Hold out a random ``val_fraction`` of the images (with all their questions) for validation."""
    order = list(range(len(data.images)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(order) * val_fraction)))
    return (data.subset_images(sorted(order[n_val:]), data.name + ":train"),
            data.subset_images(sorted(order[:n_val]), data.name + ":val"))


def load_pixels(images: Sequence[str], transform: ImageTransform, progress: bool = True,
                desc: str = "images") -> Tuple[torch.Tensor, List[int], List[str]]:
    """Decode and transform every image once -> (M, 3, H, W) fp16 tensor, indices kept, errors of the rest."""
    tensors, kept, errors = [], [], []
    for i, path in enumerate(tqdm(images, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)):
        try:
            tensors.append(transform(load_image(path)).half())
            kept.append(i)
        except ImageError as exc:
            errors.append(str(exc))
    if not tensors:
        raise DataError(f"none of the {len(images)} images could be read" + (f": {errors[0]}" if errors else ""))
    return torch.stack(tensors), kept, errors


def build_answer_vocab(data: VQASet, max_answers: int = 1000, min_count: int = 1) -> List[str]:
    """Most frequent answers (by majority answer per question), at most ``max_answers``."""
    counts = Counter(a for q in data.questions for a in set(q.answers))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, c in ranked if c >= min_count][:max_answers]
