"""``vlfuse evaluate --task TASK --model M --data D --split S --out metrics.json``."""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from ..config import save_json
from ..errors import ConfigError
from ..evaluation import EvaluationRequest
from .caption import add_decode_arguments, decode_options
from .environment import runtime_options, wordnet_root

# task -> (module, default model); each module defines evaluate(args) -> metrics dict
TASK_MODULES = {"caption": ("vlfuse.evaluation.caption", "flickr8k-caption")}
TASK_MODULES["vqa"] = ("vlfuse.evaluation.vqa", "flickr8k-vqa")
TASK_MODULES["retrieval"] = ("vlfuse.evaluation.retrieval", "flickr8k-retrieval")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="score a model on a dataset split")
    p.add_argument("--task", default="caption", help=f"one of: {', '.join(TASK_MODULES)}")
    p.add_argument("--model", default=None, help="built-in model name or checkpoint directory (default: the task's built-in)")
    p.add_argument("--data", default="../shared/data/flickr8k", help="dataset directory or file")
    p.add_argument("--format", default="auto", help="dataset format (auto-detected by default)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=0, help="evaluate on the first N images only")
    p.add_argument("--out", default=None, help="write the metrics JSON here (also printed)")
    p.add_argument("--results", default=None, help="write generated outputs here (default: next to --out)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--lang", default=None, help="the captions' language: retrieval's queries and targets (en, zh; "
                                                 "default en); a caption model scores in its own language")
    add_decode_arguments(p)
    return p


def run(args) -> int:
    if args.task not in TASK_MODULES:
        raise ConfigError(f"--task must be one of {', '.join(TASK_MODULES)}, got '{args.task}'")
    module, default_model = TASK_MODULES[args.task]
    request = EvaluationRequest(model=args.model or default_model, data=args.data, split=args.split,
                                fmt=args.format, limit=args.limit, out=args.out, results=args.results,
                                batch_size=args.batch_size, device=args.device, runtime=runtime_options(),
                                decode=decode_options(args), wordnet=wordnet_root(), lang=args.lang)
    metrics = importlib.import_module(module).evaluate(request)
    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_json(metrics, args.out)
    return 0
