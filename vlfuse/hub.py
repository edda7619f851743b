"""Resolve a model name or directory to a checkpoint directory. Built-in models ship inside the package."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from .errors import ModelNotFoundError

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def builtin_models() -> Dict[str, Path]:
    """Name -> directory of every model shipped with vlfuse."""
    if not PRETRAINED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(PRETRAINED_DIR.iterdir()) if (p / "config.json").is_file()}


def resolve_model(name_or_path: str | Path) -> Path:
    """A built-in model name (e.g. 'flickr8k-caption') or a checkpoint directory -> its directory."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    builtin = builtin_models()
    if str(name_or_path) in builtin:
        return builtin[str(name_or_path)]
    if path.exists():
        raise ModelNotFoundError(f"'{name_or_path}' is not a vlfuse checkpoint directory (no config.json inside)")
    names = ", ".join(builtin) or "none installed"
    raise ModelNotFoundError(f"unknown model '{name_or_path}': not a directory and not a built-in model ({names})")
