"""The decoding step in ONNX Runtime: the decoder's own step (the one TorchScript compiles), exported with dynamic
rows, images and past length; an int8 graph cached by weights; beam search over its stacked state; clear
fallbacks."""
from __future__ import annotations

import functools
import logging

import pytest
import torch
from conftest import flickr_or_skip

from vlfuse.config import Part
from vlfuse.errors import ConfigError
from vlfuse.generation import DecodeConfig, reorder_state
from vlfuse.runtime import GraphCache, backend
from vlfuse.runtime import onnx_step as onnx_decoder
from vlfuse.runtime.decoder import inference_decoder
from vlfuse.runtime.onnx_step import OnnxStepDecoder, onnx_step_decoder, step_key
from vlfuse.runtime.torchscript import ScriptedDecoder
from vlfuse.tasks.caption.model import CaptionModel, CaptionModelConfig
from vlfuse.tasks.caption.pipeline import Captioner


def _model(fusion_dim: int = 32, vocab: int = 40, decoder_layers: int = 1) -> CaptionModel:
    torch.manual_seed(0)
    cfg = CaptionModelConfig(vision=Part("small-cnn", {"image_size": 32, "channels": 16, "num_layers": 2}),
                             fusion=Part("cross-attention", {"dim": fusion_dim, "num_layers": 2, "num_heads": 4}),
                             decoder=Part("transformer", {"dim": 32, "num_heads": 4, "num_layers": decoder_layers}),
                             max_len=8)
    return CaptionModel(cfg, vocab_size=vocab).eval()


def _shipped_model() -> CaptionModel:
    return Captioner.from_pretrained("flickr8k-caption", int8=False, onnx=False).model


@pytest.mark.parametrize("which", ["tiny", "tiny-no-decoder-blocks", "shipped"])
def test_eager_torchscript_and_onnx_steps_agree(which, tmp_path, monkeypatch):
    """One step, three ways to run it: the eager ``TransformerDecoder.step`` of the trained (unfused) decoder, the
    same method compiled by TorchScript (float, fused q/k/v) and exported to ONNX (the float graph, driven through
    ``OnnxStepDecoder``'s stacked state) give the same log-probabilities and keys/values at every step, for 2
    images x 3 rows (beams share their image's keys/values): TorchScript's within 1e-6, ONNX Runtime's within
    1e-5 + 1e-6 x |value| (the shipped model's largest difference: 1.1e-5, at a log-probability near -20)."""
    model = {"tiny": _model, "tiny-no-decoder-blocks": functools.partial(_model, decoder_layers=0),
             "shipped": _shipped_model}[which]()
    scripted = inference_decoder(model.decoder, int8=False)
    assert isinstance(scripted, ScriptedDecoder)
    monkeypatch.setattr(onnx_decoder, "export_step", functools.partial(onnx_decoder.export_step, quantize=False))
    exported = OnnxStepDecoder(scripted, model.decoder, GraphCache(tmp_path), max_images=8)
    size = model.vision.transform.size
    vocab = model.decoder.out.out_features
    with torch.no_grad():
        image = model.vision(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
        rows = torch.arange(2).repeat_interleave(3)
        states = [reorder_state(d.init_state(image), rows, keep=d.per_image_state())
                  for d in (model.decoder, scripted, exported)]
        tokens = torch.full((6, 1), 1)
        for _ in range(5):
            (want, states[0]), (got, states[1]), (onnx, states[2]) = (
                d.step(tokens, s) for d, s in zip((model.decoder, scripted, exported), states))
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            # ONNX Runtime's kernels round differently: 1e-5, or a few float32 steps of log-probabilities near -20
            torch.testing.assert_close(onnx, want, atol=1e-5, rtol=1e-6)
            past = states[2][onnx_decoder.PAST]
            for i, (k, v) in enumerate(exported.past_names):
                torch.testing.assert_close(states[1][k], states[0][k], atol=1e-6, rtol=0)
                torch.testing.assert_close(past[:, i, 0], states[0][k], atol=1e-5, rtol=1e-6)
                torch.testing.assert_close(past[:, i, 1], states[0][v], atol=1e-5, rtol=1e-6)
            tokens = torch.cat([tokens, torch.randint(3, vocab, (6, 1))], 1)


def test_int8_step_decodes_greedy_and_beam_and_is_cached(tmp_path, monkeypatch):
    """The int8 graph decodes close to the TorchScript int8 step (both quantize the same weights per row),
    greedy and beam search run through it (beams reorder its stacked state), and a second decoder with the same
    weights reads the cached graph instead of exporting again."""
    model = _model()
    base = inference_decoder(model.decoder)
    fast = OnnxStepDecoder(base, model.decoder, GraphCache(tmp_path), max_images=8)
    assert [p.name for p in tmp_path.glob("*.onnx")] == [f"{step_key(model.decoder)}.step.onnx"]
    with torch.no_grad():
        image = model.vision(torch.randn(3, 3, 32, 32))
        s0, s1 = base.init_state(image), fast.init_state(image)
        assert s1[onnx_decoder.PAST].shape[:2] == (3, 3) and s1[onnx_decoder.MEMORY].shape[:3] == (3, 2, 2)
        tokens = torch.full((3, 1), 1)
        for _ in range(4):
            a, s0 = base.step(tokens, s0)
            b, s1 = fast.step(tokens, s1)
            assert (a - b).abs().max() < 0.1  # int8 rounding of activations differs slightly between runtimes
            tokens = torch.cat([tokens, a.argmax(-1, keepdim=True)], 1)
        for decode in (DecodeConfig(strategy="greedy"), DecodeConfig(strategy="beam", beam_size=3)):
            out = model.generate(image, decode, decoder=fast)
            assert len(out) == 3 and all(0 <= i < 40 for ids, _ in out for i in ids)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the graph was cached")

    monkeypatch.setattr(onnx_decoder, "export_step", no_export)
    OnnxStepDecoder(inference_decoder(model.decoder), model.decoder, GraphCache(tmp_path))

    threads = torch.get_num_threads()
    try:  # by default as measured: ONNX Runtime's one-thread step up to 8 images with one torch thread, up to 4
        torch.set_num_threads(1)  # with more (TorchScript's step uses them)
        one = OnnxStepDecoder(base, model.decoder, GraphCache(tmp_path))
        assert fast.runs_onnx(1) and one.runs_onnx(8) and not one.runs_onnx(9)
        torch.set_num_threads(2)
        default = OnnxStepDecoder(base, model.decoder, GraphCache(tmp_path))
        assert default.runs_onnx(4) and not default.runs_onnx(5)
        assert (backend(default, images=4), backend(default, images=5)) == ("onnxruntime", "torchscript")
    finally:
        torch.set_num_threads(threads)
    few = OnnxStepDecoder(base, model.decoder, GraphCache(tmp_path), max_images=2)  # 3 images: TorchScript's step
    with torch.no_grad():
        state = few.init_state(image)
        assert onnx_decoder.PAST not in state
        torch.testing.assert_close(few.step(torch.full((3, 1), 1), state)[0], base.step(torch.full((3, 1), 1),
                                                                                         base.init_state(image))[0])


def test_fallbacks_and_explicit_request_errors(monkeypatch, caplog, tmp_path):
    model, cache = _model(), GraphCache(tmp_path)
    base = inference_decoder(model.decoder)
    wide = _model(fusion_dim=48)  # fusion blocks wider than the decoder's: their keys/values do not stack
    assert onnx_step_decoder(inference_decoder(wide.decoder), wide.decoder, None, cache).__class__ is ScriptedDecoder
    eager = inference_decoder(model.decoder, script=False)
    assert onnx_step_decoder(eager, model.decoder, None, cache) is eager  # no TorchScript step to stand in for

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_decoder, "export_step", broken)
    with caplog.at_level(logging.WARNING, logger="vlfuse.runtime.onnx_step"):
        assert onnx_step_decoder(base, model.decoder, None, cache) is base
    assert "unsupported operator" in caplog.text
    with pytest.raises(ConfigError, match="unsupported operator"):
        onnx_step_decoder(base, model.decoder, True, cache)


def test_shipped_captioner_decodes_with_onnx_runtime_by_default():
    """The shipped model: ONNX Runtime runs the int8 step by default (TorchScript with onnx=False, float
    TorchScript with int8=False), and its greedy captions of real val photos are those of the TorchScript int8
    step but for the odd word."""
    data = flickr_or_skip()
    fast = Captioner.from_pretrained("flickr8k-caption")
    plain = Captioner.from_pretrained("flickr8k-caption", onnx=False)
    backends = [c.runtime.backends()["decoding_step"] for c in (fast, plain)]
    assert backends == ["onnxruntime", "torchscript"]
    # the int8 copy decodes an image at a time, so a batch of 32 runs ONNX Runtime's step too
    assert fast.runtime.backends(32)["decoding_step"] == "onnxruntime"
    assert Captioner.from_pretrained("flickr8k-caption", int8=False).runtime.backends()["decoding_step"] == "torchscript"
    photos = [data / "images" / name for name in (data / "val.txt").read_text().split()[:12]]
    features = plain.encode(plain.preprocess(photos))
    greedy = plain.decode_config(beam=1)
    got = [r.caption for r in fast.caption_features(features, greedy)]
    want = [r.caption for r in plain.caption_features(features, greedy)]
    assert sum(a == b for a, b in zip(got, want)) >= 10, list(zip(got, want))
    beam = plain.decode_config(beam=3)
    got = [r.caption for r in fast.caption_features(features, beam)]
    want = [r.caption for r in plain.caption_features(features, beam)]
    assert sum(a == b for a, b in zip(got, want)) >= 10, list(zip(got, want))


def test_dropping_the_weights_the_fast_copies_replace(tmp_path):
    """A server frees the PyTorch weights that captioning no longer reads (the decoder's, and the CNN's where ONNX
    Runtime encodes): the captions stay the same; saving and attention maps then say what is missing."""
    from conftest import photo

    photos = [photo(tmp_path / "a.jpg", size=(200, 150)), photo(tmp_path / "b.jpg", seed=1)]
    cap = Captioner.from_pretrained("flickr8k-caption")
    before = cap(photos)
    freed = cap.drop_unused_weights()
    assert freed > 20 * 2 ** 20  # ~29 MB: the float decoder and the PyTorch CNN
    assert cap(photos) == before and cap.device.type == "cpu"
    assert all(p.device.type == "meta" for p in cap.model.parameters())
    with pytest.raises(ConfigError, match="drop_unused_weights"):
        cap.save_pretrained(tmp_path / "saved")
    with pytest.raises(ConfigError, match="drop_unused_weights"):
        cap.attention_map(photos[0])
    assert not (tmp_path / "saved").exists()

    plain = Captioner.from_pretrained("flickr8k-caption", onnx=False)  # PyTorch encodes: its CNN stays
    want = plain(photos)
    plain.drop_unused_weights()
    assert all(p.device.type == "cpu" for p in plain.model.vision.parameters())
    assert plain(photos) == want
