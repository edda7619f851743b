"""Shared builders for the serving tests: a tiny real caption checkpoint, small images, and stand-ins for the
VQA and retrieval models with the same API (``predict`` / ``embed_texts`` / ``embed_images`` / ``search``)
whose answers follow from the pixels, so the tests can check real values end to end."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_tiny_captioner(directory: Path, lang: str = "en") -> Path:
    """A real (untrained, seeded) caption checkpoint small enough to load in a fraction of a second; ``lang='zh'``:
    a Chinese one (jieba words)."""
    import torch

    from vlfuse.config import Part
    from vlfuse.data.tokenizer import Tokenizer
    from vlfuse.tasks.caption.model import CaptionModel, CaptionModelConfig
    from vlfuse.tasks.caption.pipeline import Captioner

    torch.manual_seed(0)
    if lang == "zh":
        tok = Tokenizer.build(["一只狗在草地上奔跑", "红色的球", "两个人在沙滩上散步"], min_count=1, segmenter="jieba")
    else:
        tok = Tokenizer.build(["a dog runs on the grass", "a red ball", "two people walk on the beach"], min_count=1)
    config = CaptionModelConfig(vision=Part("small-cnn", {"image_size": 32, "channels": 16, "num_layers": 2}),
                                fusion=Part("cross-attention", {"dim": 32, "num_layers": 1, "num_heads": 2}),
                                decoder=Part("transformer", {"dim": 32, "num_heads": 2}), max_len=8)
    Captioner(CaptionModel(config, len(tok)), tok).save_pretrained(directory, half=False,
                                                                   **({"lang": lang} if lang != "en" else {}))
    return directory


def image_bytes(colour: str = "red", size: Tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb as seen by the decoder)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def nearest_colour(image: Image.Image) -> str:
    mean = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda c: float(((mean - np.asarray(COLOURS[c])) ** 2).sum()))


@dataclasses.dataclass
class Answer:  # the fields of vlfuse.tasks.vqa.pipeline.VQAAnswer
    answer: str
    probability: float
    top: List[Tuple[str, float]]
    sure: bool = True
    doubt: str = ""


class ColourVQA:
    """QuestionAnswerer's ``predict`` API; answers 'what colour' questions from the pixels. Records its batch sizes."""

    def __init__(self, delay_s: float = 0.0):
        self.batches: List[int] = []
        self.delay_s = delay_s
        self._lock = threading.Lock()

    @staticmethod
    def transform(image):
        return image  # the answers are read off the (PIL) pixels themselves

    def predict_pixels(self, images: Sequence, questions: Sequence[str], top_k: int = 3) -> List[Answer]:
        return self.predict(images, questions, top_k)

    def predict(self, images: Sequence, questions: Sequence[str], top_k: int = 3) -> List[Answer]:
        from vlfuse.errors import InputError

        with self._lock:
            self.batches.append(len(images))
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for im, q in zip(images, questions):
            if "boom" in q:
                raise InputError("question contains a forbidden word: boom")
            best = nearest_colour(im)
            rest = [c for c in COLOURS if c != best]
            top = [(best, 0.7)] + [(c, 0.1) for c in rest][: top_k - 1]
            if "colour" in q or "color" in q:
                out.append(Answer(best, 0.7, top))
            else:  # like a calibrated model asked what it was not trained for
                out.append(Answer(best, 0.7, top, sure=False, doubt="it only knows colour questions"))
        return out


@dataclasses.dataclass
class Hit:  # the fields of vlfuse.tasks.retrieval.index.SearchHit
    path: str
    score: float


def _colour_vector(rgb) -> np.ndarray:
    v = np.asarray(rgb, dtype=np.float32) / 255.0 - 0.4
    return v / np.linalg.norm(v)


class ColourRetriever:
    """Retriever's ``languages``/``embed_texts``/``embed_images`` API over a 3-d colour space; reads English only."""

    languages = ("en",)

    def embed_texts(self, texts: Sequence[str], lang=None) -> np.ndarray:
        assert lang in (None, "en")
        rows = []
        for t in texts:
            hit = next((c for c in COLOURS if c in t.lower()), "yellow")
            rows.append(_colour_vector(COLOURS[hit]))
        return np.stack(rows)

    def embed_images(self, images: Sequence) -> np.ndarray:
        return np.stack([_colour_vector(np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3).mean(0))
                         for im in images])


class ColourIndex:
    """ImageIndex's ``paths`` and ``search`` API over colour swatch files written to ``directory``."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = []
        for name in COLOURS:
            p = directory / f"{name}.png"
            if not p.exists():  # several processes (Ray Serve replicas) may build the same index
                p.write_bytes(image_bytes(name, (64, 48)))
            self.paths.append(str(p))
        self.vectors = np.stack([_colour_vector(COLOURS[n]) for n in COLOURS])

    def search(self, vectors: np.ndarray, k: int) -> List[List[Hit]]:
        scores = vectors @ self.vectors.T  # (B, N)
        order = np.argsort(-scores, axis=1)[:, :k]
        return [[Hit(self.paths[j], float(scores[i, j])) for j in row] for i, row in enumerate(order)]


def colour_service_models(caption_dir: Path, photos_dir: Path, tagger: bool = True):
    """ServiceModels over the tiny caption checkpoint in ``caption_dir``, the colour stand-ins (an index of
    swatches written to ``photos_dir``) and, with ``tagger``, the real EfficientNet-Lite0 tagger: every endpoint
    served. A loader each Ray Serve replica can call for itself."""
    from vlfuse.serving.models import ServiceModels
    from vlfuse.tasks.caption.pipeline import Captioner

    names = {"caption": "tiny-caption", "vqa": "colour-vqa", "retrieval": "colour-retrieval"}
    tag = None
    if tagger:
        from vlfuse.tasks.tagging import Tagger

        tag, names["tagging"] = Tagger.from_pretrained("efficientnet-lite0"), "efficientnet-lite0"
    return ServiceModels(Captioner.from_pretrained(caption_dir), ColourVQA(), ColourRetriever(),
                         ColourIndex(photos_dir), names, tagger=tag)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, port: int = 0):
    """``app`` under uvicorn on a free loopback port, in a thread of this process; yields its base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
