"""Typed configs (unknown keys, overrides, types, recipe inheritance), every shipped recipe, the word tokenizer."""
import json
from pathlib import Path

import pytest

from vlfuse.config import apply_overrides, from_dict, read_config_file, to_dict
from vlfuse.data.tokenizer import BOS, EOS, PAD, UNK, Tokenizer
from vlfuse.errors import ConfigError
from vlfuse.training.caption import CaptionExperiment


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epochz'\. Did you mean 'train.epochs'\?"):
        from_dict(CaptionExperiment, {"train": {"epochz": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'data.pth'.*Did you mean 'data.path'"):
        from_dict(CaptionExperiment, {"data": {"pth": "x"}})


def test_overrides_and_round_trip():
    raw = apply_overrides({"train": {"epochs": 2}}, ["train.epochs=5", "train.lr=1e-3", "model.fusion.name=concat",
                                                     "model.fusion.dim=64", "train.amp=false", "data.path=/d"])
    exp = from_dict(CaptionExperiment, raw)
    assert exp.train.epochs == 5 and exp.train.lr == pytest.approx(1e-3) and exp.train.amp is False
    assert exp.model.fusion.name == "concat" and exp.model.fusion.kwargs == {"dim": 64}
    assert exp.data.path == "/d"
    assert to_dict(from_dict(CaptionExperiment, to_dict(exp))) == to_dict(exp)
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["train.epochs"])


@pytest.mark.parametrize("section,value,match", [
    ({"train": {"epochs": "many"}}, None, r"'train.epochs' must be a number, got 'many'"),
    ({"train": {"amp": "maybe"}}, None, r"'train.amp' must be true or false"),
    ({"train": {"lr": -1}}, None, r"train.lr must be positive"),
    ({"train": 5}, None, r"section 'train' must be a mapping"),
    ({"model": {"fusion": {"dim": 3}}}, None, r"'model.fusion' must be a part name or a mapping with a 'name' key"),
])
def test_type_errors(section, value, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(CaptionExperiment, section)


def test_a_removed_option_loads_at_its_old_default_only():
    """Configs written before an option was removed (checkpoints' config.json, resolved configs) still load when
    it holds its old default, which is what the code now does; any other value is an error naming it."""
    old = from_dict(CaptionExperiment, {"scst": {"epochs": 1, "hflip": 0.0, "loss_average": "sequence"}})
    assert old.scst == from_dict(CaptionExperiment, {"scst": {"epochs": 1}}).scst
    with pytest.raises(ConfigError, match=r"config key 'scst\.hflip' was removed; it is accepted only at its old "
                                          r"default 0\.0 \(what vlfuse now always does\), got 0\.5"):
        from_dict(CaptionExperiment, {"scst": {"hflip": 0.5}})


def test_bad_part_option_is_named():
    from vlfuse.tasks.caption.model import CaptionModel, CaptionModelConfig

    cfg = from_dict(CaptionModelConfig, {"vision": {"name": "small-cnn", "image_size": 32},
                                         "fusion": {"name": "concat", "dimm": 8}})
    with pytest.raises(ConfigError, match=r"fusion module 'concat' has no option 'dimm'.*Did you mean 'dim'"):
        CaptionModel(cfg, 20)
    with pytest.raises(ConfigError, match=r"unknown fusion module 'cross-atention'.*Did you mean 'cross-attention'"):
        CaptionModel(from_dict(CaptionModelConfig, {"vision": "small-cnn", "fusion": "cross-atention"}), 20)


def test_config_files(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 3\n")
    assert read_config_file(tmp_path / "a.yaml") == {"train": {"epochs": 3}}
    (tmp_path / "b.yaml").write_text("train: [epochs: 3\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        read_config_file(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "none.yaml")


def test_a_recipe_inherits_from_its_base_recursively_and_overrides_come_last(tmp_path):
    """``base:`` is relative to the file that names it; sections merge key by key; a part that names another part
    replaces the base's part whole; dotted overrides apply to the resolved mapping."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "root.yaml").write_text("task: vqa\ndata: {path: easy-vqa, flip: true}\n"
                                        "model: {fusion: {name: mul, dim: 512}, text: {name: gru, embed_dim: 128}}\n"
                                        "train: {epochs: 12, lr: 0.002}\n")
    (tmp_path / "recipes" / "mid.yaml").write_text("base: ../root.yaml\nmodel: {text: {embed_dim: 64}}\n"
                                                   "train: {epochs: 3}\n")
    (tmp_path / "recipes" / "leaf.yaml").write_text("base: mid.yaml\nmodel: {fusion: {name: mutan, rank: 5}}\n")
    leaf = read_config_file(tmp_path / "recipes" / "leaf.yaml")
    assert leaf == {"task": "vqa", "data": {"path": "easy-vqa", "flip": True},
                    "model": {"fusion": {"name": "mutan", "rank": 5}, "text": {"name": "gru", "embed_dim": 64}},
                    "train": {"epochs": 3, "lr": 0.002}}
    assert apply_overrides(leaf, ["train.epochs=5"])["train"] == {"epochs": 5, "lr": 0.002}


def test_recipe_inheritance_cycles_and_bad_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {epochs: 1}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"inherits from itself through 'base': .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        read_config_file(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        read_config_file(tmp_path / "self.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml' does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="'base' must be the path of another config file"):
        read_config_file(tmp_path / "list.yaml")


REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def parse_recipe(raw: dict):
    """The typed experiment of a recipe mapping, as ``vlfuse train`` builds it for the recipe's task."""
    from vlfuse.training.retrieval import RetrievalExperiment
    from vlfuse.training.retrieval_languages import LanguageTowerExperiment
    from vlfuse.training.vqa import parse_experiment

    parse = {"caption": lambda r: from_dict(CaptionExperiment, r), "vqa": parse_experiment,
             "retrieval": lambda r: from_dict(RetrievalExperiment, r),
             "retrieval-language": lambda r: from_dict(LanguageTowerExperiment, r)}
    return parse[raw.get("task", "caption")](raw)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_recipe_loads_with_the_settings_it_had(recipe):
    """Every recipe in configs/ resolves and types. ``tests/data/recipes_resolved.json`` holds each recipe's
    resolved settings, first written from the files as they were before recipes inherited (each a full copy):
    a recipe that inherits must resolve to exactly what its copy said, and any change to a recipe's settings
    shows up as a change to that file."""
    expected = json.loads((REPO / "tests" / "data" / "recipes_resolved.json").read_text())
    raw = read_config_file(recipe)
    assert raw == expected[str(recipe.relative_to(REPO / "configs"))]
    parse_recipe(raw)


def test_the_recorded_settings_cover_exactly_the_shipped_recipes():
    expected = json.loads((REPO / "tests" / "data" / "recipes_resolved.json").read_text())
    assert sorted(expected) == sorted(str(p.relative_to(REPO / "configs")) for p in RECIPES)


def test_tokenizer_build_encode_decode_save(tmp_path):
    tok = Tokenizer.build(["A dog runs.", "a dog sits", "A cat's toy!", "the dog"], min_count=2)
    assert tok.vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tok.vocab[4:] == ["a", "dog"]  # by count, ties alphabetical; words seen once are dropped (min_count 2)
    ids = tok.encode("A DOG, flies", max_len=0)
    assert ids == [BOS, tok.index["a"], tok.index["dog"], UNK, EOS]
    assert tok.encode("a dog a dog a dog", max_len=3) == [BOS, tok.index["a"], tok.index["dog"], tok.index["a"], EOS]
    assert tok.decode(ids) == "a dog"  # <unk> and specials are dropped
    assert tok.decode([tok.index["dog"], EOS, tok.index["a"]]) == "dog"  # stops at <eos>
    assert PAD == 0
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.vocab == tok.vocab and back.encode("a dog") == tok.encode("a dog")
    with pytest.raises(ConfigError, match="no vocab.json"):
        Tokenizer.load(tmp_path / "missing")


def test_chinese_segmenter():
    tok = Tokenizer.build(["一只狗在跑。", "一只猫"], min_count=1, segmenter="chinese-char")
    assert tok.decode(tok.encode("一只狗")) == "一只狗"
    assert tok.tokenize("两只dog!") == ["两", "只", "dog"]
