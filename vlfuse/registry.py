"""Name -> constructor registries, one per kind of part, shared by every task.

A part is registered with a decorator and built through :func:`Registry.build`,
which checks the keyword arguments against the constructor so that a config
with a misspelt key fails with a message naming that key.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, List

from .errors import ConfigError


class Registry:
    """A named collection of part constructors (classes or factory functions)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def decorator(obj: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            obj.registry_name = name
            return obj
        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown {self.kind} '{name}'. Registered: {', '.join(self.names())}.{hint}")
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        ctor = self.get(name)
        check_kwargs(ctor, kwargs, f"{self.kind} '{name}'")
        return ctor(**kwargs)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def describe(self) -> Dict[str, str]:
        """Name -> first docstring line, for ``vlfuse models``."""
        out = {}
        for name in self.names():
            doc = inspect.getdoc(self._entries[name]) or ""
            out[name] = doc.splitlines()[0] if doc else ""
        return out


def check_kwargs(ctor: Callable, kwargs: Dict[str, Any], what: str) -> None:
    """Raise ConfigError naming any keyword that ``ctor`` does not accept."""
    params = inspect.signature(ctor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{what} has no option '{key}'. Options: {', '.join(accepted)}.{hint}")


VISION_ENCODERS = Registry("vision encoder")
TEXT_ENCODERS = Registry("text encoder")
FUSIONS = Registry("fusion module")
DECODERS = Registry("decoder")
HEADS = Registry("task head")
SEGMENTERS = Registry("text segmenter")
CONCEPT_HEADS = Registry("concept head")

ALL_REGISTRIES = {
    "vision_encoders": VISION_ENCODERS,
    "text_encoders": TEXT_ENCODERS,
    "fusions": FUSIONS,
    "decoders": DECODERS,
    "heads": HEADS,
    "segmenters": SEGMENTERS,
    "concept_heads": CONCEPT_HEADS,
}
