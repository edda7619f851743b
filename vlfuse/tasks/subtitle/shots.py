"""Shots: where a video cuts, found by PySceneDetect's detectors on small frames, and the stretch of video between
two cuts (a ``Segment``: a shot, or a piece of a long one) with the keyframe the captioner describes.

PySceneDetect (PyPI ``scenedetect``) is used through its detector objects, fed the frames ``vlfuse.data.video``
decodes (its own video readers would decode the file a second time): ``ContentDetector`` (HSV difference of
consecutive frames against a threshold; the default) or ``AdaptiveDetector`` (that difference against its rolling
average), registered here by name.
"""
from __future__ import annotations

import array
import dataclasses
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ...data.video import Frame
from ...errors import ConfigError

# detector name -> factory(threshold or None, min_scene_len in frames) -> a PySceneDetect SceneDetector
SHOT_DETECTORS: Dict[str, Callable] = {}


def register_detector(name: str):
    def wrap(factory: Callable) -> Callable:
        SHOT_DETECTORS[name] = factory
        return factory
    return wrap


@register_detector("content")
def _content(threshold: Optional[float], min_frames: int):
    from scenedetect import ContentDetector

    return ContentDetector(min_scene_len=min_frames, **({} if threshold is None else {"threshold": threshold}))


@register_detector("adaptive")
def _adaptive(threshold: Optional[float], min_frames: int):
    from scenedetect import AdaptiveDetector

    return AdaptiveDetector(min_scene_len=min_frames,
                            **({} if threshold is None else {"adaptive_threshold": threshold}))


@dataclasses.dataclass(frozen=True)
class ShotOptions:
    """How shots are found and cut into cues' segments.

    ``detector``: a name in ``SHOT_DETECTORS`` ("content", "adaptive"); ``threshold``: its threshold (None = the
    detector's default: 27 for content, 3.0 for adaptive); ``min_shot_s``: no two cuts closer than this;
    ``analysis_width``: frames are scaled to this width (aspect kept) for detection; ``split_every_s``: a shot
    longer than this is cut into pieces of this length, each with its own keyframe and caption (None = never);
    ``sample_every_s``: keyframe candidates are kept this often (a segment's keyframe is the one nearest its
    middle; at most ``max_samples`` are kept, thinned as a long segment grows)."""

    detector: str = "content"
    threshold: Optional[float] = None
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
        if self.min_shot_s < 0 or self.analysis_width < 16 or self.sample_every_s <= 0 or self.max_samples < 1:
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


def segments(frames: Iterable[Frame], fps: float, keyframe_size: Tuple[int, int],
             options: ShotOptions = ShotOptions()) -> Iterator[Segment]:
    """Cut the stream of ``frames`` (analysis-size pixels, as ``VideoReader.frames(options.analysis_size(...))``
    gives) into segments, each with its keyframe at ``keyframe_size``; yields each as soon as it is closed, so
    only the current segment's few samples are held. ``fps`` (the average rate) turns ``min_shot_s`` into frames."""
    from scenedetect import FrameTimecode

    fps = float(fps) if fps > 0 else 25.0
    detector = SHOT_DETECTORS[options.detector](options.threshold, max(1, int(round(options.min_shot_s * fps))))
    times = array.array("d")  # frame index -> time: PySceneDetect reports cuts by frame index (8 bytes a frame)
    samples = _Samples(options.sample_every_s, options.max_samples)
    start: Optional[float] = None
    cut = True
    last, step = 0.0, 1.0 / fps

    def close(at: float, next_is_cut: bool) -> Iterator[Segment]:
        nonlocal start, cut
        taken = samples.split(at)
        if not taken:  # no frame was sampled since ``start`` (a sliver): it stays part of the next segment
            return
        when, picture = _nearest_middle(taken, start, at)
        yield Segment(start, at, cut, picture, when)
        start, cut = at, next_is_cut

    for index, frame in enumerate(frames):
        times.append(frame.time)
        if start is None:
            start = frame.time
        if index:
            step = frame.time - last
        last = frame.time
        for found in detector.process_frame(FrameTimecode(index, fps=fps), frame.bgr):
            at = times[found.frame_num]
            if at > start:
                yield from close(at, True)
        if options.split_every_s is not None and frame.time - start >= options.split_every_s - 1e-6:
            yield from close(frame.time, False)
        samples.offer(frame, keyframe_size)
        frame.release()
    if start is None:
        return
    end = last + max(step, 0.0)
    for found in detector.post_process(FrameTimecode(len(times), fps=fps)):
        at = times[min(found.frame_num, len(times) - 1)]
        if at > start:
            yield from close(at, True)
    yield from close(end, False)
