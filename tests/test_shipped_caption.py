"""The shipped default caption model still works: it loads offline, captions real photos, and meets a floor
on a small real Flickr8k val sample (the full-quality numbers live in benchmarks/results/caption_quality.json)."""
from __future__ import annotations

import subprocess
import sys

from conftest import flickr_or_skip

from vlfuse.data.samples import sample_photos
from vlfuse.evaluation.caption import evaluate_captioner
from vlfuse.generation import DecodeConfig
from vlfuse.hub import builtin_models
from vlfuse.runtime.int8 import _Int8Linear
from vlfuse.tasks.caption.pipeline import Captioner


def test_default_caption_model_is_built_in():
    assert "flickr8k-caption" in builtin_models()


def test_shipped_model_meets_floor_on_real_val_sample():
    flickr = flickr_or_skip()
    cap = Captioner.from_pretrained("flickr8k-caption")
    m = evaluate_captioner(cap, str(flickr), "val", DecodeConfig(strategy="beam", beam_size=3), limit=60,
                           progress=False)
    assert m["images"] == 60 and m["failed_images"] == 0
    # On 60 images the scores are noisy; an untrained or broken model scores ~0 on both.
    assert m["CIDEr"] > 0.3, m
    assert m["BLEU-4"] > 0.1, m


def test_demo_command_captions_sample_photos():
    r = subprocess.run([sys.executable, "-m", "vlfuse", "caption", "--samples"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln.split("\t") for ln in r.stdout.strip().splitlines()]
    assert len(lines) == len(sample_photos())
    captions = [c for _, c in lines]
    assert all(len(c.split()) >= 3 for c in captions), captions
    assert len(set(captions)) == len(captions), captions  # different photos, different captions


def test_int8_decoder_captions_match_the_float_decoder(tmp_path):
    """On a CPU captions come from an int8 copy of the decoder (faster); it must say what the float model says."""
    flickr = flickr_or_skip()
    names = (flickr / "val.txt").read_text().split()[:24]
    images = [str(flickr / "images" / n) for n in names]
    fast, exact = Captioner.from_pretrained("flickr8k-caption"), Captioner.from_pretrained("flickr8k-caption", int8=False)
    int8_layers = [sum(isinstance(m, _Int8Linear) for m in c.generator.modules()) for c in (fast, exact)]
    assert int8_layers[0] > 0 and int8_layers[1] == 0
    a, b = fast(images, strategy="greedy"), exact(images, strategy="greedy")
    assert all(c.strip() for c in a)
    assert sum(x == y for x, y in zip(a, b)) >= 20, list(zip(a, b))
    # the float model is what gets saved: an int8 captioner saves and reloads as the float model
    fast.save_pretrained(tmp_path / "copy")
    assert Captioner.from_pretrained(tmp_path / "copy", int8=False)(images[:6], strategy="greedy") == b[:6]


def test_shipped_chinese_model_captions_in_chinese_and_meets_a_floor():
    flickr = flickr_or_skip()
    cap = Captioner.from_pretrained("flickr8k-caption-zh")
    assert cap.lang == "zh" and cap.tokenizer.segmenter_name == "jieba"
    assert Captioner.default_model_for("zh") == "flickr8k-caption-zh"
    # its default is consensus reranking against a memory of Chinese training captions, embedded by the retrieval
    # model's Chinese text tower (the image tower finds the neighbours)
    assert cap.decode_defaults.strategy == "rerank"
    memory = cap.reranker.memory
    assert len(memory) > 20000 and all(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in memory.texts[:50])
    m = evaluate_captioner(cap, str(flickr), "val", cap.decode_defaults, limit=60, progress=False)
    assert m["images"] == 60 and m["lang"] == "zh" and "not applicable" in m["unavailable"]["METEOR"]
    assert m["CIDEr"] > 0.3 and m["BLEU-4"] > 0.1, m  # an untrained or broken model scores ~0 on both


def test_caption_command_in_english_and_chinese_per_photo():
    import json

    photos = [str(p) for p in sample_photos()[:2]]
    r = subprocess.run([sys.executable, "-m", "vlfuse", "caption", *photos, "--lang", "en,zh", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == photos
    for row in rows:
        assert set(row["captions"]) == {"en", "zh"} and len(row["captions"]["en"].split()) >= 3
        assert any("\u4e00" <= ch <= "\u9fff" for ch in row["captions"]["zh"]), row
