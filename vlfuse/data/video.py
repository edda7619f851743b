"""The one video-reading path: PyAV (FFmpeg inside its wheel) decodes a file as a stream of small frames.

Frames are decoded one at a time and scaled down by FFmpeg's scaler straight to the size the caller analyses
(``VideoReader.frames(size)``), so memory stays bounded whatever the length or resolution of the video. Each
frame carries its presentation time, so a variable-frame-rate video is timed right; a rotated phone video is
turned upright as its display matrix says. A file that cannot be used raises one :class:`~vlfuse.errors.VideoError`
naming the file and the problem; a file that stops decoding part-way (truncated, corrupt) yields what decodes
and says so in ``VideoReader.warnings``.

>>> reader = VideoReader("clip.mp4")
>>> reader.info.duration, reader.info.fps           # read from the header, before any frame is decoded
>>> for frame in reader.frames((160, 90)): frame.time, frame.bgr.shape   # (seconds, (90, 160, 3) uint8)
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np

from ..errors import VideoError, VideoTooLongError

VideoInput = Union[str, os.PathLike]
# a truncated file whose header promised more: warn when decoding stops this much before the promised end
TRUNCATION_SLACK_S = 1.0


@dataclasses.dataclass(frozen=True)
class VideoLimits:
    """What a caller accepts. ``max_duration_s`` None = any length; ``max_pixels`` bounds one frame (width x
    height) before it is scaled down: the default takes 8K (7680 x 4320) and refuses larger."""

    max_duration_s: Optional[float] = None
    max_pixels: int = 7680 * 4320


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: duration (s, 0.0 where unknown), average frame rate, the frame size as shown
    (after rotation), the rotation applied (degrees counter-clockwise), the codec, and whether the frame rate
    varies (the stream's average rate differs from its base rate)."""

    path: str
    duration: float
    fps: float
    width: int
    height: int
    rotation: int
    codec: str
    variable_frame_rate: bool

    @property
    def frames(self) -> int:
        """About how many frames there are (duration x average rate)."""
        return int(round(self.duration * self.fps))


class Frame:
    """A decoded frame: its time (s from the start), its pixels scaled to the ``size`` given to ``frames`` (H, W, 3)
    in BGR order (OpenCV's and PySceneDetect's), upright, and ``picture(size)``: the same frame at another size, in
    RGB. Call ``picture`` while the frame is the current one (it reads the decoded frame, which is not kept)."""

    def __init__(self, time: float, bgr: np.ndarray, decoded, rotation: int, scaler):
        self.time, self.bgr = time, bgr
        self._decoded, self._rotation, self._scaler = decoded, rotation, scaler

    def picture(self, size: Tuple[int, int]) -> np.ndarray:
        """The frame scaled to ``size`` (width, height, as shown), upright -> (H, W, 3) uint8 RGB."""
        return upright(self._scaler, self._decoded, size, self._rotation, "rgb24")

    def release(self) -> None:
        """Drop the decoded frame (``picture`` is no longer possible), keeping the time and analysis pixels."""
        self._decoded = None


class VideoReader:
    """Open ``path`` (raises VideoError unless it holds a decodable video stream within ``limits``) and stream
    its frames with ``frames(size)``."""

    def __init__(self, path: VideoInput, limits: VideoLimits = VideoLimits()):
        self.path, self.limits = Path(path), limits
        self.warnings: List[str] = []
        self.info = self._probe()

    # -- opening ---------------------------------------------------------------------------------------
    def _open(self):
        import av

        name = str(self.path)
        if not self.path.exists():
            raise VideoError(f"{name}: file does not exist")
        if self.path.is_dir():
            raise VideoError(f"{name}: is a directory, not a video")
        if self.path.stat().st_size == 0:
            raise VideoError(f"{name}: file is empty (0 bytes)")
        try:
            with av.logging.Capture():  # FFmpeg's own log lines would reach the user's terminal
                return av.open(name, metadata_errors="ignore")
        except av.error.FFmpegError as exc:
            raise VideoError(f"{name}: {self._why_unreadable(exc)}") from None

    def _why_unreadable(self, exc: Exception) -> str:
        with open(self.path, "rb") as f:
            head = f.read(12)
        if head[4:8] == b"ftyp":  # an MP4/MOV whose index (the moov box, written last) is missing
            return ("MP4 file is truncated or corrupt: its index (moov box) is missing, so no frame can be found "
                    "(download or copy it again, or remux it with `ffmpeg -i IN -c copy -movflags faststart OUT`)")
        return f"not a video file PyAV/FFmpeg can read ({getattr(exc, 'strerror', None) or exc})"

    def _probe(self) -> VideoInfo:
        name = str(self.path)
        with self._open() as container:
            fmt = container.format.name
            if fmt == "image2" or fmt.endswith("_pipe"):  # FFmpeg reads a photo as a one-frame "video"
                raise VideoError(f"{name}: is a still image ({fmt.replace('_pipe', '').upper()}), not a video")
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no"]
                raise VideoError(f"{name}: has no video stream (it holds {', '.join(kinds)} streams only: "
                                 f"an audio file?)")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise VideoError(f"{name}: its video codec is not one the FFmpeg inside PyAV can decode; convert "
                                 f"it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`")
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height == 0:
                raise VideoError(f"{name}: its video stream has no frame size (empty or corrupt)")
            if width * height > self.limits.max_pixels:
                raise VideoTooLongError(f"{name}: frames are {width}x{height} = {width * height:,} pixels, over "
                                        f"the limit of {self.limits.max_pixels:,}; scale it down first")
            duration = self._duration(container, stream)
            if self.limits.max_duration_s is not None and duration > self.limits.max_duration_s:
                raise VideoTooLongError(f"{name}: is {duration:.1f} s long, over the limit of "
                                        f"{self.limits.max_duration_s:g} s; cut it first")
            rotation = self._rotation(container, stream)
            average = float(stream.average_rate or 0) or float(stream.guessed_rate or 0)
            base = float(stream.base_rate or 0)
            if rotation % 180:
                width, height = height, width
            return VideoInfo(name, duration, average, width, height, rotation, stream.codec_context.name,
                             variable_frame_rate=bool(base and average and abs(base - average) > 0.01 * base))

    @staticmethod
    def _duration(container, stream) -> float:
        if stream.duration is not None and stream.time_base:
            return float(stream.duration * stream.time_base)
        return container.duration / 1e6 if container.duration else 0.0

    def _rotation(self, container, stream) -> int:
        """Degrees counter-clockwise from the first frame's display matrix (0 where there is none)."""
        import av

        try:
            with av.logging.Capture():
                for frame in container.decode(stream):
                    return int(round(frame.rotation or 0)) % 360
        except av.error.FFmpegError:
            pass  # frames() reports a video that does not decode
        return 0

    # -- decoding --------------------------------------------------------------------------------------
    def frames(self, size: Optional[Tuple[int, int]] = None) -> Iterator[Frame]:
        """Every decoded frame in presentation order, scaled to ``size`` (width, height as shown; None = the
        video's own) and upright. Raises VideoError if not even one frame decodes; if decoding stops early,
        appends to ``warnings`` and stops."""
        import av
        from av.video.reformatter import VideoReformatter

        name, limits, info = str(self.path), self.limits, self.info
        count, last = 0, 0.0
        size, rotation = size or (info.width, info.height), info.rotation
        # a scaler per output size for the whole stream: each keeps its FFmpeg scaling context (~0.1 ms a frame at
        # 640x360; a context made anew per frame, as VideoFrame.to_ndarray(width=...) does, costs ~1 ms)
        scaler, picture_scaler = VideoReformatter(), VideoReformatter()
        with self._open() as container, av.logging.Capture():
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame threads: decoding is most of the work
            try:
                for frame in container.decode(stream):
                    if frame.time is None:
                        continue
                    last = float(frame.time)
                    if limits.max_duration_s is not None and last > limits.max_duration_s:
                        raise VideoTooLongError(f"{name}: runs past the limit of {limits.max_duration_s:g} s")
                    count += 1
                    yield Frame(last, upright(scaler, frame, size, rotation, "bgr24"), frame, rotation, picture_scaler)
            except av.error.FFmpegError as exc:
                if count == 0:
                    raise VideoError(f"{name}: no frame could be decoded ({exc.strerror or exc})") from None
                self.warnings.append(f"{name}: decoding stopped at {last:.2f} s ({exc.strerror or exc}): the file "
                                     f"is truncated or corrupt; subtitles cover what decoded")
                return
        if count == 0:
            raise VideoError(f"{name}: no frame could be decoded (empty or corrupt video stream)")
        if info.duration and last < info.duration - TRUNCATION_SLACK_S:
            self.warnings.append(f"{name}: frames end at {last:.2f} s but the file says {info.duration:.2f} s: it "
                                 f"is truncated or corrupt; subtitles cover what decoded")


def upright(scaler, frame, size: Tuple[int, int], rotation: int, pixel_format: str) -> np.ndarray:
    """A decoded PyAV frame scaled by ``scaler`` (a VideoReformatter) to ``size`` (width, height as shown, i.e.
    after ``rotation``) and turned upright -> (H, W, 3) uint8 in ``pixel_format`` ("rgb24" or "bgr24")."""
    turns = (rotation // 90) % 4
    width, height = size
    if turns % 2:  # scale the stored frame to the shown size's transpose, then turn it
        width, height = height, width
    pixels = scaler.reformat(frame, width=width, height=height, format=pixel_format, interpolation="AREA").to_ndarray()
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels


def read_info(path: VideoInput, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """A video's ``VideoInfo`` (raises VideoError as ``VideoReader`` does)."""
    return VideoReader(path, limits=limits).info
