"""Shots: where a video cuts, found by PySceneDetect detectors on small frames, and the stretch of video between
two cuts (a ``Segment``: a shot, or a piece of a long one) with the keyframe the captioner describes.

PySceneDetect (PyPI ``scenedetect``) detectors are fed the frames ``vlfuse.data.video`` decodes (its own video
readers would decode the file a second time), registered here by name:

- ``crossfade`` (the default): PySceneDetect's content score (ContentDetector's mean HSV difference) between each
  frame and the one ``crossfade_s`` before it, as a ``SceneDetector`` of its own (``CrossfadeDetector``). A hard cut
  and a cross-fade up to ``crossfade_s`` long both change that score fully; the cut is placed in the middle of the
  change. ``benchmarks/video_subtitles.py``: the same hard cuts as ``content``, and most 0.5 s cross-fades;
- ``content``: PySceneDetect's ``ContentDetector`` (consecutive frames): hard cuts only, a 0.5 s cross-fade changes
  each frame too little (it found 3 of 56);
- ``adaptive``: PySceneDetect's ``AdaptiveDetector`` (that score against its rolling average).
"""
from __future__ import annotations

import array
import bisect
import collections
import dataclasses
from typing import Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ...data.video import Frame
from ...errors import ConfigError

# detector name -> factory(options, fps) -> a PySceneDetect SceneDetector
SHOT_DETECTORS: Dict[str, Callable] = {}


def register_detector(name: str):
    def wrap(factory: Callable) -> Callable:
        SHOT_DETECTORS[name] = factory
        return factory
    return wrap


def _min_frames(options: "ShotOptions", fps: float) -> int:
    return max(1, int(round(options.min_shot_s * fps)))


@register_detector("crossfade")
def _crossfade(options: "ShotOptions", fps: float):
    return make_crossfade_detector(27.0 if options.threshold is None else options.threshold,
                                   gap=max(1, int(round(options.crossfade_s * fps))),
                                   min_scene_len=_min_frames(options, fps))


@register_detector("content")
def _content(options: "ShotOptions", fps: float):
    from scenedetect import ContentDetector

    threshold = {} if options.threshold is None else {"threshold": options.threshold}
    return ContentDetector(min_scene_len=_min_frames(options, fps), **threshold)


@register_detector("adaptive")
def _adaptive(options: "ShotOptions", fps: float):
    from scenedetect import AdaptiveDetector

    threshold = {} if options.threshold is None else {"adaptive_threshold": options.threshold}
    return AdaptiveDetector(min_scene_len=_min_frames(options, fps), **threshold)


def make_crossfade_detector(threshold: float, gap: int, min_scene_len: int):
    """A ``CrossfadeDetector`` (a PySceneDetect ``SceneDetector``; its base class is imported only here, on use)."""
    import cv2
    import numpy
    from scenedetect import FrameTimecode
    from scenedetect.detector import SceneDetector

    class CrossfadeDetector(SceneDetector):
        """ContentDetector's score -- the mean absolute difference of hue, saturation and value, averaged -- between
        each frame and the one ``gap`` frames before. After a hard cut at frame c the score stays high for frames c
        to c + gap - 1; during a cross-fade of up to ``gap`` frames it rises and falls around the fade's end. The
        cut is placed at the middle of a run of high scores less gap / 2: frame c for a hard cut, the fade's
        middle for a fade. A run shorter than gap / 2 (a flash, a camera bump) is no cut."""

        def __init__(self):
            super().__init__()
            self._history: Deque[numpy.ndarray] = collections.deque(maxlen=gap + 1)  # HSV of the last gap + 1
            self._run_start: Optional[int] = None
            self._last_cut: Optional[int] = None

        @property
        def event_buffer_length(self) -> int:
            return gap + gap // 2

        def process_frame(self, timecode, frame_img) -> list:
            self._history.append(cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV).astype(numpy.int16))
            index = timecode.frame_num
            if len(self._history) <= gap:
                return []
            score = float(numpy.abs(self._history[-1] - self._history[0]).mean())  # (dH + dS + dV) / 3
            if score >= threshold:
                if self._run_start is None:
                    self._run_start = index
                return []
            return self._close_run(index, timecode)

        def post_process(self, timecode) -> list:
            return self._close_run(timecode.frame_num, timecode)

        def _close_run(self, end: int, timecode) -> list:
            start, self._run_start = self._run_start, None
            if start is None or end - start < max(2, gap // 2):
                return []
            cut = max(0, (start + end) // 2 - gap // 2)
            if self._last_cut is not None and cut - self._last_cut < min_scene_len:
                return []
            self._last_cut = cut
            return [FrameTimecode(cut, fps=timecode.frame_rate)]

    return CrossfadeDetector()


@dataclasses.dataclass(frozen=True)
class ShotOptions:
    """How shots are found and cut into cues' segments.

    ``detector``: a name in ``SHOT_DETECTORS`` ("crossfade", "content", "adaptive"); ``threshold``: its threshold
    (None = the detector's default: 27 for crossfade and content, 3.0 for adaptive); ``crossfade_s``: how far back
    the crossfade detector compares (a fade up to this long is a cut); ``min_shot_s``: no two cuts closer than this;
    ``analysis_width``: frames are scaled to this width (aspect kept) for detection; ``split_every_s``: a shot
    longer than this is cut into pieces of this length, each with its own keyframe and caption (None = never);
    ``sample_every_s``: keyframe candidates are kept this often (a segment's keyframe is the one nearest its
    middle; at most ``max_samples`` are kept, thinned as a long segment grows)."""

    detector: str = "crossfade"
    threshold: Optional[float] = None
    crossfade_s: float = 0.5
    min_shot_s: float = 0.6
    analysis_width: int = 160
    split_every_s: Optional[float] = None
    sample_every_s: float = 0.25
    max_samples: int = 16

    def __post_init__(self):
        if self.detector not in SHOT_DETECTORS:
            raise ConfigError(f"unknown shot detector {self.detector!r}; known: {', '.join(SHOT_DETECTORS)}")
        if self.split_every_s is not None and self.split_every_s <= 0:
            raise ConfigError(f"split_every_s must be positive (or None: never), got {self.split_every_s}")
        if self.min_shot_s < 0 or self.crossfade_s <= 0 or self.analysis_width < 16 or self.sample_every_s <= 0 or self.max_samples < 1:
            raise ConfigError(f"invalid shot options: {self}")

    def analysis_size(self, width: int, height: int) -> Tuple[int, int]:
        """(width, height) of the frames the detector sees, for a video of ``width`` x ``height``; even sizes."""
        w = min(self.analysis_width, width)
        return max(2, w // 2 * 2), max(2, int(round(height * w / width / 2)) * 2)


@dataclasses.dataclass
class Segment:
    """A stretch of video from ``start`` to ``end`` (s) that gets one caption: a shot (``cut``: it begins at a cut or
    at the start of the video) or a piece of a long shot (``cut`` False); ``keyframe`` (H, W, 3) RGB at the
    caption model's size and its ``keyframe_time``."""

    start: float
    end: float
    cut: bool
    keyframe: np.ndarray
    keyframe_time: float


class _Samples:
    """Keyframe candidates of the segment being read: one every ``every`` s, at most ``limit`` (then every other
    one is dropped and the interval doubles, so a segment of any length keeps an even spread)."""

    def __init__(self, every: float, limit: int):
        self.base_every, self.limit = every, limit
        self.items: List[Tuple[float, np.ndarray]] = []
        self.every, self.next_time = every, 0.0

    def offer(self, frame: Frame, size: Tuple[int, int]) -> None:
        if frame.time + 1e-6 < self.next_time:
            return
        self.items.append((frame.time, frame.picture(size)))
        self.next_time = frame.time + self.every
        if len(self.items) > self.limit:
            self.items = self.items[::2]
            self.every *= 2

    def split(self, time: float) -> List[Tuple[float, np.ndarray]]:
        """Take the samples before ``time`` (the closed segment's), keep the rest for the next one."""
        before = [s for s in self.items if s[0] < time - 1e-6]
        self.items = self.items[len(before):]
        self.every = self.base_every
        return before


def _nearest_middle(samples: List[Tuple[float, np.ndarray]], start: float, end: float) -> Tuple[float, np.ndarray]:
    middle = (start + end) / 2
    return min(samples, key=lambda s: abs(s[0] - middle))


class _Segmenter:
    """The segment being read: where it started, whether at a cut, and its keyframe samples; and the segment closed
    last, held back until the next one closes. A cut closes the current segment at once; a long shot's pieces
    (``split_every_s``) are closed only once the detector can no longer report a cut before them (it reports cuts
    up to its ``event_buffer_length`` frames late). A sliver with no sampled frame (a cut just after a piece's end)
    is added to the held segment, so the timeline has no gap and the cut is kept."""

    def __init__(self, options: ShotOptions, start: float):
        self.options, self.start, self.cut = options, start, True
        self.samples = _Samples(options.sample_every_s, options.max_samples)
        self.times = array.array("d")  # frame index -> time (8 bytes a frame): cuts are reported by frame index
        self.held: Optional[Segment] = None

    def close(self, at: float, next_is_cut: bool) -> Iterator[Segment]:
        """End the current segment at ``at`` (the next one starts there); yields the segment held before it."""
        if at <= self.start:
            self.cut = self.cut or (next_is_cut and at == self.start)
            return
        taken = self.samples.split(at)
        if taken:
            when, picture = _nearest_middle(taken, self.start, at)
            if self.held is not None:
                yield self.held
            self.held = Segment(self.start, at, self.cut, picture, when)
        elif self.held is not None:  # a sliver: the held segment takes it
            self.held.end = at
        else:  # a sliver at the very start: it stays part of the next segment
            return
        self.start, self.cut = at, next_is_cut

    def pieces_before(self, limit: float) -> Iterator[Segment]:
        """Close pieces of ``split_every_s`` (each at the first frame at or after its length) that end before
        ``limit``."""
        every = self.options.split_every_s
        while every is not None:
            at_index = bisect.bisect_left(self.times, self.start + every - 1e-6)
            if at_index >= len(self.times) or self.times[at_index] >= limit:
                return
            start = self.start
            yield from self.close(self.times[at_index], False)
            if self.start == start:
                return

    def cut_at(self, at: float) -> Iterator[Segment]:
        yield from self.pieces_before(at)
        yield from self.close(at, True)

    def finish(self, end: float) -> Iterator[Segment]:
        yield from self.pieces_before(end)
        yield from self.close(end, False)
        if self.held is not None:
            yield self.held


def segments(frames: Iterable[Frame], fps: float, keyframe_size: Tuple[int, int],
             options: ShotOptions = ShotOptions()) -> Iterator[Segment]:
    """Cut the stream of ``frames`` (analysis-size pixels, as ``VideoReader.frames(options.analysis_size(...))``
    gives) into segments, each with its keyframe at ``keyframe_size``; yields each once the next one is closed, so
    only two segments' few samples are held. ``fps`` (the average rate) turns durations into frames."""
    from scenedetect import FrameTimecode

    fps = float(fps) if fps > 0 else 25.0
    detector = SHOT_DETECTORS[options.detector](options, fps)
    lag = (detector.event_buffer_length + 1) / fps  # how late a cut may be reported
    current: Optional[_Segmenter] = None
    last, step = 0.0, 1.0 / fps
    for index, frame in enumerate(frames):
        if current is None:
            current = _Segmenter(options, frame.time)
        elif frame.time > last:
            step = frame.time - last
        last = frame.time
        current.times.append(frame.time)
        for found in detector.process_frame(FrameTimecode(index, fps=fps), frame.bgr):
            yield from current.cut_at(current.times[found.frame_num])
        yield from current.pieces_before(frame.time - lag)
        current.samples.offer(frame, keyframe_size)
        frame.release()
    if current is None:
        return
    for found in detector.post_process(FrameTimecode(len(current.times), fps=fps)):
        yield from current.cut_at(current.times[min(found.frame_num, len(current.times) - 1)])
    yield from current.finish(last + step)
