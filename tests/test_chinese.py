"""Chinese captions: the jieba segmenter, captions_zh.txt, scoring on jieba words, a Chinese model end to end."""
import json
import time

import pytest
from conftest import flickr_or_skip, tiny_config, write_config

from vlfuse.data.captions import read_captions
from vlfuse.data.languages import language, parse_languages
from vlfuse.data.tokenizer import Tokenizer
from vlfuse.errors import ConfigError, DataError
from vlfuse.metrics.caption import score_captions
from vlfuse.registry import SEGMENTERS


@pytest.fixture(scope="module")
def jieba_words():
    return SEGMENTERS.build("jieba")


def test_jieba_segments_words_beside_english_and_characters(jieba_words):
    assert {"english", "chinese-char", "jieba"} <= set(SEGMENTERS.names())
    assert jieba_words("一只黑狗在草地上奔跑。") == ["一只", "黑狗", "在", "草地", "上", "奔跑"]
    assert SEGMENTERS.build("chinese-char")("一只黑狗。") == ["一", "只", "黑", "狗"]
    # deterministic: another segmenter (its own jieba dictionary) splits a caption the same way
    caption = "两个穿着红色衣服的小孩在沙滩上玩耍"
    assert SEGMENTERS.build("jieba")(caption) == jieba_words(caption)
    assert jieba_words.join(jieba_words(caption)) == caption


def test_jieba_on_mixed_odd_and_long_text(jieba_words):
    # Latin words and numbers whole and lower-cased (full-width ones too), emoji and punctuation dropped
    assert jieba_words("A dog 在跑步😀！") == ["a", "dog", "在", "跑步"]
    assert jieba_words("ＮＢＡ球员１２号") == ["nba", "球员", "12", "号"]
    assert jieba_words.join(["iphone", "12", "的", "照片"]) == "iphone 12的照片"  # a space only between Latin words
    # traditional characters are read as the simplified ones (OpenCC), so they split into the same words
    assert jieba_words("兩隻狗在雪地裡玩") == jieba_words("两只狗在雪地里玩")
    assert "".join(jieba_words("兩隻狗在雪地裡玩")) == "两只狗在雪地里玩"
    assert SEGMENTERS.build("chinese-char")("騎自行車") == ["骑", "自", "行", "车"]
    assert jieba_words("") == [] and jieba_words("🐶🐶 !!") == [] and jieba_words("   ") == []
    t0 = time.perf_counter()
    long = jieba_words("一只狗在草地上跑" * 1250)  # 10,000 characters
    assert len(long) == 6 * 1250 and time.perf_counter() - t0 < 5.0


def test_jieba_tokenizer_round_trip(tmp_path):
    tok = Tokenizer.build(["一只黑狗在草地上奔跑。", "一只白狗在草地上。"], min_count=2, segmenter="jieba")
    assert tok.vocab[4:] == ["一只", "上", "在", "草地"]  # seen twice each; ties in code-point order
    assert tok.decode(tok.encode("一只猫在草地上")) == "一只在草地上"  # 猫 is unknown: <unk>, dropped in decoding
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.segmenter_name == "jieba" and back.encode("草地上") == tok.encode("草地上")
    assert tok.encode("🐶") == tok.encode("")  # nothing to say: <bos> <eos>


def test_languages():
    assert language("zh").captions_file == "captions_zh.txt" and language("zh").segmenter == "jieba"
    assert parse_languages("en, zh,en") == ["en", "zh"]
    with pytest.raises(ConfigError, match="unknown language 'fr'; vlfuse knows en, zh"):
        parse_languages("en,fr")
    with pytest.raises(ConfigError, match="no language in ','"):
        parse_languages(",")


def test_flickr_layout_reads_the_language_file_and_drops_repeats(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.txt").write_text("a.jpg\tA dog.\na.jpg\tA dog.\nb.jpg\tA cat.\n")
    (tmp_path / "captions_zh.txt").write_text("a.jpg\t一只狗。\na.jpg\t奔跑的狗。\na.jpg\t一只狗。\nb.jpg\t猫。\n",
                                              encoding="utf-8")
    (tmp_path / "train.txt").write_text("a.jpg\nb.jpg\n")
    zh = read_captions(tmp_path, split="train", lang="zh")
    assert zh.captions == [["一只狗。", "奔跑的狗。"], ["猫。"]]  # the repeat of 一只狗。 is dropped
    assert read_captions(tmp_path, split="train").captions[0] == ["A dog.", "A dog."]  # English as it always was
    with pytest.raises(ConfigError, match="unknown language 'de'"):
        read_captions(tmp_path, split="train", lang="de")
    (tmp_path / "captions.txt").unlink()
    with pytest.raises(DataError, match="no captions.txt"):
        read_captions(tmp_path, split="train", lang="en")


def test_flickr8k_chinese_val():
    val = read_captions(flickr_or_skip(), split="val", lang="zh")
    assert len(val) == 1000 and all(1 <= len(caps) <= 5 and len(set(caps)) == len(caps) for caps in val.captions)
    assert 4500 < sum(len(caps) for caps in val.captions) < 5000  # Flickr8k-CN repeats some short captions
    english = read_captions(flickr_or_skip(), split="val")
    assert [p.name for p in val.images] == [p.name for p in english.images]


REFS = {"1.jpg": ["一只黑狗在草地上奔跑。", "草地上的黑狗。"], "2.jpg": ["两个孩子在海边玩球。", "沙滩上玩耍的孩子。"]}


def test_chinese_scores_on_jieba_words_and_meteor_not_applicable():
    same = score_captions(REFS, {k: v[0] for k, v in REFS.items()}, lang="zh")
    assert same["BLEU-1"] > 0.99 and same["BLEU-4"] > 0.99 and same["ROUGE-L"] > 0.99 and same["CIDEr"] > 2.0
    assert "METEOR" not in same and same["unavailable"]["METEOR"].startswith("not applicable: METEOR matches")
    # words, not characters: 黑色的狗 shares the characters 黑 and 狗 with 黑狗 but none of its jieba words
    refs = {"1.jpg": ["黑狗"]}
    assert score_captions(refs, {"1.jpg": "黑色的狗"}, metrics=("BLEU",), lang="zh")["BLEU-1"] < 1e-6
    assert score_captions(refs, {"1.jpg": "黑狗。"}, metrics=("BLEU",), lang="zh")["BLEU-1"] > 0.99


@pytest.fixture(scope="module")
def chinese_run(tmp_path_factory, feature_cache):
    from vlfuse.cli.main import main

    tmp = tmp_path_factory.mktemp("zh_run")
    config = tiny_config(tmp, feature_cache)
    config["data"]["lang"] = "zh"
    assert main(["train", "--config", str(write_config(tmp / "zh.json", config))]) == 0
    return tmp / "run" / "best"


def test_a_chinese_model_trains_captions_and_evaluates_in_chinese(chinese_run, tmp_path, capsys):
    from vlfuse.cli.main import main
    from vlfuse.tasks.caption import Captioner

    assert json.loads((chinese_run / "vocab.json").read_text(encoding="utf-8"))["segmenter"] == "jieba"
    cap = Captioner.from_pretrained(chinese_run)
    assert cap.lang == "zh" and json.loads((chinese_run / "config.json").read_text())["lang"] == "zh"
    photo = flickr_or_skip() / "images" / (flickr_or_skip() / "val.txt").read_text().split()[0]
    caption = cap(photo)
    assert caption and not any(c.isascii() and c.isalpha() for c in caption) and " " not in caption
    out = tmp_path / "m.json"
    assert main(["evaluate", "--task", "caption", "--model", str(chinese_run), "--data", str(flickr_or_skip()),
                 "--split", "val", "--limit", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    metrics = json.loads(out.read_text())
    assert metrics["lang"] == "zh" and metrics["words"] == "jieba" and metrics["images"] == 4
    assert all(isinstance(metrics[k], float) for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"))
    assert "not applicable" in metrics["unavailable"]["METEOR"]
    hyps = json.loads(out.with_suffix(".captions.json").read_text())
    assert len(hyps) == 4 and all(h["caption"] for h in hyps)


def test_caption_cli_lang(chinese_run, trained_run, capsys):
    from vlfuse.cli.main import main

    photo = str(flickr_or_skip() / "images" / (flickr_or_skip() / "val.txt").read_text().split()[0])
    assert main(["caption", photo, "--model", str(chinese_run), "--lang", "zh", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["lang"] == "zh" and row["caption"]
    assert main(["caption", photo, "--model", str(trained_run / "best"), "--lang", "zh"]) == 2
    assert "writes captions in 'en', not 'zh'" in capsys.readouterr().err
    assert main(["caption", photo, "--model", str(chinese_run), "--lang", "en,zh"]) == 2
    assert "--model names one model" in capsys.readouterr().err
    assert main(["caption", photo, "--lang", "xx"]) == 2
    assert "unknown language 'xx'" in capsys.readouterr().err


def test_caption_recipe_language_options_are_checked():
    from vlfuse.config import from_dict
    from vlfuse.training.caption import CaptionDataConfig

    assert from_dict(CaptionDataConfig, {"lang": "zh"}).word_segmenter == "jieba"
    assert from_dict(CaptionDataConfig, {"lang": "zh", "segmenter": "chinese-char"}).word_segmenter == "chinese-char"
    assert from_dict(CaptionDataConfig, {}).word_segmenter == "english"
    with pytest.raises(ConfigError, match="unknown language 'jp'"):
        from_dict(CaptionDataConfig, {"lang": "jp"})
    with pytest.raises(ConfigError, match="data.mirror swaps English 'left'/'right'"):
        from_dict(CaptionDataConfig, {"lang": "zh", "mirror": 0.5})
