"""Caption metrics through pycocoevalcap: keys, sane values, SPICE reported unavailable."""
import shutil

import pytest
from conftest import flickr_or_skip

from vlfuse.metrics.caption import score_captions

REFS = {
    "1.jpg": ["a black dog runs across the green grass", "a dog is running on the grass",
              "the black dog runs through a field"],
    "2.jpg": ["two children play with a ball on the beach", "kids playing ball at the beach",
              "two young kids play on the sand with a ball"],
    "3.jpg": ["a man rides a bicycle down the street", "a cyclist on a city street",
              "a person riding a bike on the road"],
}
KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


UNRELATED = {"1.jpg": "a plate of food on a wooden table", "2.jpg": "an old clock tower at night",
             "3.jpg": "three cats sleeping in a box"}


def test_all_keys_with_the_standard_ptb_tokenizer():
    # one full COCO evaluation (METEOR starts a JVM that loads its paraphrase table: the slow part)
    if shutil.which("java") is None:
        pytest.skip("the PTB tokenizer and METEOR need Java")
    same = score_captions(REFS, {k: v[0] for k, v in REFS.items()})
    assert [k for k in KEYS if isinstance(same.get(k), float)] == KEYS, same
    assert same["images"] == 3
    assert "SPICE" in same["unavailable"] and "unavailable" in same["unavailable"]["SPICE"]
    assert "SPICE" not in same or not isinstance(same["SPICE"], float)
    assert same["BLEU-1"] > 0.95 and same["BLEU-4"] > 0.9 and same["ROUGE-L"] > 0.9 and same["METEOR"] > 0.5
    assert same["CIDEr"] > 2.0  # pycocoevalcap's scale (x10 tf-idf): a copy of a reference scores high


def test_identical_hypotheses_score_high_and_unrelated_low():
    metrics = ("BLEU", "ROUGE-L", "CIDEr")
    same = score_captions(REFS, {k: v[0] for k, v in REFS.items()}, metrics=metrics, tokenizer="simple")
    other = score_captions(REFS, UNRELATED, metrics=metrics, tokenizer="simple")
    keys = [k for k in KEYS if k != "METEOR"]
    assert same["BLEU-1"] > 0.95 and same["BLEU-4"] > 0.9 and same["ROUGE-L"] > 0.9 and same["CIDEr"] > 2.0
    assert other["BLEU-4"] < 0.01 and other["CIDEr"] < 0.1 and other["ROUGE-L"] < 0.35
    for k in keys:
        assert 0.0 <= other[k] < same[k]
    assert "SPICE" in other["unavailable"]


def test_metric_subset_and_unmatched_keys():
    scores = score_captions(REFS, {"1.jpg": "a dog runs on the grass", "missing.jpg": "x"}, metrics=("BLEU", "CIDEr"),
                            tokenizer="simple")
    assert scores["images"] == 1 and "METEOR" not in scores and "ROUGE-L" not in scores
    assert 0.5 < scores["BLEU-1"] <= 1.0


def test_cider_d_reward_matches_pycocoevalcap_with_corpus_idf():
    """The SCST reward scorer (idf fixed over a corpus) equals pycocoevalcap's CIDEr-D when the corpus is the
    evaluated set, and gives repetition and empty captions ~0."""
    import re

    from pycocoevalcap.cider.cider import Cider

    from vlfuse.data.captions import read_captions
    from vlfuse.metrics.cider_d import CiderD

    val = read_captions(flickr_or_skip(), split="val").subset(40)
    refs = [[" ".join(re.findall(r"[a-z]+", r.lower())) for r in caps] for caps in val.captions]
    hyps = [refs[(i + 1) % len(refs)][0] if i % 3 else refs[i][0] for i in range(len(refs))]  # some right, most wrong
    ours = [CiderD(refs).score(i, h) for i, h in enumerate(hyps)]
    mean, theirs = Cider().compute_score({str(i): r for i, r in enumerate(refs)},
                                         {str(i): [h] for i, h in enumerate(hyps)})
    assert abs(sum(ours) / len(ours) - mean) < 1e-9 and max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-9
    scorer = CiderD(refs)
    assert scorer.score(0, refs[0][0]) > 1.0 > scorer.score(0, "a a a a a a a a a a") and scorer.score(0, "") == 0.0


def test_sentence_bleu_matches_pycocoevalcaps_per_caption_bleu():
    """SentenceBleu's BLEU-4 equals pycocoevalcap's per-caption BLEU-4 (closest reference length, short and long
    captions included)."""
    import re

    from pycocoevalcap.bleu.bleu import Bleu

    from vlfuse.data.captions import read_captions
    from vlfuse.metrics.sentence_bleu import SentenceBleu

    val = read_captions(flickr_or_skip(), split="val").subset(40)
    refs = [[" ".join(re.findall(r"[a-z]+", r.lower())) for r in caps] for caps in val.captions]
    hyps = [refs[(i + 1) % len(refs)][0] if i % 3 else refs[i][0] for i in range(len(refs))]
    hyps[1], hyps[2] = "a dog", " ".join([refs[2][1]] * 3)  # far too short, far too long
    _, theirs = Bleu(4).compute_score({str(i): r for i, r in enumerate(refs)},
                                      {str(i): [h] for i, h in enumerate(hyps)}, verbose=0)
    ours = [SentenceBleu(refs).score(i, h) for i, h in enumerate(hyps)]
    assert max(abs(a - b) for a, b in zip(ours, theirs[3])) < 1e-12 and max(ours) > 0.5
