"""Typed dataclass configs: strict loading from YAML/JSON, recipes that inherit (``base:``), dotted CLI
overrides, saving.

Unknown keys are errors that name the key (and suggest the closest valid one),
so a typo in a config never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Type, TypeVar

from .errors import ConfigError
from .io import atomic_write

T = TypeVar("T")


@dataclasses.dataclass
class Part:
    """A registered part: its registry ``name`` plus constructor keyword arguments.

    Written flat in config files: ``{"name": "cross-attention", "num_layers": 3}``.
    """

    name: str
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> "Part":
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, dict) or "name" not in data:
            raise ConfigError(f"config key '{path}' must be a part name or a mapping with a 'name' key, got {data!r}")
        rest = {k: v for k, v in data.items() if k != "name"}
        return cls(name=str(data["name"]), kwargs=rest)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, **self.kwargs}


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


# Options removed in the structure clean-up (issue 19; git history has them), each with the value it had by
# default. Checkpoints' config.json and resolved configs written before still list them: at that value an option
# asked for what vlfuse now always does, so loading drops it; any other value asked for something that no longer
# exists, and is a ConfigError naming the option.
REMOVED_OPTIONS: Dict[str, Any] = {
    "TrainConfig.grad_clip": 1.0,
    "SCSTConfig.hflip": 0.0,
    "SCSTConfig.ema_decay": 0.0,
    "SCSTConfig.bleu_reward_weight": 0.0,
    "SCSTConfig.loss_average": "sequence",
    "SCSTConfig.sample_dropout": False,
    "CaptionDataConfig.captions_file": "",
    "CaptionDataConfig.hflip": 0.0,
    "CaptionModelConfig.gen_weight": 1.0,
    "CaptionModelConfig.align_weight": 0.0,
    "CaptionModelConfig.align_dim": 256,
    "RetrievalDataConfig.captions_file": "",
    "RetrievalDataConfig.hflip": 0.0,
    "RetrievalModelConfig.init_temperature": 0.07,
    "RetrievalModelConfig.hard_negative_weight": 0.0,
    "RetrievalModelConfig.hard_negative_margin": 0.2,
    "RetrievalModelConfig.mirror_average": False,
    "VQADataConfig.min_count": 1,
    "VQADataConfig.flip": False,
    "VQAModelConfig.question_input": "pooled",
}
# Removed options whose job another option of the same section does now (named in the error).
REPLACED_OPTIONS: Dict[str, str] = {
    "CaptionDataConfig.hflip": "mirror",
    "RetrievalDataConfig.hflip": "mirror",
    "VQADataConfig.flip": "mirror",
}


def _without_removed_options(cls: type, data: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``data`` without the removed options of ``cls`` that hold their old default (see REMOVED_OPTIONS)."""
    kept = {}
    for key, value in data.items():
        removed = f"{cls.__name__}.{key}"
        if removed not in REMOVED_OPTIONS:
            kept[key] = value
        elif value != REMOVED_OPTIONS[removed]:
            full = f"{path}.{key}" if path else key
            instead = REPLACED_OPTIONS.get(removed)
            hint = f" Use '{(path + '.' if path else '') + instead}' instead." if instead else ""
            raise ConfigError(f"config key '{full}' was removed; it is accepted only at its old default "
                              f"{REMOVED_OPTIONS[removed]!r} (what vlfuse now always does), got {value!r}.{hint}")
    return kept


def from_dict(cls: Type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys by name (removed options are
    accepted at their old default only, see REMOVED_OPTIONS)."""
    if cls is Part:
        return Part.from_dict(data, path)  # type: ignore[return-value]
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{path or '<root>'}' must be a mapping, got {type(data).__name__}")
    data = _without_removed_options(cls, data, path)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean '{(path + '.' if path else '') + close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'.{hint} Valid keys here: {', '.join(fields)}")
        kwargs[key] = _convert(hints[key], _over_default(fields[key], hints[key], value), full)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config section '{path or '<root>'}': {exc}") from exc


def _over_default(field: dataclasses.Field, tp: Any, value: Any) -> Any:
    """A partial mapping for a nested section fills in over that section's own default, so e.g. a retrieval
    experiment's ``train: {epochs: 2}`` keeps the experiment's ``select_metric: rsum``, not TrainConfig's."""
    tp = _strip_optional(tp)
    if (isinstance(value, dict) and tp is not Part and dataclasses.is_dataclass(tp)
            and field.default_factory is not dataclasses.MISSING):
        default = field.default_factory()
        if dataclasses.is_dataclass(default):
            return {**to_dict(default), **value}
    return value


def _convert(tp: Any, value: Any, path: str) -> Any:
    tp = _strip_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (list, List):
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}")
        return [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{path}' must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}")
        try:
            num = float(value)
            return int(num) if tp is int and num == int(num) else tp(num)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}") from None
    if tp is str and not isinstance(value, str):
        return str(value)
    return value


def to_dict(obj: Any) -> Any:
    """Plain JSON-able structure of a (nested) dataclass config."""
    if isinstance(obj, Part):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


BASE_KEY = "base"  # a recipe's ``base: other.yaml``: start from that recipe, then apply this file's settings


def read_config_file(path: str | Path) -> Dict[str, Any]:
    """Read a YAML or JSON config file into a mapping, resolving recipe inheritance.

    A file with ``base: other.yaml`` (a path relative to the file) starts from that file's settings, itself
    resolved the same way, and deep-merges its own sections over them (see :func:`merge_over`). A chain that
    comes back to a file it already passed is a ConfigError naming the chain. The result has no ``base`` key."""
    return _read_recipe(Path(path), ())


def _read_recipe(path: Path, chain: tuple) -> Dict[str, Any]:
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(here):], here))
        raise ConfigError(f"config file '{path}' inherits from itself through 'base': {cycle}")
    data = _parse_config_file(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file '{path}': '{BASE_KEY}' must be the path of another config file, got {base!r}")
    return merge_over(_read_recipe(path.parent / base, (*chain, here)), data)


def merge_over(base: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    """``settings`` over ``base`` (a new mapping): nested sections merge key by key, anything else replaces.
    A part (a mapping with a ``name``) that names another part replaces the base's part whole, since the
    base part's options need not apply to it."""
    merged = dict(base)
    for key, value in settings.items():
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("name", old.get("name")) == old.get("name"):
            merged[key] = merge_over(old, value)
        else:
            merged[key] = value
    return merged


def _parse_config_file(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml/json parse errors carry line numbers in str(exc)
        raise ConfigError(f"config file '{path}' could not be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must contain a mapping at the top level")
    return data


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, lists), else keep the string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except Exception:
        return text


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested mapping (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = parse_value(raw)
    return data


def save_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (``vlfuse.io.atomic_write``)."""
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
