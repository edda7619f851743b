"""The shipped photo VQA model `flickr8k-vqa`: the default of `vlfuse vqa`, of `QuestionAnswerer.from_pretrained()`
and of `vlfuse evaluate --task vqa`; it answers questions made from real Flickr8k val captions better than the
answer prior, and flags questions unlike its training questions (full numbers: benchmarks/results/vqa_photo.json,
vqa_confidence.json)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import FLICKR, flickr_or_skip

from vlfuse.cli.main import main
from vlfuse.data.captions import CaptionSet, read_captions
from vlfuse.data.questions import generate_questions
from vlfuse.hub import builtin_models
from vlfuse.tasks.vqa.pipeline import AnswerEnsemble, QuestionAnswerer

COCO = FLICKR.parent / "coco_ood_dev"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vqa():
    return QuestionAnswerer.from_pretrained()


@pytest.fixture(scope="module")
def val_questions():
    """Questions made from the captions of the first 120 Flickr8k val photos (never trained on)."""
    val = read_captions(flickr_or_skip(), "val")
    sample = CaptionSet(val.images[:120], val.captions[:120])
    made = generate_questions(sample, seed=0, min_answer_count=1)
    return made


def test_default_is_the_shipped_photo_model(vqa):
    assert "flickr8k-vqa" in builtin_models() and QuestionAnswerer.default_model == "flickr8k-vqa"
    assert vqa.network.config.vision.name == "efficientnet-lite0" and len(vqa.answers) > 100
    assert vqa.calibration.temperature != 1.0 and vqa.calibration.words and vqa.calibration.openings
    # an ensemble: a GRU and two MiniLM readers of the question (one MiniLM in memory), over one image encoder
    assert isinstance(vqa, AnswerEnsemble) and list(vqa.members) == ["gru", "minilm", "minilm_light"]
    gru, minilm, light = vqa.members.values()
    assert minilm.network.text is light.network.text and gru.network.vision is minilm.network.vision


def test_answers_real_val_questions_better_than_the_answer_prior(vqa, val_questions):
    items = val_questions.items
    answers = vqa.predict([val_questions.images[q.image] for q in items], [q.question for q in items], top_k=1)
    right = sum(a.answer == q.answer for a, q in zip(answers, items)) / len(items)
    by_type = Counter(q.qtype for q in items)
    prior = sum(max(Counter(q.answer for q in items if q.qtype == t).values()) for t in by_type) / len(items)
    assert len(items) > 300
    # the prior here even knows each type's most frequent *val* answer; a broken or blind model does not beat it
    assert right > prior + 0.1, (right, prior)


@pytest.mark.parametrize("question,reason", [
    ("这只狗是什么颜色？", "no words this model knows"),
    ("is the dog black?", 'never trained on questions beginning "is the"'),  # every word known, the form not
    ("why is the sky blue?", "never saw in training (why)"),
    ("colorless green ideas sleep furiously?", "never saw in training"),
], ids=["chinese", "opening", "why", "nonsense"])
def test_questions_unlike_training_are_flagged(vqa, val_questions, question, reason):
    answer = vqa(val_questions.images[0], question)
    assert not answer.sure and reason in answer.doubt


def test_cli_default_model_says_when_it_is_not_sure(capsys, val_questions):
    photo = str(val_questions.images[0])
    assert main(["vqa", "--json", photo, "how many dogs are there?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] and 0 < out["probability"] <= 1 and isinstance(out["sure"], bool)
    assert main(["vqa", photo, "is the dog black?"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "(not sure: the model was never trained on questions beginning \"is the\"" in first


def test_evaluate_a_captioned_folder_with_the_default_model(tmp_path, capsys):
    if not (COCO / "captions.txt").is_file():
        pytest.skip("coco_ood_dev is not present at ../shared/data/coco_ood_dev")
    out = tmp_path / "m.json"
    assert main(["evaluate", "--task", "vqa", "--data", str(COCO), "--split", "val", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["model"] == "flickr8k-vqa" and metrics["images"] == 80
    assert set(metrics["accuracy_by_type"]) == {"object", "number", "color", "location", "yes/no"}
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["wups_0.9"] <= metrics["wups_0.0"] <= 1
    assert metrics["wups_0.9"] >= metrics["accuracy"]  # WUPS credits exact answers fully and close ones partly
