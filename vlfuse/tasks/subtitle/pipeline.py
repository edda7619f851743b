"""The user-facing ``Subtitler``: subtitles that say what a video shows, shot by shot, written by a ``Captioner``.

There is no subtitle network: a video is decoded as a stream of small frames (``vlfuse.data.video``), cut into
shots by PySceneDetect's detector (``shots.py``), each shot's middle keyframe captioned by the caption model in
batches, and the captions turned into cues (``cues.py``) and files (``formats.py``: SRT, WebVTT, JSON). Like the
Tagger it is not a ``Pipeline``: ``from_pretrained`` takes a caption model (by default the language's built-in
one) and there is nothing to save.

>>> subtitler = Subtitler.from_pretrained()                 # English: flickr8k-caption
>>> subs = subtitler("clip.mp4")                            # Subtitles: .cues, .shots, .duration, .warnings
>>> subs.write("srt")                                       # the SRT text; "vtt", "json" likewise
"""
from __future__ import annotations

import dataclasses
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Dict, List, Optional, Tuple

from ...data.languages import LANGUAGES
from ...data.video import VideoInfo, VideoInput, VideoLimits, VideoReader
from ...errors import ConfigError, ModelNotFoundError
from ...runtime import RuntimeOptions
from ..caption.pipeline import Captioner
from ..caption.rerank import CaptionDecodeConfig
from .cues import Captioned, Cue, CueOptions, build_cues
from .formats import FORMATS
from .shots import Segment, ShotOptions, segments

DEFAULT_LANGUAGE = "en"


def caption_model_for(lang: str) -> str:
    """The built-in caption model that writes ``lang`` (``Captioner.default_models``), or ModelNotFoundError saying
    none is installed."""
    try:
        return Captioner.default_model_for(lang)
    except ConfigError as exc:
        written = ", ".join(f"{LANGUAGES[k].name} ({k})" for k in Captioner.default_models)
        raise ModelNotFoundError(f"{exc}: the built-in caption models write {written}; give a caption checkpoint "
                                 "in that language as the model, or choose another language") from None


@dataclasses.dataclass(frozen=True)
class SubtitleOptions:
    """Everything that shapes a video's subtitles besides the caption model: shot finding, cue conventions, what
    videos are accepted, and how many keyframes are captioned at once (which never changes a caption)."""

    shots: ShotOptions = ShotOptions()
    cues: CueOptions = CueOptions()
    limits: VideoLimits = VideoLimits()
    batch_size: int = 16


@dataclasses.dataclass
class ShotCaption:
    """A captioned segment: a shot (``cut``) or a piece of a long one, and the time of the keyframe described."""

    start: float
    end: float
    cut: bool
    keyframe_time: float
    caption: str


@dataclasses.dataclass
class Progress:
    """How far a video has been read: seconds of video, frames decoded, and the video's duration (0: unknown)."""

    time: float
    frames: int
    duration: float


@dataclasses.dataclass
class Subtitles:
    """A video's subtitles: its ``cues``, the captioned ``shots`` they came from, and ``warnings`` (a file that
    stopped decoding early, for one)."""

    video: VideoInfo
    language: str
    model: str
    shots: List[ShotCaption]
    cues: List[Cue]
    warnings: List[str]

    @property
    def duration(self) -> float:
        """Seconds of video read: the end of the last shot (the header's duration where nothing decoded)."""
        return self.shots[-1].end if self.shots else self.video.duration

    def write(self, format: str) -> str:
        """The subtitles as a file's text in ``format`` ("srt", "vtt" or "json")."""
        if format not in FORMATS:
            raise ConfigError(f"unknown subtitle format {format!r}; known: {', '.join(FORMATS)}")
        return FORMATS[format].write(self)

    def to_dict(self) -> dict:
        r3 = lambda x: round(x, 3)  # noqa: E731 (milliseconds, as the subtitle formats keep)
        v = self.video
        return {"video": {"path": v.path, "duration": r3(v.duration), "fps": r3(v.fps), "width": v.width,
                          "height": v.height, "rotation": v.rotation, "codec": v.codec,
                          "variable_frame_rate": v.variable_frame_rate},
                "duration": r3(self.duration), "language": self.language, "model": self.model,
                "shots": [{"start": r3(s.start), "end": r3(s.end), "cut": s.cut, "keyframe": r3(s.keyframe_time),
                           "caption": s.caption} for s in self.shots],
                "cues": [{"start": r3(c.start), "end": r3(c.end), "text": c.text, "lines": c.lines}
                         for c in self.cues],
                "warnings": list(self.warnings)}


def default_decode(captioner: Captioner) -> CaptionDecodeConfig:
    """The caption model's own decoding, except that its reranking (flickr8k-caption's default) becomes greedy
    decoding, as in the service: reranking costs ~4x the time per keyframe (a 2-minute clip: ~8 s instead of ~2)
    and ~130 MB; ask for it with ``strategy="rerank"``."""
    decode = captioner.decode_defaults
    return decode.override(strategy="greedy") if decode.strategy == "rerank" else decode


class Subtitler:
    """Write subtitles for videos with a ``Captioner``: one caption per shot (or per ``split_every_s`` of a long
    shot), decoded as ``decode`` says (default: ``default_decode``). A video's subtitles depend only
    on the video, the model and the options: keyframes are captioned by the captioner, whose captions never depend
    on the batch."""

    def __init__(self, captioner: Captioner, language: str = DEFAULT_LANGUAGE,
                 options: SubtitleOptions = SubtitleOptions(), decode: Optional[CaptionDecodeConfig] = None,
                 model_name: str = ""):
        if captioner.lang != language:
            raise ConfigError(f"the caption model writes {LANGUAGES[captioner.lang].name} ({captioner.lang}), not "
                              f"{LANGUAGES[language].name if language in LANGUAGES else language} ({language})")
        self.captioner, self.language, self.options, self.model_name = captioner, language, options, model_name
        self.decode = decode or default_decode(captioner)

    @classmethod
    def from_pretrained(cls, model: Optional[str] = None, lang: str = DEFAULT_LANGUAGE, device: Optional[str] = None,
                        runtime: RuntimeOptions = RuntimeOptions(), options: SubtitleOptions = SubtitleOptions(),
                        **decode_options) -> "Subtitler":
        """A subtitler over caption model ``model`` (a built-in name or checkpoint directory; None: the built-in
        model of ``lang``, ModelNotFoundError where there is none). ``decode_options`` override ``default_decode``
        (``beam=``, ``strategy=``, or any other CaptionDecodeConfig field)."""
        name = model or caption_model_for(lang)
        captioner = Captioner.from_pretrained(name, device=device, runtime=runtime)
        decode = default_decode(captioner).override(**decode_options)
        return cls(captioner, lang, options, decode, model_name=str(name))

    @property
    def keyframe_size(self) -> Tuple[int, int]:
        """(width, height) keyframes are scaled to: the caption model's input (its transform then keeps them)."""
        size = self.captioner.model.vision.transform.size
        return size, size

    # batches of keyframes captioned while the next ones are decoded: at most this many wait (bounded memory)
    max_waiting_batches = 2

    def __call__(self, path: VideoInput, on_progress: Optional[Callable[[Progress], None]] = None) -> Subtitles:
        """Subtitles for the video at ``path``. Raises VideoError for a file that is not a usable video;
        ``on_progress`` is called as frames are read (about 4 times a second of video).

        Keyframes are captioned in a worker thread while the main one decodes on (PyAV, ONNX Runtime and torch
        release the GIL), and the caption model's fast copies (``runtime.build``: ~1-3 s on first use) are built
        there first, during the first seconds of decoding, where a core is free for it."""
        opts = self.options
        reader = VideoReader(path, opts.limits)
        info = reader.info
        frames = reader.frames(opts.shots.analysis_size(info.width, info.height))
        if on_progress is not None:
            frames = _reporting(frames, on_progress, info.duration)
        shots: List[ShotCaption] = []
        with ThreadPoolExecutor(1, thread_name_prefix="vlfuse-subtitle") as worker:
            worker.submit(self.captioner.runtime.build)  # the first job: captions wait for it (one worker)
            waiting: Deque[Future] = deque()
            batch: List[Segment] = []
            for segment in segments(frames, info.fps, self.keyframe_size, opts.shots):
                batch.append(segment)
                if len(batch) == opts.batch_size:
                    waiting.append(worker.submit(self._caption, batch))
                    batch = []
                    while len(waiting) > self.max_waiting_batches:
                        shots += waiting.popleft().result()
            waiting.append(worker.submit(self._caption, batch))
            while waiting:
                shots += waiting.popleft().result()
        cues = build_cues([Captioned(s.start, s.end, s.caption) for s in shots], opts.cues)
        return Subtitles(info, self.language, self.model_name, shots, cues, list(reader.warnings))

    def _caption(self, batch: List[Segment]) -> List[ShotCaption]:
        """Caption the keyframes of ``batch`` at once."""
        if not batch:
            return []
        pixels = self.captioner.preprocess([s.keyframe for s in batch])
        results = self.captioner.caption_pixels(pixels, self.decode)
        return [ShotCaption(s.start, s.end, s.cut, s.keyframe_time, r.caption) for s, r in zip(batch, results)]


def _reporting(frames, on_progress: Callable[[Progress], None], duration: float, every_s: float = 0.25):
    """``frames`` passed through, calling ``on_progress`` every ``every_s`` of video and at the end."""
    count, next_report, time = 0, 0.0, 0.0
    for frame in frames:
        count, time = count + 1, frame.time
        if time >= next_report:
            on_progress(Progress(time, count, duration))
            next_report = time + every_s
        yield frame
    on_progress(Progress(time, count, duration))
