"""The runtime's image encoders: the ONNX Runtime copy of a vision encoder gives PyTorch's features, its export is
cached by weights in the folder it is given (the library reads no environment variable), the policy falls back
clearly, and every pipeline encodes through its runtime."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import photo

from vlfuse.data.images import load_image
from vlfuse.errors import ConfigError
from vlfuse.nn.vision import build_vision_encoder
from vlfuse.runtime import GraphCache, Runtime, RuntimeOptions, accelerate_vision, backend
from vlfuse.runtime import cache as graph_cache
from vlfuse.runtime import onnx_vision, policy
from vlfuse.runtime.onnx_vision import OnnxImageEncoder, graph_key, graph_name
from vlfuse.tasks.caption.pipeline import Captioner


@pytest.fixture(scope="module")
def lite0():
    return build_vision_encoder("efficientnet-lite0", trainable_blocks=1).eval()


def _pixels(tmp_path, encoder, n):
    return torch.stack([encoder.transform(load_image(photo(tmp_path / f"{i}.jpg", seed=i, size=(160, 120))))
                        for i in range(n)])


def test_onnx_features_equal_pytorch_features_at_any_batch_size(lite0, tmp_path):
    fast = OnnxImageEncoder(lite0, GraphCache(tmp_path / "cache"), threads=1, chunk=2)
    pixels = _pixels(tmp_path, lite0, 3)
    with torch.no_grad():
        want = lite0(pixels)
    for batch in (pixels[:1], pixels):  # the graph's batch size is dynamic; 3 images run as chunks of 2 + 1
        got = fast(batch)
        assert got.grid.shape == want.grid[: len(batch)].shape == (len(batch), 49, 1280)
        torch.testing.assert_close(got.grid, want.grid[: len(batch)], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.pooled, want.pooled[: len(batch)], atol=1e-4, rtol=1e-4)


def test_graphs_go_to_the_folder_passed_in_never_one_named_by_the_environment(lite0, tmp_path, monkeypatch):
    """The library reads no environment variable: ``RuntimeOptions.cache_dir`` or else the default folder; the
    command line reads ``$VLFUSE_ONNX_CACHE`` and passes it."""
    from vlfuse.cli.environment import ONNX_CACHE_ENV, runtime_options

    monkeypatch.setenv(ONNX_CACHE_ENV, str(tmp_path / "from-env"))
    monkeypatch.setattr(graph_cache, "DEFAULT_CACHE_DIR", tmp_path / "default")
    assert GraphCache().folder == tmp_path / "default"
    chosen = Runtime(RuntimeOptions(cache_dir=tmp_path / "chosen"), vision=lite0)
    assert chosen.graphs_to_build() == ["image encoder"]
    chosen.build()
    assert [f.name for f in (tmp_path / "chosen").glob("*.onnx")] == [graph_name(lite0)]
    assert chosen.graphs_to_build() == [] and not (tmp_path / "from-env").exists()
    assert runtime_options().cache_dir == tmp_path / "from-env"
    assert runtime_options(no_onnx=True, float32=True) == RuntimeOptions(False, False, tmp_path / "from-env")
    assert GraphCache("~/graphs").folder.is_absolute()  # a folder under the home directory, as the default


def test_export_is_cached_by_weights(lite0, tmp_path, monkeypatch):
    cache = GraphCache(tmp_path / "cache")
    OnnxImageEncoder(lite0, cache, threads=1)
    assert [f.stem for f in cache.folder.glob("*.onnx")] == [graph_key(lite0)]

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the graph was cached")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    fast = OnnxImageEncoder(lite0, cache, threads=1)  # read from the cache
    assert fast(_pixels(tmp_path, lite0, 1)).grid.shape == (1, 49, 1280)

    changed = build_vision_encoder("efficientnet-lite0", trainable_blocks=1).eval()
    with torch.no_grad():
        changed.tail_layers[0]._project_conv.weight.mul_(1.5)  # tuned weights: another graph
    assert graph_key(changed) != graph_key(lite0)
    monkeypatch.undo()
    OnnxImageEncoder(changed, GraphCache(cache.folder, keep=1), threads=1)  # only the newest graph stays
    assert [f.stem for f in cache.folder.glob("*.onnx")] == [graph_key(changed)]


def test_encoders_of_one_graph_share_one_onnx_runtime_copy(lite0, tmp_path):
    """Pipelines whose encoders are the same graph (class, input size, weights; e.g. the tagger's backbone and the
    retriever's frozen CNN in one server) share one ONNX Runtime session, not one each; another cache folder or
    other weights get their own."""
    twin = build_vision_encoder("efficientnet-lite0", trainable_blocks=1).eval()
    first = Runtime(RuntimeOptions(cache_dir=tmp_path / "a"), vision=lite0).image_encoder
    assert Runtime(RuntimeOptions(cache_dir=tmp_path / "a"), vision=twin).image_encoder is first
    assert Runtime(RuntimeOptions(cache_dir=tmp_path / "b"), vision=twin).image_encoder is not first
    with torch.no_grad():
        twin.tail_layers[0]._project_conv.weight.mul_(1.5)
    assert Runtime(RuntimeOptions(cache_dir=tmp_path / "a"), vision=twin).image_encoder is not first


def test_fallback_to_pytorch_and_explicit_request_errors(lite0, tmp_path, monkeypatch, caplog):
    cache = GraphCache(tmp_path / "cache")
    monkeypatch.setattr(policy, "onnx_available", lambda: False)
    assert accelerate_vision(lite0, RuntimeOptions(), cache) is lite0  # default: PyTorch without ONNX Runtime
    with pytest.raises(ConfigError, match="pip install onnxruntime onnx"):
        accelerate_vision(lite0, RuntimeOptions(onnx=True), cache)
    assert accelerate_vision(lite0, RuntimeOptions(onnx=False), cache) is lite0
    assert backend(lite0, images=8) == "torch"

    monkeypatch.setattr(policy, "onnx_available", lambda: True)

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_vision, "export_onnx", broken)
    with caplog.at_level(logging.WARNING, logger="vlfuse.runtime.accelerate"):
        assert accelerate_vision(lite0, RuntimeOptions(), cache) is lite0
    assert "unsupported operator" in caplog.text
    with pytest.raises(ConfigError, match="unsupported operator"):
        accelerate_vision(lite0, RuntimeOptions(onnx=True), cache)
    with pytest.raises(ConfigError, match="on the CPU"):
        policy.uses_onnx(RuntimeOptions(onnx=True), torch.device("cuda"))
    assert not policy.uses_onnx(RuntimeOptions(), torch.device("cuda"))  # by default: PyTorch on a GPU


def test_shipped_captioner_encodes_with_onnx_runtime_by_default(tmp_path):
    fast = Captioner.from_pretrained("flickr8k-caption")
    plain = Captioner.from_pretrained("flickr8k-caption", onnx=False)
    assert (fast.runtime.backends()["image_encoder"], plain.runtime.backends()["image_encoder"]) == (
        "onnxruntime", "torch")
    pixels = fast.preprocess([photo(tmp_path / "a.jpg", size=(200, 150)), photo(tmp_path / "b.jpg", seed=1)])
    got, want = fast.encode(pixels), plain.encode(pixels)
    torch.testing.assert_close(got.grid, want.grid, atol=1e-4, rtol=1e-4)


def test_vqa_and_retrieval_encode_images_through_their_runtime(tmp_path):
    """Every pipeline gets its image encoder from the runtime: ONNX Runtime on a CPU by default, the same
    answers and (to ~1e-5) the same embeddings as PyTorch."""
    pytest.importorskip("easy_vqa")
    from vlfuse.tasks.retrieval.pipeline import Retriever
    from vlfuse.tasks.vqa.pipeline import QuestionAnswerer

    images = [photo(tmp_path / f"{i}.jpg", seed=i, size=(120, 90)) for i in range(3)]
    fast, plain = QuestionAnswerer.from_pretrained("easyvqa"), QuestionAnswerer.from_pretrained(
        "easyvqa", runtime=RuntimeOptions(onnx=False))
    assert (fast.runtime.backends(), plain.runtime.backends()) == ({"image_encoder": "onnxruntime"},
                                                                    {"image_encoder": "torch"})
    questions = ["what color is the shape?", "what shape is this?", "is there a circle?"]
    got, want = fast.predict(images, questions), plain.predict(images, questions)
    assert [a.answer for a in got] == [a.answer for a in want]
    assert all(abs(a.probability - b.probability) < 1e-4 for a, b in zip(got, want))

    pytest.importorskip("tokenizers")
    fast, plain = Retriever.from_pretrained("flickr8k-retrieval"), Retriever.from_pretrained(
        "flickr8k-retrieval", runtime=RuntimeOptions(onnx=False))
    assert (fast.runtime.backends(), plain.runtime.backends()) == ({"image_encoder": "onnxruntime"},
                                                                    {"image_encoder": "torch"})
    assert abs(fast.embed_images(images) - plain.embed_images(images)).max() < 1e-4


def test_unwritable_cache_still_runs(lite0, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    fast = OnnxImageEncoder(lite0, GraphCache(blocker / "onnx"), threads=1)  # cannot be created: exported in memory
    assert fast(_pixels(tmp_path, lite0, 1)).pooled.shape == (1, 1280)
    assert blocker.read_text().startswith("a file")
