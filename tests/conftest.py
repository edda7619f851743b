"""Shared fixtures: tiny models saved as real checkpoints, bad image files, Flickr8k samples."""
from __future__ import annotations

import atexit
import io
import os
import secrets
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

# Every Ray the tests start (tests/test_ray_batch.py, tests/test_serving_ray.py, and the commands they run) keeps to
# loopback (on Linux Ray otherwise replaces 127.0.0.1 by the machine's address; the variable's name
# notwithstanding) and asks for token authentication with a token file of the test session's own: left to Ray, a
# process connecting by address decided from the machine's shared Ray state, which other clusters on the machine
# change. Set here, before any test module is collected: Ray reads them when it is imported, and a module that
# imports ray at collection would otherwise fix them for the whole session.
_RAY_DIR = tempfile.mkdtemp(prefix="vlfuse-tests-ray-")
atexit.register(shutil.rmtree, _RAY_DIR, True)
(Path(_RAY_DIR) / "auth_token").write_text(secrets.token_hex(32))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(Path(_RAY_DIR) / "auth_token"))

REPO = Path(__file__).resolve().parents[1]
FLICKR = (REPO / ".." / "shared" / "data" / "flickr8k").resolve()


@pytest.fixture(autouse=True, scope="session")
def onnx_cache_in_tmp(tmp_path_factory):
    """Graphs exported for ONNX Runtime are cached in a temporary folder, not the user's ~/.cache: the library's
    default folder for models loaded in the tests, ``$VLFUSE_ONNX_CACHE`` for the commands they run (read by
    vlfuse.cli, also in child processes)."""
    from vlfuse.cli.environment import ONNX_CACHE_ENV
    from vlfuse.runtime import cache as graph_cache

    cache = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph_cache, "DEFAULT_CACHE_DIR", cache)  # read when a model's Runtime is made
        patch.setenv(ONNX_CACHE_ENV, str(cache))
        yield cache


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared,
    busy CPU two OpenMP threads spin and run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flickr_or_skip() -> Path:
    if not (FLICKR / "captions.txt").is_file():
        pytest.skip("Flickr8k is not present at ../shared/data/flickr8k")
    return FLICKR


def photo(path: Path, seed: int = 0, size=(96, 80)) -> Path:
    """A small real JPEG (smooth random colours, so it is a plausible photo for the encoder)."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).resize(size, Image.BILINEAR).save(path, quality=90)
    return path


def huge_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A tiny PNG file whose header declares ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def bad_images(folder: Path) -> dict:
    """Write the four kinds of bad input the CLI must survive; returns {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    buf = io.BytesIO()
    photo_arr = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo_arr).save(buf, format="JPEG", quality=90)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    text = folder / "notes.jpg"
    text.write_text("this is a text file, not a photo\n")
    huge = huge_png(folder / "huge.png")
    return {"empty": empty, "truncated": truncated, "text": text, "huge": huge}


def tiny_config(tmp: Path, cache_dir: Path, **train) -> dict:
    """A caption experiment small enough to train in seconds on real Flickr8k samples."""
    return {
        "task": "caption",
        "data": {"path": str(flickr_or_skip()), "train_limit": 24, "val_limit": 6, "min_count": 1,
                 "cache_dir": str(cache_dir)},
        "model": {"fusion": {"name": "cross-attention", "dim": 32, "num_layers": 1, "num_heads": 2},
                  "decoder": {"name": "transformer", "dim": 32, "num_heads": 2}, "max_len": 12},
        "train": {"epochs": 2, "batch_size": 16, "warmup_steps": 4, "lr": 3e-3, "out_dir": str(tmp / "run"),
                  "progress": False, "checkpoint_every": 0, "threads": 2, **train},
        "val_decode": {"strategy": "greedy", "max_len": 12},
    }


def write_config(path: Path, config: dict) -> Path:
    import json

    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One feature cache for every training test of the session (the CNN runs once per image)."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, feature_cache) -> Path:
    """A tiny caption model trained through ``vlfuse.cli.main.main`` on 24 real Flickr8k images."""
    from vlfuse.cli.main import main

    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = write_config(tmp / "tiny.json", tiny_config(tmp, feature_cache))
    assert main(["train", "--config", str(cfg)]) == 0
    return tmp / "run"
