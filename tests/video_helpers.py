"""Small videos made on the fly with PyAV for the video tests (none is committed): shots of solid colours with a
little texture, optionally rotated, at a variable frame rate, with a moov box first (faststart), audio only, or in
a codec nothing decodes."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

# far apart in hue, saturation and brightness: PySceneDetect's content score averages the three differences
SHOT_COLOURS = [(220, 30, 30), (20, 110, 20), (120, 180, 250), (230, 220, 30), (90, 90, 90)]


def shot_frames(seconds: Sequence[float], fps: float, size: Tuple[int, int], seed: int = 0) -> List[np.ndarray]:
    """RGB frames (H, W, 3): shot ``i`` lasts ``seconds[i]`` in colour ``SHOT_COLOURS[i]`` with a fixed texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    texture = rng.integers(-20, 20, (h, w, 1))
    frames = []
    for i, length in enumerate(seconds):
        colour = np.asarray(SHOT_COLOURS[i % len(SHOT_COLOURS)])
        picture = np.clip(colour + texture, 0, 255).astype(np.uint8)
        frames += [picture] * int(round(length * fps))
    return frames


def write_video(path: Path, frames: Sequence[np.ndarray], fps: int = 10, codec: str = "libx264",
                rotation: int = 0, times: Optional[Sequence[float]] = None, faststart: bool = False) -> Path:
    """Encode ``frames`` (RGB arrays) to ``path``; ``times`` (s) give each frame's own timestamp (a variable
    frame rate), ``rotation`` a display matrix (degrees counter-clockwise), ``faststart`` the index first."""
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream(codec, rate=fps, options={"preset": "ultrafast"} if codec == "libx264" else {})
        h, w = frames[0].shape[:2]
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if times is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = int(round(times[i] * 1000)) if times is not None else i
            if times is not None:
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_audio_only(path: Path, seconds: float = 0.5) -> Path:
    import av

    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        samples = np.zeros((1, int(8000 * seconds)), np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def with_unknown_codec(source: Path, target: Path) -> Path:
    """``source`` (an H.264 MP4) with its codec tag replaced by one no decoder knows."""
    data = source.read_bytes()
    assert data.count(b"avc1") >= 1
    target.write_bytes(data.replace(b"avc1", b"zzzz"))
    return target
