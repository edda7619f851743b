"""The ONNX Runtime copy of a vision encoder: same features as PyTorch, cached export, clear fallbacks."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import photo

from vlfuse.data.images import load_image
from vlfuse.errors import ConfigError
from vlfuse.nn.vision import build_vision_encoder
from vlfuse.runtime import onnx_vision
from vlfuse.runtime.onnx_vision import (
    OnnxImageEncoder,
    fast_image_encoder,
    graph_key,
    graph_name,
)
from vlfuse.tasks.caption.pipeline import Captioner


@pytest.fixture(scope="module")
def lite0():
    return build_vision_encoder("efficientnet-lite0", trainable_blocks=1).eval()


def _pixels(tmp_path, encoder, n):
    return torch.stack([encoder.transform(load_image(photo(tmp_path / f"{i}.jpg", seed=i, size=(160, 120))))
                        for i in range(n)])


def test_onnx_features_equal_pytorch_features_at_any_batch_size(lite0, tmp_path):
    fast = OnnxImageEncoder(lite0, threads=1, cache_dir=tmp_path / "cache", chunk=2)
    pixels = _pixels(tmp_path, lite0, 3)
    with torch.no_grad():
        want = lite0(pixels)
    for batch in (pixels[:1], pixels):  # the graph's batch size is dynamic; 3 images run as chunks of 2 + 1
        got = fast(batch)
        assert got.grid.shape == want.grid[: len(batch)].shape == (len(batch), 49, 1280)
        torch.testing.assert_close(got.grid, want.grid[: len(batch)], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.pooled, want.pooled[: len(batch)], atol=1e-4, rtol=1e-4)


def test_the_default_cache_folder_is_read_when_a_graph_is_cached_not_at_import(lite0, tmp_path, monkeypatch):
    """VLFUSE_ONNX_CACHE set after vlfuse was imported still decides where the graphs go."""
    cache = tmp_path / "late"
    monkeypatch.setenv(onnx_vision.CACHE_ENV, str(cache))
    assert onnx_vision.default_cache_dir() == cache and not onnx_vision.is_cached(graph_name(lite0))
    OnnxImageEncoder(lite0, threads=1)
    assert [f.name for f in cache.glob("*.onnx")] == [graph_name(lite0)] and onnx_vision.is_cached(graph_name(lite0))


def test_export_is_cached_by_weights(lite0, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    OnnxImageEncoder(lite0, threads=1, cache_dir=cache)
    files = list(cache.glob("*.onnx"))
    assert [f.stem for f in files] == [graph_key(lite0)]

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the graph was cached")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    fast = OnnxImageEncoder(lite0, threads=1, cache_dir=cache)  # read from the cache
    assert fast(_pixels(tmp_path, lite0, 1)).grid.shape == (1, 49, 1280)

    changed = build_vision_encoder("efficientnet-lite0", trainable_blocks=1).eval()
    with torch.no_grad():
        changed.tail_layers[0]._project_conv.weight.mul_(1.5)  # tuned weights: another graph
    assert graph_key(changed) != graph_key(lite0)
    monkeypatch.undo()
    monkeypatch.setattr(onnx_vision, "CACHE_KEEP", 1)  # only the newest graph stays
    OnnxImageEncoder(changed, threads=1, cache_dir=cache)
    assert [f.stem for f in cache.glob("*.onnx")] == [graph_key(changed)]


def test_fallback_to_pytorch_and_explicit_request_errors(lite0, monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.setattr(onnx_vision, "onnx_available", lambda: False)
    assert fast_image_encoder(lite0, None, cpu) is lite0  # default: PyTorch where ONNX Runtime is missing
    with pytest.raises(ConfigError, match="pip install onnxruntime onnx"):
        fast_image_encoder(lite0, True, cpu)
    assert fast_image_encoder(lite0, False, cpu) is lite0

    monkeypatch.setattr(onnx_vision, "onnx_available", lambda: True)

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_vision, "cached_graph", broken)
    with caplog.at_level(logging.WARNING, logger="vlfuse.runtime.onnx_vision"):
        assert fast_image_encoder(lite0, None, cpu) is lite0
    assert "unsupported operator" in caplog.text
    with pytest.raises(ConfigError, match="unsupported operator"):
        fast_image_encoder(lite0, True, cpu)


def test_shipped_captioner_encodes_with_onnx_runtime_by_default(tmp_path):
    fast = Captioner.from_pretrained("flickr8k-caption")
    plain = Captioner.from_pretrained("flickr8k-caption", onnx=False)
    assert (fast.image_backend, plain.image_backend) == ("onnxruntime", "torch")
    pixels = fast.preprocess([photo(tmp_path / "a.jpg", size=(200, 150)), photo(tmp_path / "b.jpg", seed=1)])
    got, want = fast.encode(pixels), plain.encode(pixels)
    torch.testing.assert_close(got.grid, want.grid, atol=1e-4, rtol=1e-4)


def test_unwritable_cache_still_runs(lite0, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    fast = OnnxImageEncoder(lite0, threads=1, cache_dir=blocker / "onnx")  # cannot be created: exported in memory
    assert fast(_pixels(tmp_path, lite0, 1)).pooled.shape == (1, 1280)
    assert blocker.read_text().startswith("a file")
