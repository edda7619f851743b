"""The question sets made from captions (``vlfuse data make-qa``, COCO-QA's recipe; docs/vqa.md): per set the
number of images and questions per type, what each filter dropped, the answers per type and the most common
ones. Runs the generator exactly as the command does (default settings, seed 0) and writes the JSONL sets too.

    python benchmarks/qa_sets.py [--out-dir data/qa] -> benchmarks/results/qa_sets.json
    (sets: flickr8k train and val, coco_ood_dev val; written to OUT_DIR/<dataset>/<split>.jsonl)
"""
from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "data").resolve()
SETS = (("flickr8k", "train"), ("flickr8k", "val"), ("coco_ood_dev", "val"))


def describe(result, seconds: float) -> dict:
    from vlfuse.data.questions import QUESTION_TYPES

    answers = {t: Counter(it.answer for it in result.items if it.qtype == t) for t in QUESTION_TYPES}
    return {
        "images": len(result.images),
        "questions": len(result.items),
        "per_type": result.counts(),
        "min_answer_count": result.min_answer_count,
        "skipped_captions": result.skipped_captions,
        "dropped": {reason: {t: n for t, n in sorted(c.items())} for reason, c in result.dropped.items()},
        "distinct_answers": {t: len(c) for t, c in answers.items()},
        "top_answers": {t: c.most_common(10) for t, c in answers.items()},
        "seconds": round(seconds, 1),
    }


def main(argv=None) -> int:
    from vlfuse.config import save_json
    from vlfuse.data.captions import read_captions
    from vlfuse.data.questions import MAX_ANSWER_SHARE, generate_questions, load_english, write_jsonl

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="data/qa", help="where the JSONL sets go (<dataset>/<split>.jsonl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/qa_sets.json"))
    args = p.parse_args(argv)

    import spacy

    nlp = load_english()
    report = {"spacy": spacy.__version__, "pipeline": f"{nlp.meta['name']} {nlp.meta['version']}",
              "python": platform.python_version(), "seed": args.seed, "max_answer_share": MAX_ANSWER_SHARE,
              "sets": {}}
    for dataset, split in SETS:
        data = read_captions(SHARED / dataset, split=split)
        start = time.perf_counter()
        result = generate_questions(data, nlp, seed=args.seed)
        seconds = time.perf_counter() - start
        path = write_jsonl(result, Path(args.out_dir) / dataset / f"{split}.jsonl")
        report["sets"][f"{dataset}/{split}"] = dict(describe(result, seconds), file=str(path))
        print(f"{dataset}/{split}: {len(data)} images, {len(result.items)} questions {result.counts()}", flush=True)
    save_json(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
