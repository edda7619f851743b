"""Count the options of vlfuse's config dataclasses: per class and in total.

    python scripts/config_fields.py

A config dataclass is ``vlfuse.config.Part`` or a dataclass whose name ends in ``Config``, ``Experiment`` or
``Settings`` (the typed trees that recipes, checkpoints' config.json and the service's settings are read into).
Result types (``CaptionResult``, ``SearchHit``, ...) and typed call arguments (``EvaluationRequest``) are not
options and are not counted.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import List, Tuple

import vlfuse

CONFIG_SUFFIXES = ("Config", "Experiment", "Settings")


def config_classes() -> List[type]:
    """Every config dataclass defined in the package, sorted by module and name."""
    found = {}
    for info in pkgutil.walk_packages(vlfuse.__path__, "vlfuse."):
        if info.name.endswith("__main__"):
            continue  # running it would start the command line
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
                    and (name == "Part" or name.endswith(CONFIG_SUFFIXES))):
                found[f"{obj.__module__}.{name}"] = obj
    return [found[k] for k in sorted(found)]


def field_counts() -> List[Tuple[str, int]]:
    """(qualified class name, number of fields) for every config dataclass."""
    return [(f"{c.__module__}.{c.__name__}", len(dataclasses.fields(c))) for c in config_classes()]


def main() -> int:
    counts = field_counts()
    width = max(len(name) for name, _ in counts)
    for name, n in counts:
        print(f"{name:<{width}}  {n:3d}")
    print(f"{'total: ' + str(len(counts)) + ' classes':<{width}}  {sum(n for _, n in counts):3d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
