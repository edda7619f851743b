"""``vlfuse vqa`` / ``vlfuse evaluate --task vqa`` / ``vlfuse train`` (task vqa), and the shipped ``easyvqa`` model."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from vlfuse.cli.main import main
from vlfuse.data.vqa import read_easy_vqa
from vlfuse.tasks.vqa.pipeline import QuestionAnswerer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def easyvqa():
    return QuestionAnswerer.from_pretrained("easyvqa")


@pytest.fixture(scope="module")
def test_sample():
    """A fixed sample of easy-VQA *test* questions: every 40th, about 240 questions over ~240 images."""
    data = read_easy_vqa("test")
    return data, data.questions[::40]


def test_shipped_model_answers_real_test_questions(easyvqa, test_sample):
    data, questions = test_sample
    answers = easyvqa.predict([data.images[q.image] for q in questions], [q.question for q in questions])
    correct = sum(a.answer == q.answers[0] for a, q in zip(answers, questions))
    assert len(questions) >= 200
    assert correct / len(questions) >= 0.97, f"{correct}/{len(questions)} correct"


def test_cli_answers_with_top_k(capsys, test_sample):
    data, questions = test_sample
    q = questions[0]
    assert main(["vqa", "--model", "easyvqa", data.images[q.image], q.question]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == q.answers[0]
    assert len(lines) == 4  # the answer, then the top 3 with probabilities
    probs = [float(line.split()[-1]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_cli_json(capsys, test_sample):
    data, questions = test_sample
    q = questions[1]
    assert main(["vqa", "--model", "easyvqa", "--json", "--top-k", "5", data.images[q.image], q.question]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == q.answers[0] and len(out["top"]) == 5
    assert out["top"][0] == {"answer": out["answer"], "probability": out["probability"]}
    assert out["sure"] is True and out["doubt"] == ""  # easyvqa has no calibration: never flagged


@pytest.mark.parametrize("question,message", [
    ("", "question is empty"),
    ("   ", "question is empty"),
    ("x" * 1001, "over the limit of 1,000"),
], ids=["empty", "whitespace", "too-long"])
def test_cli_bad_question_exit_2_one_line(capsys, tmp_path, question, message):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "white").save(img)
    assert main(["vqa", str(img), question]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlfuse vqa: error:") and message in err[0]


def test_cli_bad_image_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    assert main(["vqa", str(bad), "what color is the shape?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.png" in err[0] and "Traceback" not in err[0]
    assert main(["vqa", str(tmp_path / "nope.png"), "what color is the shape?"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_unknown_model_exit_2(capsys, tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "white").save(img)
    assert main(["vqa", "--model", "no-such-model", str(img), "what?"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_evaluate_cli(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", "--task", "vqa", "--model", "easyvqa", "--data", "easy-vqa", "--split", "test",
                 "--limit", "150", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["questions"] == 150 and metrics["model"] == "easyvqa"
    assert metrics["yes_no_questions"] + metrics["other_questions"] == 150
    assert metrics["accuracy"] >= 0.95
    answers = json.loads((tmp_path / "m.answers.json").read_text())
    assert len(answers) == 150 and {"question", "answer", "references"} <= set(answers[0])


def test_train_cli_on_jsonl_with_bad_lines(tmp_path, capsys):
    """Training runs end to end from `vlfuse train` on a tiny JSONL set; bad lines are skipped and counted."""
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    lines = []
    for i in range(12):
        name = "red" if i % 2 else "blue"
        Image.new("RGB", (32, 32), colors[name]).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "what color is it?", "answer": name}))
        lines.append(json.dumps({"image": f"{i}.png", "question": "is it red?", "answers": ["yes" if i % 2 else "no"] * 3}))
    lines.insert(3, "{broken")
    lines.insert(7, json.dumps({"image": "gone.png", "question": "what?", "answer": "red"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = {"task": "vqa",
              "data": {"path": str(tmp_path / "train.jsonl"), "val_fraction": 0.25, "test_split": ""},
              "model": {"vision": {"name": "small-cnn", "channels": 8, "num_layers": 2, "image_size": 32},
                        "text": {"name": "embedding", "embed_dim": 8}, "fusion": {"name": "concat", "dim": 16},
                        "head": {"name": "classifier", "hidden_dim": 16}},
              "train": {"epochs": 2, "batch_size": 4, "warmup_steps": 1, "out_dir": str(tmp_path / "run"),
                        "progress": False, "threads": 1}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "cfg.json")]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out[captured.out.index("{\n"):])
    assert summary["skipped_lines"] == 2 and summary["answers"] == 4
    assert summary["train_questions"] + summary["val_questions"] == 24
    # temperature scaling fitted on val, and the training questions' openings, saved with the best checkpoint
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["calibration"]
    assert saved["temperature"] == summary["calibration"]["temperature"] > 0
    assert sorted(saved["openings"]) == ["is it", "what color"]
    assert saved["words"] == ["color", "is", "it", "red", "what"]
    assert "line 4" in captured.err and "line 8" in captured.err
    model = QuestionAnswerer.from_pretrained(tmp_path / "run" / "best")
    assert model(tmp_path / "0.png", "what color is it?").answer in {"red", "blue", "yes", "no"}


def frozen_lite0_config(tmp_path, questions: str, val_fraction: float, fusion: str, batch_size: int) -> dict:
    """A one-epoch VQA config over the questions file ``tmp_path/questions``: frozen EfficientNet-Lite0 (its stem
    outputs cached in tmp_path/cache), a bag-of-embeddings question encoder, a tiny head; output in tmp_path/run."""
    return {"task": "vqa", "data": {"path": str(tmp_path / questions), "val_fraction": val_fraction, "test_split": "",
                                    "cache_dir": str(tmp_path / "cache")},
            "model": {"vision": {"name": "efficientnet-lite0"}, "text": {"name": "embedding", "embed_dim": 8},
                      "fusion": {"name": fusion, "dim": 16}, "head": {"name": "classifier", "hidden_dim": 16}},
            "train": {"epochs": 1, "batch_size": batch_size, "warmup_steps": 1, "out_dir": str(tmp_path / "run"),
                      "progress": False, "threads": 1}}


def test_training_a_pretrained_encoder_reads_the_feature_cache(tmp_path):
    """A frozen EfficientNet's stem outputs go through the FeatureCache (keyed by file content, so the photos
    differ): a second run computes none again."""
    from vlfuse.training.vqa import train

    lines = []
    for i in range(6):
        Image.new("RGB", (40, 40), (200, 30 + i, 30) if i % 2 else (30, 30 + i, 200)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "what color is it?",
                                 "answer": "red" if i % 2 else "blue", "type": "color"}))
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    config = frozen_lite0_config(tmp_path, "qa.jsonl", val_fraction=0.34, fusion="mul", batch_size=2)
    summary = train(json.loads(json.dumps(config)))
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 6 and summary["train_questions"] + summary["val_questions"] == 6
    stamps = [p.stat().st_mtime_ns for p in entries]
    config["train"]["out_dir"] = str(tmp_path / "run2")
    train(config)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").rglob("*.npy"))] == stamps


def test_training_an_ensemble_trains_each_member_then_calibrates_them_together(tmp_path, capsys):
    """`members` in a config: each member is the config with its settings over it, trained into out_dir/<name>;
    out_dir/best is the ensemble (AnswerEnsemble), calibrated and scored on val; --resume skips finished members."""
    from vlfuse.tasks.vqa.pipeline import AnswerEnsemble

    lines = []
    for i in range(12):
        name = "red" if i % 2 else "blue"
        Image.new("RGB", (32, 32), (255, 0, 0) if i % 2 else (0, 0, 255)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "what color is it?", "answer": name}))
        lines.append(json.dumps({"image": f"{i}.png", "question": "is it red?", "answer": "yes" if i % 2 else "no"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = frozen_lite0_config(tmp_path, "train.jsonl", val_fraction=0.25, fusion="concat", batch_size=4)
    config["members"] = {"bag": {}, "gru": {"model": {"text": {"name": "gru", "embed_dim": 8, "hidden_dim": 8}}}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "cfg.json")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])
    assert set(summary["members"]) == {"bag", "gru"} and 0 <= summary["best_val_accuracy"] <= 1
    assert summary["calibration"]["temperature"] > 0
    member = json.loads((tmp_path / "run" / "gru" / "best" / "config.json").read_text())
    assert member["model"]["text"]["name"] == "gru" and member["model"]["fusion"]["name"] == "concat"
    model = QuestionAnswerer.from_pretrained(tmp_path / "run" / "best")
    assert isinstance(model, AnswerEnsemble) and list(model.members) == ["bag", "gru"]
    assert model.calibration.temperature == summary["calibration"]["temperature"]
    assert model.calibration.words == ["color", "is", "it", "red", "what"]  # the training questions' words
    assert sorted(model.calibration.openings) == ["is it", "what color"]
    assert model(tmp_path / "0.png", "what color is it?").answer in {"red", "blue", "yes", "no"}
    stamp = (tmp_path / "run" / "gru" / "summary.json").stat().st_mtime_ns
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--resume"]) == 0
    assert "'gru': trained already" in capsys.readouterr().err
    assert (tmp_path / "run" / "gru" / "summary.json").stat().st_mtime_ns == stamp
