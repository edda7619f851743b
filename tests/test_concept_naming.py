"""Naming a photo's concepts in its caption (issue 20): which words name a concept, measured on training photos
(vlfuse.tasks.caption.naming), and the rerank strategy that makes the caption of a photo with a confident concept
name it (constrained beam search; the decoding itself is tested in test_decoding.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlfuse.data.samples import sample_photos
from vlfuse.errors import ConfigError
from vlfuse.tasks.caption.naming import NAMING_FILE, ConceptNaming, concept_words, measure_naming, plural
from vlfuse.tasks.caption.pipeline import Captioner
from vlfuse.tasks.caption.rerank import CaptionDecodeConfig

WORDS = ["dog", "terrier", "ski", "zebra", "bus", "puppy"]


def test_plural_of_concept_words():
    assert [plural(w) for w in ["dog", "bus", "box", "dish", "puppy", "toy", "glass"]] == [
        "dogs", "buses", "boxes", "dishes", "puppies", "toys", "glasses"]


def test_naming_is_measured_on_the_training_photos_and_their_captions():
    dog_caps = [["a", "dog", "runs"], ["two", "dogs", "play"], ["a", "dog"], ["the", "animal"], ["a", "dog", "jumps"]]
    ski_caps = [["a", "skier", "in", "the", "snow"]] * 5
    concepts = ([{"terrier": 0.8}] * 12 + [{"ski": 0.6, "terrier": 0.1}] * 12 + [{"zebra": 0.9}] * 3
                + [{"dog": 0.2}] * 20)  # below the threshold: not counted
    captions = [dog_caps] * 12 + [ski_caps] * 12 + [dog_caps] * 3 + [dog_caps] * 20
    naming = measure_naming(concepts, captions, WORDS, threshold=0.3, min_photos=10, share=0.25)
    # photos called "terrier" are captioned "dog" (3 of 5 captions) and "dogs" (1 of 5: below the share, but the
    # plural of a naming word names it too); never "terrier"
    assert naming.words_for("terrier") == ["dog", "dogs"]
    assert naming.words_for("ski") == []  # seen on 12 photos, never named: a caption is not made to name it
    assert naming.photos == {"ski": 12, "terrier": 12, "zebra": 3}
    # too few photos to tell (or none): a novel concept is named by its own word or its plural
    assert naming.words_for("zebra") == ["zebra", "zebras"] and naming.words_for("bus") == ["bus", "buses"]
    with pytest.raises(ConfigError, match="same photos"):
        measure_naming(concepts, captions[:-1], WORDS)


def test_naming_table_saves_and_loads_and_a_broken_one_is_named(tmp_path):
    naming = ConceptNaming({"terrier": ["dog", "dogs"], "ski": []}, {"terrier": 12, "ski": 12})
    naming.save(tmp_path)
    assert ConceptNaming.load(tmp_path) == naming
    assert ConceptNaming.load(tmp_path / "nowhere") is None
    (tmp_path / NAMING_FILE).write_text(json.dumps({"named_by": {}, "colour": "red"}))
    with pytest.raises(ConfigError, match="concept naming table"):
        ConceptNaming.load(tmp_path)


def test_concept_words_sum_the_classes_of_one_word():
    import torch
    probs = torch.tensor([[0.5, 0.3, 0.195, 0.005], [0.0, 0.0, 0.0, 1.0]])
    assert concept_words(["elephant", "elephant", "dog", "cat"], probs) == [
        {"elephant": pytest.approx(0.8), "dog": pytest.approx(0.195)}, {"cat": 1.0}]


def test_name_concepts_must_be_a_probability():
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="name_concepts"):
            CaptionDecodeConfig(name_concepts=bad)


@pytest.fixture(scope="module")
def shipped():
    return Captioner.from_pretrained("flickr8k-caption")


def test_shipped_model_names_a_confident_concept_and_only_then(shipped, tmp_path, capsys):
    cap = shipped
    assert cap.decode_defaults.name_concepts == 0.5 and cap.reranker.naming.named_by  # the shipped table
    cat = str(next(p for p in sample_photos() if p.stem == "chelsea"))
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(blank)
    pixels = cap.preprocess([cat, str(blank)])
    assert cap.reranker.encode(pixels).concepts is None  # computed only when asked for
    concepts = cap.reranker.concept_words(cap.reranker.encode(pixels, concepts=True).concepts)
    # the reranker's concepts are the frozen backbone's ImageNet classifier, as `vlfuse tag` says
    from vlfuse.tasks.tagging.pipeline import Tagger
    tags = Tagger.from_pretrained()([cat], top=1, threshold=0.0)[0][0]
    assert tags.word == "cat" and concepts[0]["cat"] >= tags.probability - 1e-3 and concepts[0]["cat"] > 0.9
    assert max(concepts[1].values(), default=0.0) < 0.5
    assert [cap.reranker.words_to_name(c, cap.tokenizer.index, 0.5) for c in concepts] == [["cat", "cats"], []]
    assert cap.reranker.words_to_name(concepts[0], cap.tokenizer.index, 0.0) == []  # 0: naming off
    named, blank_named = cap([cat, str(blank)])
    assert "cat" in named.split()
    # without naming, the same decoding does not say it (the Flickr8k decoder's own choice), and the blank photo's
    # caption is the same either way (nothing confident to name)
    plain, blank_plain = cap([cat, str(blank)], name_concepts=0.0)
    assert "cat" not in plain.split() and blank_plain == blank_named
    # the command line's --name-concepts is the same option
    from vlfuse.cli.main import main
    assert main(["caption", cat, "--name-concepts", "0"]) == 0
    assert capsys.readouterr().out.strip().endswith(plain)
