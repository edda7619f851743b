"""``vlfuse tag IMAGE_OR_DIR ...``: the concepts each photo shows, with their probabilities; bad files are reported
one line each on stderr."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.images import list_images


def add_parser(sub) -> argparse.ArgumentParser:
    from ..nn.concepts import CONCEPT_THRESHOLD

    p = sub.add_parser("tag", help="tag photos with the concepts they show (ImageNet classes)",
                       description="Tag photos with the concepts the backbone's ImageNet classifier sees in them: "
                                   "per photo its most probable concepts (class name, caption word, probability) "
                                   f"that reach --threshold (default {CONCEPT_THRESHOLD}: a blank or noise image "
                                   "reaches none). Exit status 2 only if no photo could be tagged.")
    p.add_argument("paths", nargs="+", help="image files and/or folders")
    p.add_argument("--top", type=int, default=5, help="at most this many concepts per photo (default 5)")
    p.add_argument("--threshold", type=float, default=CONCEPT_THRESHOLD,
                   help=f"only concepts at least this probable (default {CONCEPT_THRESHOLD}; 0 = the --top most "
                        "probable whatever their probability)")
    p.add_argument("--model", default="efficientnet-lite0",
                   help="the backbone whose ImageNet classifier tags: efficientnet-lite0 (default), -lite1, -lite2")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: {image, concepts: [{index, name, word, probability}], threshold}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    p.add_argument("--no-onnx", action="store_true",
                   help="encode images with PyTorch (on a CPU the default is ONNX Runtime where it is installed)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (shown on a terminal for folders whose output goes to a file or a pipe)")
    return p


def format_tags(path: str, concepts, threshold: float) -> str:
    """A photo's text block: its path, then one line per concept (probability, name, caption word), or a line
    saying that none reaches ``threshold``."""
    if not concepts:
        return f"{path}\n  no concept at or above {threshold:.2f}"
    return "\n".join([path] + [f"  {c.probability:.3f}  {c.name} ({c.word})" for c in concepts])


def show_progress(args, paths) -> bool:
    """A progress bar for folders, on a terminal, when the results are not printed to that terminal too."""
    return (not args.no_progress and any(Path(p).is_dir() for p in args.paths) and len(paths) > 1
            and sys.stderr.isatty() and not sys.stdout.isatty())


def run(args) -> int:
    from ..errors import InputError
    from ..tasks.tagging.pipeline import Tagger, check_tag_options
    from .environment import runtime_options

    check_tag_options(args.top, args.threshold)  # before loading anything
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    paths = list_images(args.paths)
    if not paths:
        print("vlfuse tag: error: no image files found", file=sys.stderr)
        return 2
    tagger = Tagger.from_pretrained(args.model, device=args.device, runtime=runtime_options(no_onnx=args.no_onnx))
    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="tagging", unit="img", disable=not show_progress(args, paths),
               dynamic_ncols=True)
    failed = 0
    for path, concepts, error in tagger.tag_files(paths, args.top, args.threshold, batch_size=args.batch_size):
        bar.update(1)
        if error:
            failed += 1
            bar.write(f"vlfuse tag: error: {error}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"image": path, "concepts": [c.to_dict() for c in concepts],
                              "threshold": args.threshold}, ensure_ascii=False), flush=True)
        else:
            print(format_tags(path, concepts, args.threshold), flush=True)
    bar.close()
    return 2 if failed else 0  # as `vlfuse caption`: every file is tagged, and any that failed is reported
