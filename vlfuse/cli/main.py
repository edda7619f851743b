"""``vlfuse`` command line. Each subcommand lives in its own module with ``add_parser`` and ``run``."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from ..errors import VlfuseError

# subcommand name -> module (relative to vlfuse.cli); each module defines add_parser(sub) and run(args) -> int
COMMANDS = {
    "caption": "caption",
    "tag": "tag",
    "subtitle": "subtitle",
    "train": "train",
    "evaluate": "evaluate",
    "models": "models",
    "serve": "serve",
    "vqa": "vqa",
    "index": "index",
    "search": "search",
    "memory": "memory",
    "concepts": "concepts",
    "data": "data",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlfuse", description="Vision-language fusion: caption, answer, tag, search.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"vlfuse.cli.{module}")
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    threads = os.environ.get("VLFUSE_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    try:
        status = int(args._run(args) or 0)
        sys.stdout.flush()  # here, so that a reader gone before the last write is handled below too
        return status
    except VlfuseError as exc:
        print(f"vlfuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlfuse {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`vlfuse models | head`): stop quietly, as Unix tools do; stdout
        # is pointed at /dev/null so that Python's own flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe


if __name__ == "__main__":
    sys.exit(main())
