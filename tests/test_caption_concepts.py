"""A caption model told its photos' concepts (model.concepts): concept tokens in the cross-attention memory,
text-only training captions told the concepts their words name, and the fast decoding paths over that memory."""
import json

import pytest
import torch
from conftest import FLICKR, tiny_config, write_config

from vlfuse.cli.main import main
from vlfuse.config import Part
from vlfuse.data.tokenizer import UNK, Tokenizer
from vlfuse.errors import ConfigError
from vlfuse.generation import DecodeConfig, generate
from vlfuse.nn.concepts import imagenet_words
from vlfuse.tasks.caption.model import CaptionModel, CaptionModelConfig
from vlfuse.tasks.caption.pipeline import Captioner
from vlfuse.training.caption import told_concepts, train

SMALL = dict(fusion=Part("cross-attention", {"dim": 32, "num_layers": 1, "num_heads": 2}),
             decoder=Part("transformer", {"dim": 32, "num_heads": 2}))


def small_model(vocab, concepts=3, copy=False) -> CaptionModel:
    torch.manual_seed(0)
    parts = dict(SMALL, decoder=Part("transformer", {"dim": 32, "num_heads": 2, "copy": copy}))
    model = CaptionModel(CaptionModelConfig(concepts=concepts, **parts), len(vocab)).eval()
    model.set_concept_words({w: i for i, w in enumerate(vocab)})
    return model


def test_concepts_are_memory_tokens_scaled_by_their_probability():
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog", "cat", "on", "grass"]
    model = small_model(vocab)
    words = imagenet_words()
    assert model.concept_words[words.index("dog")] == vocab.index("dog")
    assert model.concept_words[words.index("broccoli")] == UNK  # not in this vocabulary: never told
    pixels = torch.randn(2, 3, 224, 224)
    image = model.vision(pixels)
    told = model.with_concepts(image)
    assert told.tokens.shape == (2, 3, 32)
    assert torch.equal(told.grid, image.grid)
    dog, broccoli = words.index("dog"), words.index("broccoli")
    ids = torch.tensor([[dog, broccoli, dog], [dog, dog, dog]])
    told = model.with_concepts(image, ids, torch.tensor([[0.8, 0.9, 0.0], [0.4, 0.2, 0.1]]))
    assert told.tokens[0, 1].abs().sum() == 0 and told.tokens[0, 2].abs().sum() == 0  # unknown word, probability 0
    assert torch.allclose(told.tokens[1, 0] / 0.4, told.tokens[1, 1] / 0.2, atol=1e-5)
    memory = model.decoder.fusion.memory(told)
    assert memory.shape == (2, image.grid.shape[1] + 3, 32)


def test_concepts_need_a_frozen_pretrained_backbone_and_cross_attention():
    with pytest.raises(ConfigError, match="trainable_blocks: 0"):
        CaptionModel(CaptionModelConfig(vision=Part("efficientnet-lite0", {"trainable_blocks": 1}), concepts=3,
                                        **SMALL), 10)
    with pytest.raises(ConfigError, match="Transformer decoder over cross-attention"):
        CaptionModel(CaptionModelConfig(fusion=Part("concat", {"dim": 32}), decoder=Part("lstm", {"embed_dim": 32,
                                        "hidden_dim": 32}), concepts=3), 10)


def test_text_only_captions_are_told_the_concepts_their_words_name():
    tokenizer = Tokenizer(["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog", "elephant", "runs"])
    words = imagenet_words()
    captions = [["a dog runs", "a dog", "a brown dog runs"], ["an elephant", "a big elephant", "elephant"],
                ["someone runs"]]
    ids, probs = told_concepts(captions, tokenizer, words, 4, seed=0)
    assert ids.shape == probs.shape == (3, 4)
    assert words[ids[0, 0]] == "dog" and probs[0, 0] >= 0.3
    assert words[ids[1, 0]] == "elephant" and probs[1, 0] >= 0.3
    assert (probs[2] <= 0.15).all()  # nothing named: only the low tail a classifier also has
    assert (probs[:, :-1] >= probs[:, 1:]).all()  # most probable first, as a classifier's top k
    again = told_concepts(captions, tokenizer, words, 4, seed=0)
    assert torch.equal(ids, again[0]) and torch.equal(probs, again[1])


@pytest.mark.parametrize("copy", [False, True])
def test_fast_decoding_paths_read_the_concept_tokens_like_the_eager_step(tmp_path, copy):
    """TorchScript's and ONNX Runtime's steps attend over grid + concept tokens (and a copying decoder adds its
    copied words' scores) as the eager decoder does."""
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(40)] + ["dog", "cat"]
    model = small_model(vocab, copy=copy)
    cap = Captioner(model, Tokenizer(vocab))
    cap.save_pretrained(tmp_path / "m")
    loaded = Captioner.from_pretrained(tmp_path / "m", int8=False)
    assert torch.equal(loaded.model.concept_words, model.concept_words)
    pixels = torch.randn(3, 3, 224, 224)
    features = loaded.encode(pixels)
    greedy = loaded.decode_config(beam=1)
    eager = [loaded.tokenizer.decode(ids) for ids, _ in model.generate(model.vision(pixels), greedy)]
    assert loaded.runtime.backends()["decoding_step"] == "torchscript"
    fast = [r.caption for r in loaded.caption_features(features, greedy)]
    assert fast == eager
    onnx = Captioner.from_pretrained(tmp_path / "m", onnx=True)
    assert onnx.runtime.backends()["decoding_step"] == "onnxruntime"
    int8 = [r.caption for r in onnx.caption_features(onnx.encode(pixels), greedy)]
    assert len(int8) == 3 and all(isinstance(c, str) for c in int8)


def test_a_copying_decoder_writes_the_words_it_is_told():
    """With a strong copy scale, the told concept's word (probability 1) is what the untrained decoder writes
    first, whatever its language model says; told nothing (probability 0), it writes something else."""
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(40)] + ["dog", "elephant"]
    model = small_model(vocab, concepts=1, copy=True)
    with torch.no_grad():
        model.decoder.copy_scale.fill_(50.0)
        model.decoder.copy_gate.bias.fill_(10.0)  # the gate open at every position
    image = model.vision(torch.randn(1, 3, 224, 224))
    elephant = imagenet_words().index("elephant")
    greedy = DecodeConfig(strategy="greedy", max_len=4, no_repeat_ngram=0)
    told = model.word_scores(torch.tensor([[elephant]]), torch.tensor([[1.0]]))
    state = model.decoder.init_state(model.with_concepts(image, torch.tensor([[elephant]]), torch.tensor([[1.0]])))
    state["copy"] = told
    ids = generate(model.decoder.step, state, 1, greedy, per_image=model.decoder.per_image_state())[0][0]
    assert ids[0] == vocab.index("elephant")
    state = model.decoder.init_state(model.with_concepts(image, torch.tensor([[elephant]]), torch.tensor([[0.0]])))
    state["copy"] = told * 0
    ids = generate(model.decoder.step, state, 1, greedy, per_image=model.decoder.per_image_state())[0][0]
    assert ids[0] != vocab.index("elephant")


def test_training_with_text_only_captions_and_concepts(tmp_path, feature_cache):
    text = tmp_path / "text_only.txt"
    text.write_text("".join(f"p{i}.jpg\t{c}\n" for i in range(6) for c in
                            ("a dog runs on the grass", "a black dog", "two dogs play", "a dog", "the dog runs")))
    config = tiny_config(tmp_path, feature_cache, epochs=1)
    config["model"]["concepts"] = 3
    config["data"]["text_only"] = str(text)
    cfg = write_config(tmp_path / "c.json", config)
    assert main(["train", "--config", str(cfg)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_captions"] == 24 * 5 + 6 * 5  # the photos' captions and the text-only ones
    cap = Captioner.from_pretrained(tmp_path / "run" / "best")
    assert cap.model.config.concepts == 3
    assert cap.model.concept_words[imagenet_words().index("dog")] == cap.tokenizer.index["dog"]
    photo = FLICKR / "images" / (FLICKR / "val.txt").read_text().split()[0]
    assert isinstance(cap(str(photo), strategy="greedy"), str)
    config["model"]["concepts"] = 0
    with pytest.raises(ConfigError, match="set model.concepts"):
        train(config)
