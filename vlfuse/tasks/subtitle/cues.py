"""Cues: captioned segments turned into subtitles as conventions want them: consecutive segments with the same
caption merged, cues too short to read absorbed, none shown longer than a maximum, lines wrapped."""
from __future__ import annotations

import dataclasses
import textwrap
from typing import List, Sequence

from ...errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CueOptions:
    """``min_duration_s``: a cue shorter than this (a flash of a shot) is absorbed by the cue before it (the first
    by the one after); ``max_duration_s``: a cue is shown at most this long (it still starts at its shot's start;
    ``ShotOptions.split_every_s`` gives a long shot new cues instead); ``max_line_chars``: lines are wrapped at
    this many characters (42: the common broadcast limit)."""

    min_duration_s: float = 1.0
    max_duration_s: float = 7.0
    max_line_chars: int = 42

    def __post_init__(self):
        if not 0 <= self.min_duration_s <= self.max_duration_s or self.max_line_chars < 10:
            raise ConfigError(f"invalid cue options: {self} (need 0 <= min_duration_s <= max_duration_s and "
                              f"max_line_chars >= 10)")


@dataclasses.dataclass
class Cue:
    """A subtitle: shown from ``start`` to ``end`` (s), ``text`` as the caption model wrote it, ``lines`` as shown."""

    start: float
    end: float
    text: str
    lines: List[str]


@dataclasses.dataclass
class Captioned:
    """A segment's time span and its caption (what cues are built from)."""

    start: float
    end: float
    caption: str


def build_cues(segments: Sequence[Captioned], options: CueOptions = CueOptions()) -> List[Cue]:
    """Cues for captioned, consecutive ``segments``, in order."""
    spans: List[Captioned] = []
    for seg in segments:  # the same caption twice in a row: one cue over both
        if spans and spans[-1].caption == seg.caption:
            spans[-1] = dataclasses.replace(spans[-1], end=seg.end)
        else:
            spans.append(dataclasses.replace(seg))
    spans = _absorb_short(spans, options.min_duration_s)
    return [Cue(s.start, min(s.end, s.start + options.max_duration_s), s.caption,
                display_lines(s.caption, options.max_line_chars)) for s in spans]


def _absorb_short(spans: List[Captioned], min_duration: float) -> List[Captioned]:
    kept: List[Captioned] = []
    for span in spans:
        if kept and (span.end - span.start < min_duration or kept[-1].caption == span.caption):
            kept[-1] = dataclasses.replace(kept[-1], end=span.end)
        elif kept and kept[-1].end - kept[-1].start < min_duration:  # the first span was short: the next takes it
            kept[-1] = dataclasses.replace(span, start=kept[-1].start)
        else:
            kept.append(span)
    return kept


def display_lines(caption: str, max_chars: int) -> List[str]:
    """``caption`` as subtitle lines: sentence case, wrapped at ``max_chars`` (words are never split)."""
    text = caption.strip()
    text = text[:1].upper() + text[1:]
    return textwrap.wrap(text, max_chars, break_long_words=False, break_on_hyphens=False) or [""]
