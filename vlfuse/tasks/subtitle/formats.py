"""Subtitle files: SRT, WebVTT and JSON, registered by name in ``FORMATS``.

SRT and WebVTT are written here rather than with PyPI ``srt`` / ``webvtt-py``: each is a timestamp format and a
loop, and the tests parse what these write with those two libraries, so the output is checked by independent
readers without making them dependencies of the library.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Dict, Protocol, Sequence

from .cues import Cue


class Subtitled(Protocol):
    """What a writer reads (``pipeline.Subtitles`` is one): the cues, and everything as a JSON-ready dict."""

    cues: Sequence[Cue]

    def to_dict(self) -> dict: ...


@dataclasses.dataclass(frozen=True)
class SubtitleFormat:
    """A registered format: its name, file suffix, media type (HTTP) and writer."""

    name: str
    suffix: str
    media_type: str
    write: Callable[[Subtitled], str]


FORMATS: Dict[str, SubtitleFormat] = {}  # format name -> SubtitleFormat


def register_format(name: str, suffix: str, media_type: str):
    def wrap(write: Callable[[Subtitled], str]) -> Callable[[Subtitled], str]:
        FORMATS[name] = SubtitleFormat(name, suffix, media_type, write)
        return write
    return wrap


def timestamp(seconds: float, separator: str) -> str:
    """``seconds`` as HH:MM:SS<separator>mmm (rounded to the millisecond)."""
    ms = int(round(max(0.0, seconds) * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


@register_format("srt", ".srt", "application/x-subrip")
def to_srt(subs: Subtitled) -> str:
    """SubRip: cues numbered from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line after each."""
    blocks = [f"{i}\n{timestamp(c.start, ',')} --> {timestamp(c.end, ',')}\n" + "\n".join(c.lines) + "\n"
              for i, c in enumerate(subs.cues, 1)]
    return "\n".join(blocks)


@register_format("vtt", ".vtt", "text/vtt")
def to_vtt(subs: Subtitled) -> str:
    """WebVTT: the ``WEBVTT`` header, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``."""
    blocks = ["WEBVTT\n"] + [f"{i}\n{timestamp(c.start, '.')} --> {timestamp(c.end, '.')}\n" + "\n".join(
        _vtt_escape(line) for line in c.lines) + "\n" for i, c in enumerate(subs.cues, 1)]
    return "\n".join(blocks)


def _vtt_escape(line: str) -> str:
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("-->", "--&gt;")


@register_format("json", ".json", "application/json")
def to_json(subs: Subtitled) -> str:
    return json.dumps(subs.to_dict(), ensure_ascii=False, indent=1) + "\n"
