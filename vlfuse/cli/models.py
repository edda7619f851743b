"""``vlfuse models``: built-in models and every registered part."""
from __future__ import annotations

import argparse
import json

from ..hub import builtin_models
from ..models.checkpoint import read_config
from ..registry import ALL_REGISTRIES


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list built-in models and registered parts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args) -> int:
    import vlfuse.models  # noqa: F401  (registers parts)

    models = {name: read_config(path).get("task", "?") for name, path in builtin_models().items()}
    parts = {kind: reg.describe() for kind, reg in ALL_REGISTRIES.items()}
    if args.json:
        print(json.dumps({"models": models, "parts": parts}, indent=2))
        return 0
    print("Built-in models:")
    for name, task in models.items():
        print(f"  {name:24s} {task}")
    for kind, entries in parts.items():
        print(f"\n{kind.replace('_', ' ').capitalize()}:")
        for name, doc in entries.items():
            print(f"  {name:24s} {doc}")
    return 0
