"""``vlfuse data make-qa --data DIR --split S --out qa.jsonl``: make a VQA question set from a caption dataset
(COCO-QA's recipe; see ``vlfuse.data.questions``)."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="make datasets from datasets (questions from captions)",
                       description="Dataset tools.")
    tools = p.add_subparsers(dest="data_command", metavar="TOOL")
    tools.required = True
    qa = tools.add_parser("make-qa", help="VQA questions with one-word answers made from captions (COCO-QA style)",
                          description="Parse every caption of a split with spaCy and write questions of five types "
                                      "(object, number, color, location, yes/no) as VQA JSONL that `vlfuse train` "
                                      "and `vlfuse evaluate` read. Needs: " + 'pip install "vlfuse[qa]"')
    qa.add_argument("--data", required=True, help="caption dataset: a Flickr-layout folder (images/, captions.txt, "
                                                  "<split>.txt) or any layout `vlfuse train` reads")
    qa.add_argument("--split", required=True, help="the split to make questions for (train, val, test, ...)")
    qa.add_argument("--out", required=True, help="the JSONL file to write (image paths relative to its folder)")
    qa.add_argument("--format", default="auto", help="caption dataset format (default: detected)")
    qa.add_argument("--seed", type=int, default=0, help="seed of the yes/no negatives and the downsampling")
    qa.add_argument("--min-answer-count", type=int, default=None,
                    help="drop answers given fewer times than this among their type's questions (default: 5 per "
                         "30,000 captions of the split, at least 1)")
    qa.add_argument("--no-progress", action="store_true", help="no progress bar")
    qa.set_defaults(_data_run=run_make_qa)
    return p


def format_counts(result) -> str:
    """The per-type table printed after a run: questions, and what each filter dropped."""
    dropped = result.dropped
    rows = [("type", "questions", "mistagged", "tie", "rare", "capped")]
    for qtype, n in result.counts().items():
        rows.append((qtype, str(n)) + tuple(str(dropped.get(k, {}).get(qtype, 0)) for k in rows[0][2:]))
    rows.append(("total", str(len(result.items)), "", "", "", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


def run_make_qa(args) -> int:
    from ..data.captions import read_captions
    from ..data.questions import generate_questions, load_english, write_jsonl
    from ..errors import InputError

    if args.min_answer_count is not None and args.min_answer_count < 1:
        raise InputError(f"--min-answer-count must be at least 1, got {args.min_answer_count}")
    data = read_captions(args.data, split=args.split, fmt=args.format)
    nlp = load_english()
    result = generate_questions(data, nlp, seed=args.seed, min_answer_count=args.min_answer_count,
                                progress=not args.no_progress and sys.stderr.isatty())
    path = write_jsonl(result, args.out)
    print(f"{path}: {len(result.items)} questions about {len(data)} images ({data.name}); minimum answer count "
          f"{result.min_answer_count}; {result.skipped_captions} captions failed to parse")
    print(format_counts(result))
    return 0


def run(args) -> int:
    return args._data_run(args)
