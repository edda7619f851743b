"""VQA: every fusion module in the VQA network, data readers, metrics, input checks, save/load, training."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlfuse.nn  # noqa: F401  (registers parts)
from vlfuse.config import Part
from vlfuse.data.tokenizer import Tokenizer
from vlfuse.data.vqa import (
    build_answer_vocab,
    read_easy_vqa,
    read_jsonl,
    split_images,
)
from vlfuse.errors import DataError, ImageError, InputError
from vlfuse.evaluation.vqa import score_answers
from vlfuse.metrics.vqa import answer_accuracy, soft_scores
from vlfuse.nn.text import pad_batch
from vlfuse.registry import FUSIONS, HEADS
from vlfuse.tasks.vqa.model import VQAModel, VQAModelConfig, soft_cross_entropy
from vlfuse.tasks.vqa.pipeline import AnswerEnsemble, QuestionAnswerer, VQAAnswer

ANSWERS = ["yes", "no", "red", "circle", "blue"]
QUESTIONS = ["is there a red circle?", "what color is the shape?", "what shape is it?"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(fusion: str = "mul", text: str = "gru", **vision) -> VQAModelConfig:
    text_kwargs = {"embed_dim": 8, "hidden_dim": 8} if text in ("gru", "lstm") else {"embed_dim": 8} \
        if text == "embedding" else {}
    return VQAModelConfig(vision=Part(vision.pop("name", "small-cnn"), vision or {"channels": 8, "num_layers": 2}),
                          text=Part(text, text_kwargs), fusion=Part(fusion, {"dim": 16}),
                          head=Part("classifier", {"hidden_dim": 16}),
                          num_answers=len(ANSWERS), vocab_size=20)


def tiny_model(fusion: str = "mul", **kw) -> QuestionAnswerer:
    torch.manual_seed(0)
    tokenizer = Tokenizer.build(QUESTIONS, min_count=1)
    config = tiny_config(fusion, **kw)
    config.vocab_size = len(tokenizer)
    return QuestionAnswerer(VQAModel(config), tokenizer, ANSWERS)


def shape_image(color=(255, 0, 0)) -> Image.Image:
    arr = np.full((64, 64, 3), 255, np.uint8)
    arr[16:48, 16:48] = color
    return Image.fromarray(arr)


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_every_fusion_forward_backward(fusion):
    net = VQAModel(tiny_config(fusion))
    pixels = torch.randn(2, 3, 32, 32)  # two images ...
    ids, mask = pad_batch([[1, 5, 6, 2], [1, 7, 2], [1, 5, 2]])  # ... three questions about them
    image_index = torch.tensor([0, 1, 1])
    logits = net(net.vision.stem(pixels), image_index, ids, mask)
    assert logits.shape == (3, len(ANSWERS)) and torch.isfinite(logits).all()
    loss = soft_cross_entropy(logits, torch.eye(len(ANSWERS))[[0, 2, 3]])
    loss.backward()
    for part in (net.vision, net.text, net.fusion, net.head):
        grads = [p.grad.abs().sum().item() for p in part.parameters() if p.grad is not None]
        assert grads and sum(grads) > 0, f"no gradient reached {type(part).__name__}"


@pytest.mark.parametrize("text", ["gru", "lstm", "embedding"])
def test_question_encoders(text):
    model = tiny_model(text=text)
    out = model.predict([shape_image()] * 2, QUESTIONS[:2])
    assert len(out) == 2 and all(a.answer in ANSWERS for a in out)


def test_minilm_question_encoder_uses_its_own_tokenizer(tmp_path):
    from vlfuse.tasks.vqa.pipeline import make_question_tokenizer

    config = tiny_config(text="minilm")
    config.text.kwargs["pretrained"] = False  # same architecture and tokenizer, no weight loading
    net = VQAModel(config)
    model = QuestionAnswerer(net, make_question_tokenizer(config), ANSWERS)
    assert model(shape_image(), "is there a red circle?").answer in ANSWERS
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    again = QuestionAnswerer.from_pretrained(tmp_path / "m")
    assert again.tokenizer.encode("is there a red circle?") == model.tokenizer.encode("is there a red circle?")


def test_efficientnet_lite0_is_selectable():
    net = VQAModel(tiny_config(name="efficientnet-lite0", image_size=64))
    model = QuestionAnswerer(net, Tokenizer.build(QUESTIONS, 1), ANSWERS)
    answer = model(shape_image(), "what color is the shape?")
    assert answer.answer in ANSWERS and net.vision.out_dim == 1280
    assert "vision.stem_layers." in net.persistent_prefixes()


def test_classifier_head_registered():
    head = HEADS.build("classifier", in_dim=4, num_answers=3, hidden_dim=8)
    assert head(torch.zeros(2, 4)).shape == (2, 3)


def test_soft_cross_entropy_matches_cross_entropy_and_skips_unknown_answers():
    logits = torch.randn(3, 5)
    onehot = torch.eye(5)[[1, 4, 0]]
    assert torch.allclose(soft_cross_entropy(logits, onehot), torch.nn.functional.cross_entropy(logits, torch.tensor([1, 4, 0])))
    partial = onehot.clone()
    partial[2] = 0  # answer outside the vocabulary: left out of the loss
    assert torch.allclose(soft_cross_entropy(logits, partial),
                          torch.nn.functional.cross_entropy(logits[:2], torch.tensor([1, 4])))


def test_vqa_accuracy_and_soft_scores():
    humans = ["2"] * 2 + ["two"] * 7 + ["3"]
    assert soft_scores(humans) == {"2": pytest.approx(2 / 3), "two": 1.0, "3": pytest.approx(1 / 3)}
    assert answer_accuracy("Two", humans) == 1.0
    assert answer_accuracy("2", humans) == pytest.approx(2 / 3)
    assert answer_accuracy("4", humans) == 0.0
    assert answer_accuracy("red", ["red"]) == 1.0  # one reference: plain accuracy


# -- data -----------------------------------------------------------------------------------------------
def write_jsonl(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    lines = [
        json.dumps({"image": "a.png", "question": "what color?", "answer": "Red"}),
        "{not json",
        json.dumps({"image": "missing.png", "question": "what color?", "answer": "red"}),
        json.dumps({"image": "b.png", "question": "what color?", "answers": [{"answer": "blue"}] * 9 + ["navy"]}),
        json.dumps({"image": "b.png", "question": "   ", "answer": "blue"}),
        json.dumps({"image": "a.png", "question": "is it red?"}),
        "",
        json.dumps(["a.png", "q", "a"]),
        json.dumps({"image": "a.png", "question": "is it red?", "answer": "yes"}),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_reader_skips_bad_lines_with_line_numbers(tmp_path):
    data = read_jsonl(write_jsonl(tmp_path))
    assert [q.question for q in data.questions] == ["what color?", "what color?", "is it red?"]
    assert data.questions[0].answers == ["red"]
    assert data.questions[1].answers == ["blue"] * 9 + ["navy"]
    assert len(data.images) == 2
    assert [s.split(":")[0] for s in data.skipped] == ["line 2", "line 3", "line 5", "line 6", "line 8"]
    assert "missing.png" in data.skipped[1] and "does not exist" in data.skipped[1]
    assert build_answer_vocab(data)[:1] == ["blue"] or set(build_answer_vocab(data)) == {"red", "blue", "navy", "yes"}


def test_jsonl_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(DataError, match="no usable questions.*line 1"):
        read_jsonl(bad)


def test_easy_vqa_reader_and_image_split():
    train = read_easy_vqa("train")
    assert len(train.images) == 4000 and len(train) == 38575
    assert len({a for q in train.questions for a in q.answers}) == 13
    tr, val = split_images(train, 0.1)
    assert len(val.images) == 400 and len(tr.images) == 3600
    assert set(tr.images).isdisjoint(val.images)  # no image leaks from train into val
    assert len(tr) + len(val) == len(train)


def test_score_answers_splits_yes_no_and_other(tmp_path):
    data = read_jsonl(write_jsonl(tmp_path))
    metrics = score_answers(data, ["red", "navy", "no"])
    assert metrics["questions"] == 3 and metrics["yes_no_questions"] == 1 and metrics["other_questions"] == 2
    assert metrics["other_accuracy"] == pytest.approx((1 + 1 / 3) / 2)
    assert metrics["yes_no_accuracy"] == 0.0
    assert metrics["accuracy"] == pytest.approx((1 + 1 / 3) / 3)


# -- user-facing API ------------------------------------------------------------------------------------
@pytest.mark.parametrize("question,match", [("", "empty"), ("   \n", "empty"), ("why " * 300, "over the limit of 1,000")],
                         ids=["empty", "whitespace", "too-long"])
def test_bad_questions_raise_input_error(question, match):
    with pytest.raises(InputError, match=match):
        tiny_model()(shape_image(), question)


def test_bad_image_raises_image_error(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="x.png"):
        tiny_model()(bad, "what color?")
    with pytest.raises(ImageError, match="does not exist"):
        tiny_model()(tmp_path / "missing.png", "what color?")


def test_unknown_words_still_get_an_answer_and_probabilities_sum_to_one():
    model = tiny_model()
    answer = model(shape_image(), "zxqv blorp frobnicate?", top_k=10)
    assert isinstance(answer, VQAAnswer) and answer.answer == answer.top[0][0]
    assert len(answer.top) == len(ANSWERS)  # top_k is capped at the answer vocabulary
    assert sum(p for _, p in answer.top) == pytest.approx(1.0, abs=1e-5)
    assert [p for _, p in answer.top] == sorted((p for _, p in answer.top), reverse=True)


def test_predict_checks_lengths_and_top_k():
    model = tiny_model()
    with pytest.raises(InputError, match="2 images but 1 questions"):
        model.predict([shape_image(), shape_image()], ["what?"])
    with pytest.raises(InputError, match="top_k"):
        model.predict([shape_image()], ["what?"], top_k=0)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("soft-attention")
    images = [shape_image(), shape_image((0, 0, 255))]
    before = model.predict(images, QUESTIONS[:2], top_k=3)
    directory = model.save_pretrained(tmp_path / "vqa")
    config = json.loads((directory / "config.json").read_text())
    assert config["task"] == "vqa" and config["model"]["fusion"]["name"] == "soft-attention"
    assert json.loads((directory / "answers.json").read_text()) == ANSWERS
    assert (directory / "vocab.json").is_file()
    loaded = QuestionAnswerer.from_pretrained(directory)
    after = loaded.predict(images, QUESTIONS[:2], top_k=3)
    for a, b in zip(before, after):
        assert a.answer == b.answer
        assert a.probability == pytest.approx(b.probability, abs=2e-3)  # weights stored as fp16


def test_from_pretrained_rejects_other_tasks(tmp_path):
    from vlfuse.errors import ModelNotFoundError

    d = tmp_path / "cap"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"task": "caption", "model": {}}))
    with pytest.raises(ModelNotFoundError, match="is a caption model, not a vqa model"):
        QuestionAnswerer.from_pretrained(d)


# -- knowing when it does not know ------------------------------------------------------------------------
def test_expected_calibration_error():
    from vlfuse.metrics.vqa import expected_calibration_error

    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0
    # bins: {0.9, 0.9} right -> |1 - 0.9| x 2; {0.6} wrong -> 0.6; {0.3} wrong -> 0.3; over 4 answers
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.3], [1, 1, 0, 0]) == pytest.approx((0.2 + 0.6 + 0.3) / 4)
    with pytest.raises(ValueError, match="2 confidences but 1"):
        expected_calibration_error([0.5, 0.5], [1])


def test_temperature_and_doubt_flags():
    from vlfuse.tasks.vqa.pipeline import AnswerCalibration

    model = tiny_model()
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0]])
    sharp = model.probabilities(logits)[0, 0]
    words = sorted({w for q in QUESTIONS for w in q.rstrip("?").split()})
    model.calibration = AnswerCalibration(temperature=4.0, unsure_below=0.99, min_known_words=0.5, words=words)
    assert model.probabilities(logits)[0, 0] < sharp  # a higher temperature flattens
    cal = model.calibration
    assert cal.known_word_share("what color is the shape?") == 1.0
    assert cal.known_word_share("what is the meaning of life?") == pytest.approx(3 / 6)
    assert cal.known_word_share("这是什么颜色？") == 0.0  # no English word at all
    answer = model(shape_image(), "what color is the shape?")
    assert not answer.sure and "not sure" in answer.doubt  # every probability is under 0.99
    answer = model(shape_image(), "这是什么颜色？")
    assert not answer.sure and "no words this model knows" in answer.doubt
    answer = model(shape_image(), "zxqv blorp is the frobnicate?")
    assert not answer.sure and "never saw in training (zxqv, blorp, frobnicate)" in answer.doubt
    model.calibration = AnswerCalibration()  # the defaults never flag
    assert model.calibration.known_word_share("这是什么颜色？") is None
    assert model(shape_image(), "这是什么颜色？").sure
    with pytest.raises(Exception, match="temperature must be positive"):
        AnswerCalibration(temperature=0)


def test_calibration_is_saved_and_loaded(tmp_path):
    from vlfuse.tasks.vqa.pipeline import AnswerCalibration

    model = tiny_model()
    model.calibration = AnswerCalibration(temperature=1.7, unsure_below=0.25, min_known_words=0.4,
                                          words=["color", "what"], openings=["what color"])
    loaded = QuestionAnswerer.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.calibration == model.calibration


def test_blind_model_ignores_the_photo():
    config = tiny_config()
    config.blind = True
    torch.manual_seed(0)
    tokenizer = Tokenizer.build(QUESTIONS, min_count=1)
    config.vocab_size = len(tokenizer)
    model = QuestionAnswerer(VQAModel(config), tokenizer, ANSWERS)
    a, b = model.predict([shape_image(), shape_image((0, 0, 255))], [QUESTIONS[1]] * 2, top_k=5)
    assert a.top == b.top
    seeing = tiny_model()
    a, b = seeing.predict([shape_image(), shape_image((0, 0, 255))], [QUESTIONS[1]] * 2, top_k=5)
    assert a.top != b.top


def test_score_answers_per_question_type(tmp_path):
    rows = [("what color is the dog?", "black", "color"), ("how many dogs are there?", "two", "number"),
            ("what color is the ball?", "red", "color")]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"image": "a.png", "question": q, "answer": a, "type": t})
                                               + "\n" for q, a, t in rows))
    data = read_jsonl(tmp_path / "qa.jsonl")
    metrics = score_answers(data, ["black", "three", "blue"], [0.9, 0.8, 0.2])
    assert metrics["accuracy_by_type"] == {"color": 0.5, "number": 0.0}
    assert metrics["questions_by_type"] == {"color": 2, "number": 1}
    assert metrics["ece"] == pytest.approx((0.1 + 0.8 + 0.2) / 3)


def test_default_models():
    from vlfuse.cli.vqa import DEFAULT_MODEL
    from vlfuse.serving.models import DEFAULT_MODELS
    from vlfuse.tasks.caption import Captioner
    from vlfuse.tasks.retrieval import Retriever

    assert QuestionAnswerer.default_model == DEFAULT_MODEL == DEFAULT_MODELS["vqa"] == "flickr8k-vqa"
    assert Captioner.default_model == DEFAULT_MODELS["caption"] and Retriever.default_model == DEFAULT_MODELS["retrieval"]


def test_questions_that_begin_unlike_training_questions_are_flagged():
    from vlfuse.tasks.vqa.pipeline import AnswerCalibration

    model = tiny_model()
    model.calibration = AnswerCalibration(openings=["what color", "is there"])
    assert model(shape_image(), "what color is the shape?").sure
    answer = model(shape_image(), "why is the shape red?")
    assert not answer.sure and 'beginning "why is"' in answer.doubt and "'what color ...'" in answer.doubt


def test_concepts_add_one_image_vector_from_the_frozen_classifier():
    config = VQAModelConfig(vision=Part("efficientnet-lite0", {}), text=Part("gru", {"embed_dim": 8, "hidden_dim": 8}),
                            fusion=Part("soft-attention", {"dim": 16, "attn_dim": 16}),
                            head=Part("classifier", {"hidden_dim": 16}), num_answers=3, vocab_size=10, concepts=True)
    torch.manual_seed(0)
    net = VQAModel(config)
    image = net.vision.tail(net.vision.stem(torch.randn(2, 3, 224, 224)))
    told = net.with_concepts(image)
    assert told.grid.shape[1] == image.grid.shape[1] + 1 and told.pooled.shape == image.pooled.shape
    ids, mask = torch.randint(4, 10, (3, 5)), torch.ones(3, 5, dtype=torch.bool)
    assert net.answer_logits(image, torch.tensor([0, 1, 1]), ids, mask).shape == (3, 3)
    assert "concept_head." in net.persistent_prefixes()  # the ImageNet classifier comes from PyPI, never saved
    assert not any(p.requires_grad for p in net.concept_head.parameters()) and net.concept_proj.weight.requires_grad
    with pytest.raises(Exception, match="pretrained, frozen vision encoder"):
        VQAModel(tiny_config()).__class__(dataclasses.replace(tiny_config(), concepts=True))


def tiny_ensemble() -> AnswerEnsemble:
    """Two members that read questions differently (GRU, bag of embeddings) over the same image encoder."""
    return AnswerEnsemble({"gru": tiny_model("mul"), "bag": tiny_model("concat", text="embedding")})


def test_ensemble_answers_with_the_mean_of_its_members_probabilities():
    ensemble = tiny_ensemble()
    gru, bag = ensemble.members["gru"], ensemble.members["bag"]
    assert gru.network.vision is bag.network.vision  # one image encoder in memory
    images, questions = [shape_image(), shape_image((0, 0, 255))], QUESTIONS[:2]
    pixels = torch.stack([ensemble.transform(im) for im in images])
    with torch.inference_mode():
        image = ensemble.network.vision(pixels)
        index = torch.arange(2)
        mean = (gru.probabilities(gru.question_logits(image, index, questions))
                + bag.probabilities(bag.question_logits(image, index, questions))) / 2
    answers = ensemble.predict(images, questions, top_k=len(ANSWERS))
    for answer, row in zip(answers, mean):
        assert dict(answer.top) == pytest.approx({a: float(p) for a, p in zip(ANSWERS, row)}, abs=1e-5)


def test_ensemble_save_load_round_trip_through_vlfuse_load(tmp_path):
    import vlfuse

    ensemble = tiny_ensemble()
    ensemble.calibration = dataclasses.replace(ensemble.calibration, temperature=2.0)
    images = [shape_image(), shape_image((0, 0, 255))]
    before = ensemble.predict(images, QUESTIONS[:2], top_k=3)
    directory = ensemble.save_pretrained(tmp_path / "ens")
    config = json.loads((directory / "config.json").read_text())
    assert config["task"] == "vqa" and config["members"] == ["gru", "bag"] and "model" not in config
    assert (directory / "gru" / "model.safetensors").is_file() and (directory / "bag" / "answers.json").is_file()
    loaded = vlfuse.load(directory)
    assert isinstance(loaded, AnswerEnsemble) and loaded.calibration.temperature == 2.0
    for a, b in zip(before, loaded.predict(images, QUESTIONS[:2], top_k=3)):
        assert a.answer == b.answer and a.probability == pytest.approx(b.probability, abs=2e-3)


def test_ensemble_members_must_agree_on_answers_and_images(tmp_path):
    from vlfuse.errors import ConfigError, ModelNotFoundError

    other_answers = tiny_model()
    other_answers.answers = list(reversed(ANSWERS))
    with pytest.raises(ConfigError, match="different answer lists"):
        AnswerEnsemble({"a": tiny_model(), "b": other_answers})
    other_images = tiny_model()
    torch.nn.init.zeros_(next(other_images.network.vision.parameters()))
    with pytest.raises(ConfigError, match="encode images differently"):
        AnswerEnsemble({"a": tiny_model(), "b": other_images})
    directory = tiny_ensemble().save_pretrained(tmp_path / "ens")
    import shutil

    shutil.rmtree(directory / "bag")
    with pytest.raises(ModelNotFoundError, match="member 'bag'"):
        QuestionAnswerer.from_pretrained(directory)


@pytest.mark.parametrize("trainable_layers", [0, 1])
def test_training_batches_of_cached_question_states_give_the_logits_of_token_ids(trainable_layers):
    """A frozen pretrained question encoder's frozen part runs once over the training questions
    (frozen_question_states); the batches that carry those states give the logits that token ids give."""
    from vlfuse.tasks.vqa.pipeline import make_question_tokenizer
    from vlfuse.training.vqa import encode_items, frozen_question_states, make_collate
    from vlfuse.data.vqa import VQAQuestion, VQASet

    config = tiny_config(text="minilm")
    config.text.kwargs.update(pretrained=False, trainable_layers=trainable_layers)
    torch.manual_seed(0)
    net = VQAModel(config).eval()
    tokenizer = make_question_tokenizer(config)
    data = VQASet([f"{i}.png" for i in range(3)],
                  [VQAQuestion(i % 3, q, ["yes"]) for i, q in enumerate(QUESTIONS + ["is the circle on the left?"])],
                  name="tiny")
    items = encode_items(data, tokenizer, ANSWERS, config.max_question_len)
    states = frozen_question_states(net.text, items, tokenizer.pad_id)
    assert len(states) == 5  # four questions, and "left" mirrored to "right" in one
    acts = torch.randn(3, 3, 64, 64)
    with_ids = make_collate(acts, len(ANSWERS), tokenizer.pad_id)(items)
    with_states = make_collate(acts, len(ANSWERS), tokenizer.pad_id, question_states=states)(items)
    assert with_states[2].shape[:2] == with_ids[2].shape and torch.equal(with_states[3], with_ids[3])
    with torch.no_grad():
        expected = net(with_ids[0], with_ids[1], with_ids[2], with_ids[3])
        got = net(with_states[0], with_states[1], with_states[2], with_states[3])
    assert torch.allclose(got, expected, atol=1e-2)  # states stored as fp16


def test_ensemble_members_with_the_same_frozen_question_encoder_run_it_once():
    from vlfuse.tasks.vqa.pipeline import make_question_tokenizer

    def minilm_member(fusion: str) -> QuestionAnswerer:
        torch.manual_seed(0)
        config = tiny_config(fusion, text="minilm")
        config.text.kwargs["pretrained"] = False  # frozen all the same (trainable_layers 0)
        return QuestionAnswerer(VQAModel(config), make_question_tokenizer(config), ANSWERS)

    a, b, gru = minilm_member("mul"), minilm_member("concat"), tiny_model("mul")
    images, questions = [shape_image(), shape_image((0, 0, 255))], QUESTIONS[:2]
    alone = [m.predict(images, questions, top_k=len(ANSWERS)) for m in (a, b, gru)]
    ensemble = AnswerEnsemble({"a": a, "b": b, "gru": gru})
    assert a.network.text is b.network.text and gru.network.text is not a.network.text
    calls = []
    a.network.text.register_forward_hook(lambda *_: calls.append(1))
    answers = ensemble.predict(images, questions, top_k=len(ANSWERS))
    assert len(calls) == 1  # one MiniLM pass for both members that read questions with it
    for i, answer in enumerate(answers):
        expected = {w: sum(dict(m[i].top)[w] for m in alone) / 3 for w in ANSWERS}
        assert dict(answer.top) == pytest.approx(expected, abs=1e-5)
