"""WUPS over the WordNet that scripts/install_system.sh installs (Debian's wordnet-base): real similarities, the
threshold, unknown and multi-item answers as Malinowski's calculate_wups.py scores them, the folder completed with
lexnames, and what evaluation reports without WordNet. Without WordNet these tests fail: CI installs it."""
from __future__ import annotations

import pytest

from vlfuse.data.vqa import VQAQuestion, VQASet
from vlfuse.errors import DataError
from vlfuse.evaluation.vqa import wups_metrics
from vlfuse.metrics.wups import DEBIAN_WORDNET, LEXNAMES, Wups

DOG_CAT = 0.8571428571428571     # NLTK's wup_similarity(dog.n.01, cat.n.01) in WordNet 3.0 (both 2 below carnivore)
TABLE_CHAIR = 16 / 19            # the best pair of their noun senses: table.n.02, chair.n.01 (both furniture)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("wordnet-cache")


@pytest.fixture(scope="module")
def wups(cache):
    return Wups.from_wordnet(cache_dir=cache)


def test_dog_and_cat_are_close_but_below_0_9(wups):
    assert wups.similarity("dog", "cat") == pytest.approx(DOG_CAT)
    assert wups.score("cat", "dog", threshold=0.0) == pytest.approx(DOG_CAT)
    assert wups.score("cat", "dog", threshold=0.9) == pytest.approx(0.1 * DOG_CAT)  # down-weighted


def test_identical_answers_score_one_even_outside_wordnet(wups):
    for answer in ("dog", "xyzzy", "fire hydrant"):
        assert wups.score(answer, answer, 0.9) == 1.0 and wups.score(answer, answer, 0.0) == 1.0
    assert wups.score("dogs", "dog", 0.9) == 1.0  # WordNet's morphology: both are dog's synsets


def test_a_similarity_at_the_threshold_is_kept(wups):
    assert wups.similarity("two", "three") == pytest.approx(0.9)
    assert wups.score("two", "three", 0.9) == pytest.approx(0.9)  # only below the threshold is down-weighted
    assert wups.score("2", "two", 0.9) == 1.0  # WordNet knows the digit as a noun of the same synset


def test_a_word_without_a_noun_synset_scores_zero(wups):
    assert wups.score("xyzzy", "dog", 0.0) == 0.0
    assert wups.score("dog", "xyzzy", 0.0) == 0.0
    assert wups.score("fire hydrant", "hydrant", 0.0) == 0.0  # a space does not split: no noun "fire hydrant"


def test_multi_item_answers_take_the_worse_direction(wups):
    assert wups.score("chair, table", "table,chair", 0.9) == 1.0  # a set of items: order and spaces do not matter
    # reference [chair] is in the prediction, but the predicted "table" is only near "chair"
    assert wups.score("chair,table", "chair", 0.0) == pytest.approx(TABLE_CHAIR)
    assert wups.score("chair,table", "chair", 0.9) == pytest.approx(0.1 * TABLE_CHAIR)
    assert wups.score("dog,xyzzy", "dog", 0.0) == 0.0  # a product: one unmatched item zeroes it


def test_mean_over_a_set(wups):
    assert wups.mean(["dog", "cat", "xyzzy"], ["dog", "dog", "dog"], 0.0) == pytest.approx((1 + DOG_CAT) / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        wups.mean(["dog", "cat"], ["dog"])


def test_the_lexnames_folder_is_built_once_and_reused(wups, cache):
    folders = list(cache.iterdir())
    assert [f.name.startswith("wordnet-") for f in folders] == [True]
    lexnames = folders[0] / "lexnames"
    assert len(lexnames.read_text().splitlines()) == len(LEXNAMES) == 45
    stamp = lexnames.stat().st_mtime_ns
    again = Wups.from_wordnet(DEBIAN_WORDNET, cache_dir=cache)
    assert list(cache.iterdir()) == folders and lexnames.stat().st_mtime_ns == stamp
    # the lexicographer file numbers name the right files
    assert [again.wordnet.synset(s).lexname() for s in ("entity.n.01", "dog.n.01", "run.v.01", "good.a.01")] == [
        "noun.Tops", "noun.animal", "verb.motion", "adj.all"]


def test_a_complete_folder_is_read_as_it_is(wups, cache, tmp_path):
    complete = next(cache.iterdir())
    other_cache = tmp_path / "unused"
    assert Wups.from_wordnet(complete, cache_dir=other_cache).similarity("dog", "cat") == pytest.approx(DOG_CAT)
    assert not other_cache.exists()


def test_a_folder_without_wordnet_says_what_to_install(tmp_path):
    (tmp_path / "data.noun").write_text("")
    with pytest.raises(DataError, match=r"no WordNet dictionary in .*index\.noun.*apt-get install wordnet-base.*"
                                        r"pip install nltk"):
        Wups.from_wordnet(tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="no WordNet folder .*nowhere: install WordNet with `apt-get install"):
        Wups.from_wordnet(tmp_path / "nowhere", cache_dir=tmp_path / "cache")


def test_evaluation_reports_wups_or_why_not(wups, cache, tmp_path):
    data = VQASet(["a.jpg"], [VQAQuestion(0, "what animal?", ["dog", "cat", "dog"]),
                              VQAQuestion(0, "how many?", ["two"])])
    metrics = wups_metrics(data, ["cat", "2"], wordnet=next(cache.iterdir()))
    assert metrics == {"wups_0.9": pytest.approx((0.1 * DOG_CAT + 1) / 2), "wups_0.0": pytest.approx((DOG_CAT + 1) / 2)}
    missing = wups_metrics(data, ["cat", "2"], wordnet=tmp_path)
    assert list(missing) == ["wups"] and missing["wups"].startswith("not computed: no WordNet dictionary in")
