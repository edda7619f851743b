"""Subtitles for video: what each shot shows, written by the caption model, as SRT, WebVTT or JSON."""
from .cues import Cue, CueOptions
from .formats import FORMATS
from .pipeline import Subtitler, SubtitleOptions, Subtitles
from .shots import ShotOptions

__all__ = ["Cue", "CueOptions", "FORMATS", "ShotOptions", "SubtitleOptions", "Subtitler", "Subtitles"]
