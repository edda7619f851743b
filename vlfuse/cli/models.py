"""``vlfuse models``: built-in models and every registered part."""
from __future__ import annotations

import argparse
import json

from ..checkpoint import read_config
from ..config import from_dict
from ..hub import builtin_models
from ..registry import ALL_REGISTRIES
from ..tasks.caption.rerank import CaptionDecodeConfig


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list built-in models and registered parts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args) -> int:
    import vlfuse.nn  # noqa: F401  (registers parts)

    configs = {name: read_config(path) for name, path in builtin_models().items()}
    models = {name: cfg.get("task", "?") for name, cfg in configs.items()}
    parts = {kind: reg.describe() for kind, reg in ALL_REGISTRIES.items()}
    if args.json:
        print(json.dumps({"models": models, "parts": parts}, indent=2))
        return 0
    print("Built-in models:")
    for name, task in models.items():
        if "lang" in configs[name]:  # a caption model's language
            task += f" in {configs[name]['lang']}"
        if "decode" in configs[name]:  # a caption model's own decoding default
            decode = from_dict(CaptionDecodeConfig, configs[name]["decode"], "decode")
            task += f"  (decodes: {decode.strategy}{f' {decode.width}' if decode.strategy == 'beam' else ''} by default)"
        print(f"  {name:24s} {task}")
    for kind, entries in parts.items():
        print(f"\n{kind.replace('_', ' ').capitalize()}:")
        for name, doc in entries.items():
            print(f"  {name:24s} {doc}")
    return 0
