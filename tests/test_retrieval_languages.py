"""Search in Chinese: a text tower trained into flickr8k-retrieval's space (vlfuse.tasks.retrieval.languages), the
query language told from the script, Chinese retrieval evaluation, and the training recipe keeping the English
model as it was."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FLICKR as DATA

from vlfuse.data.captions import read_captions
from vlfuse.data.languages import detect_language
from vlfuse.errors import ConfigError, InputError
from vlfuse.metrics.retrieval import recall_metrics
from vlfuse.tasks.retrieval.pipeline import Retriever


@pytest.fixture(scope="module")
def retriever():
    torch.set_num_threads(2)
    return Retriever.from_pretrained("flickr8k-retrieval")


@pytest.mark.parametrize("text,lang", [
    ("两只狗在雪地里玩", "zh"), ("兩隻狗在雪地裡玩", "zh"), ("a dog 在草地上跑", "zh"), ("two dogs 在雪地里", "zh"), ("two dogs play 在雪地", "en"),
    ("a dog runs", "en"), ("a 狗", "en"), ("🐶🐶 2", "en"), ("ＮＢＡ", "en"),
])
def test_query_language_is_told_from_the_script(text, lang):
    assert detect_language(text) == lang


def test_shipped_model_finds_photos_from_chinese_captions(retriever):
    assert retriever.languages == ("en", "zh")
    val = read_captions(DATA, split="val", lang="zh").subset(40)
    images = retriever.embed_images(val.images)
    captions = [c for caps in val.captions for c in caps]
    owner = [i for i, caps in enumerate(val.captions) for _ in caps]
    texts = retriever.embed_texts(captions)  # told Chinese from the script
    assert np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-4)
    assert np.allclose(texts, retriever.embed_texts(captions, lang="zh"))
    chinese = recall_metrics(images @ texts.T, owner)
    # 40 photos: chance R@5 is 12.5 %; English captions of the same photos for scale
    english_val = read_captions(DATA, split="val").subset(40)
    english = recall_metrics(images @ retriever.embed_texts([c for caps in english_val.captions for c in caps]).T,
                             [i for i, caps in enumerate(english_val.captions) for _ in caps])
    assert chinese["t2i_R@5"] > 50 and chinese["t2i_R@5"] > english["t2i_R@5"] - 25
    # traditional characters read as simplified: the same query
    assert np.allclose(retriever.embed_texts(["兩隻狗在雪地裡玩"]), retriever.embed_texts(["两只狗在雪地里玩"]))


def test_chinese_tower_leaves_the_english_model_alone(retriever, tmp_path):
    english = retriever.embed_texts(["a dog runs on the grass"])
    plain = Retriever(retriever.model, retriever.tokenizer, retriever.name, runtime=retriever.runtime.options,
                      concepts=retriever.concepts)  # the same model without its Chinese tower
    assert plain.languages == ("en",)
    assert np.array_equal(plain.embed_texts(["a dog runs on the grass"]), english)
    assert plain.model_id == retriever.model_id  # indexes built before the tower answer Chinese queries
    with pytest.raises(InputError, match="reads English queries, not Chinese"):
        plain.embed_texts(["两只狗在雪地里玩"])


def test_odd_and_bad_queries(retriever):
    with pytest.raises(InputError, match="empty"):
        retriever.embed_texts(["   "])
    with pytest.raises(InputError, match="no Chinese word"):
        retriever.embed_texts(["🐶🐶！！"], lang="zh")
    with pytest.raises(InputError, match="not 'fr'"):
        retriever.embed_texts(["两只狗"], lang="fr")
    mixed = ["two dogs 在雪地里 🐶", "一只狗在草地上跑" * 1250, "a dog " * 2000, "🐶", "ｄｏｇ 狗"]
    v = retriever.embed_texts(mixed)
    assert v.shape == (5, retriever.dim) and np.isfinite(v).all()


def test_evaluate_retrieval_in_chinese(tmp_path):
    out = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "vlfuse", "evaluate", "--task", "retrieval", "--data", str(DATA), "--split", "val",
           "--lang", "zh", "--limit", "20", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(out.read_text())
    assert metrics["lang"] == "zh" and metrics["images"] == 20
    zh_captions = read_captions(DATA, split="val", lang="zh").subset(20)
    assert metrics["captions"] == sum(len(c) for c in zh_captions.captions)
    assert metrics["t2i_R@5"] > 30  # 20 photos: chance is 25
    # a caption model is scored in its own language
    wrong = subprocess.run([sys.executable, "-m", "vlfuse", "evaluate", "--task", "caption", "--data", str(DATA),
                            "--lang", "zh", "--limit", "2"], capture_output=True, text=True, timeout=600)
    assert wrong.returncode != 0 and "writes 'en' captions" in wrong.stderr


def test_training_a_tower_adds_a_language_and_nothing_else(tmp_path, retriever):
    from vlfuse.training.retrieval_languages import train

    summary = train({"data": {"path": str(DATA), "cache_dir": str(tmp_path / "cache"), "train_limit": 24,
                              "val_limit": 8, "min_count": 1},
                     "tower": {"encoder": {"name": "gru", "embed_dim": 32, "hidden_dim": 32}, "hidden_dim": 64},
                     "train": {"epochs": 1, "batch_size": 16, "out_dir": str(tmp_path / "run"), "progress": False,
                               "warmup_steps": 1}})
    trained = Retriever.from_pretrained(summary["best_dir"])
    assert trained.languages == ("en", "zh") and trained.model_id == retriever.model_id
    assert np.array_equal(trained.embed_texts(["a dog"]), retriever.embed_texts(["a dog"]))
    assert trained.towers["zh"].config.encoder.kwargs["hidden_dim"] == 32
    assert summary["train_images"] == 24 and summary["val_images"] == 8
    with pytest.raises(ConfigError, match="English is read by the retrieval model's own text tower"):
        train({"tower": {"lang": "en"}})
