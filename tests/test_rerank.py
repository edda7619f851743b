"""Consensus reranking: CIDEr-D/BLEU consensus, the caption memory, the retriever's image tower alone, the
``rerank`` strategy of a Captioner, ``vlfuse memory``, and the shipped model's memory."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import flickr_or_skip, photo

from vlfuse.data.captions import read_captions
from vlfuse.errors import ConfigError, ModelNotFoundError
from vlfuse.generation import DecodeConfig, generate
from vlfuse.hub import resolve_model
from vlfuse.metrics.cider_d import CiderD
from vlfuse.metrics.consensus import ConsensusScorer
from vlfuse.tasks.caption.pipeline import Captioner
from vlfuse.tasks.caption.rerank import CaptionDecodeConfig, CaptionMemory, RerankConfig, attach_memory, shared_depth

REFS = [["a dog runs on the grass", "a brown dog running in a field", "the dog is running"],
        ["two children play in the snow", "kids playing in snow", "two kids in the snow"],
        ["a man rides a bike on a road", "a cyclist on the road", "a man riding a bicycle"]]


def test_cider_d_similarity_with_any_references_equals_its_score_against_an_images_references():
    cider = CiderD(REFS)
    for i, refs in enumerate(REFS):
        for hyp in ("a dog running on grass", "two kids play in the snow", "a man on a bike", ""):
            assert cider.similarity(hyp, refs) == pytest.approx(cider.score(i, hyp), abs=1e-12)
    assert cider.similarity("a dog", []) == 0.0
    hyps = ["a dog running on grass", "two kids play in the snow", "a a a a", "", "a man riding a bike on the road"]
    for refs in REFS + [REFS[0] + REFS[2]]:
        many = cider.similarities(hyps, refs)
        one_by_one = [cider.similarity(h, refs) for h in hyps]  # one hypothesis per index of the references
        assert many == pytest.approx(one_by_one, abs=1e-12) and max(many) > 1.0


def test_bleu_against_shared_references_equals_bleu_per_caption():
    pytest.importorskip("pycocoevalcap")
    from vlfuse.metrics.sentence_bleu import SentenceBleu, bleu_against

    hyps = ["a dog running on grass", "a dog", "the dog is running in a field of grass", "two kids in the snow"]
    for refs in REFS:
        together = bleu_against(hyps, refs)  # the references cooked once for all four
        assert together == pytest.approx([SentenceBleu([refs]).score(0, h) for h in hyps], abs=1e-12)
        assert together == pytest.approx([bleu_against([h], refs)[0] for h in hyps], abs=1e-12)
    assert bleu_against([REFS[0][1], "a cat"], REFS[0]) == pytest.approx([1.0, 0.0], abs=1e-6)  # a reference itself
    assert bleu_against([], REFS[0]) == []


def test_consensus_scorer_prefers_the_candidate_the_references_agree_with():
    pytest.importorskip("pycocoevalcap")
    scorer = ConsensusScorer(CiderD(REFS), bleu_weight=2.0)
    candidates = ["two kids play in the snow", "a dog runs in a field", "a dog dog dog"]
    scores = scorer.scores(candidates, REFS[0])
    assert scorer.choose(candidates, REFS[0]) == 1 and scores[1] > scores[2] and scores[1] > scores[0]
    assert scorer.choose(candidates, REFS[1]) == 0
    plain = ConsensusScorer(CiderD(REFS), bleu_weight=0.0).scores(candidates, REFS[0])
    assert all(s >= p for s, p in zip(scores, plain)) and scores != plain  # the BLEU term adds
    assert scorer.choose(["x", "y"], []) == 0  # nothing to agree with: the first (greedy) candidate
    with pytest.raises(ValueError, match="bleu_weight"):
        ConsensusScorer(CiderD(REFS), bleu_weight=-1)


def test_caption_memory_saves_loads_and_finds_nearest(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    texts = [f"caption {i}" for i in range(6)]
    memory = CaptionMemory(texts, emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    memory.save(tmp_path)
    back = CaptionMemory.load(tmp_path)
    assert back.texts == texts and back.groups.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(back.embeddings, emb, atol=1e-3)  # stored in fp16
    assert back.references() == [["caption 0", "caption 1"], ["caption 2", "caption 3"], ["caption 4", "caption 5"]]
    near = back.nearest(emb[[3, 5]], k=2)
    assert [row[0] for row in near] == ["caption 3", "caption 5"] and len(near[0]) == 2
    assert len(back.nearest(emb[:1], k=50)[0]) == 6
    with pytest.raises(ConfigError, match="one embedding"):
        CaptionMemory(texts, emb[:5], torch.zeros(6))
    with pytest.raises(ConfigError, match="neighbours"):
        RerankConfig(neighbours=0)


def test_retrieval_image_tower_alone_embeds_as_the_whole_retriever():
    pytest.importorskip("tokenizers")
    from vlfuse.tasks.retrieval.pipeline import RetrievalImageTower, Retriever

    tower, full = RetrievalImageTower.from_pretrained("flickr8k-retrieval"), Retriever.from_pretrained("flickr8k-retrieval")
    pixels = torch.randn(3, 3, 224, 224)
    # the tower is the retriever's image side without its concept term (which only search uses)
    assert torch.allclose(tower(pixels), torch.from_numpy(full.without_concepts().embed_pixels(pixels)), atol=1e-6)
    assert not any(name.startswith("text") for name, _ in tower.named_parameters())
    assert tower.digest() == RetrievalImageTower.from_pretrained("flickr8k-retrieval").digest()


def test_shipped_caption_model_and_retriever_share_one_pass_through_their_common_cnn_layers():
    """flickr8k-caption tunes EfficientNet-Lite0's last block; flickr8k-retrieval keeps it frozen: the 18 layers
    before are the same, and one pass through them gives both models' outputs, as each model's own pass does and
    the same for an image whatever its batch."""
    pytest.importorskip("tokenizers")
    cap = Captioner.from_pretrained("flickr8k-caption")
    reranker = cap.reranker
    assert shared_depth(cap.model.vision, reranker.tower.vision) == 18 and reranker.image_pass is not None
    pixels = torch.randn(3, 3, 224, 224).clamp(-1, 1)
    features, embeddings, pooled = reranker.image_pass(pixels)
    own = cap.model.vision(pixels)
    assert torch.allclose(features.grid, own.grid, atol=1e-3) and torch.allclose(features.pooled, own.pooled, atol=1e-4)
    alone, alone_pooled = reranker.tower.encode(pixels)
    assert torch.allclose(embeddings, alone, atol=1e-4) and torch.allclose(pooled, alone_pooled, atol=1e-4)
    assert torch.allclose(pooled, reranker.tower.vision(pixels).pooled, atol=1e-3)  # the frozen CNN's own features
    one = reranker.image_pass(pixels[1:2])
    assert torch.equal(one[0].grid, features.grid[1:2]) and torch.equal(one[1], embeddings[1:2])
    assert torch.equal(one[2], pooled[1:2])


@pytest.mark.parametrize("model, photos", [("flickr8k-caption", 60), ("flickr8k-caption-zh", 20)])
def test_reranked_captions_and_scores_do_not_depend_on_the_thread_count(model, photos):
    """STYLE 6: a shipped model's default (reranking) on val photos, built and run with 1 and with 2 threads,
    gives the same captions and the same scores, to the bit. (With the own CNN layers in PyTorch, 7 of the English
    model's 60 scores differed, by up to 0.018. The Chinese model's CNN is all shared: it has no own layers.)"""
    pytest.importorskip("tokenizers")
    data = flickr_or_skip()
    paths = [data / "images" / name for name in (data / "val.txt").read_text().split()[:photos]]
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cap = Captioner.from_pretrained(model)
            results[threads] = [(r.caption, r.score) for _, r, _ in cap.caption_files(paths, cap.decode_config())]
    finally:
        torch.set_num_threads(before)
    assert len(results[1]) == photos and results[1] == results[2]


@pytest.fixture(scope="module")
def reranking_model(trained_run, tmp_path_factory):
    """The tiny trained caption model with a memory of its training captions embedded by flickr8k-retrieval."""
    pytest.importorskip("tokenizers")
    from vlfuse.cli.main import main

    model = tmp_path_factory.mktemp("rerank") / "model"
    shutil.copytree(trained_run / "best", model)
    assert main(["memory", "--model", str(model), "--data", str(flickr_or_skip()), "--split", "val",
                 "--limit", "40", "--neighbours", "5"]) == 0
    return model


def test_memory_command_writes_a_memory_the_model_reranks_with(reranking_model, tmp_path):
    raw = json.loads((reranking_model / "config.json").read_text())
    assert raw["rerank"]["neighbours"] == 5 and raw["rerank"]["tower_digest"]
    assert raw["decode"]["strategy"] != "rerank"  # without --default the model's default is unchanged
    cap = Captioner.from_pretrained(reranking_model)
    assert len(cap.reranker.memory) == 5 * 40  # every caption of the first 40 val images
    images = [photo(tmp_path / f"p{i}.jpg", seed=i) for i in range(3)]
    pixels = cap.preprocess(images)
    features, neighbours, concepts = cap.reranker.encode(pixels)  # one pass through the CNN layers both share
    assert concepts is None  # not asked for (the default: concepts=False)
    g_tokens = [r.tokens for r in cap.caption_features(features, cap.decode_config(strategy="greedy"))]
    # no samples: the greedy caption is the only candidate
    assert cap(images, strategy="rerank", candidates=0) == [" ".join(t) for t in g_tokens]
    # with samples, the chosen caption agrees with the image's neighbours at least as well as the greedy one
    reranked = cap(images, strategy="rerank", candidates=6, temperature=1.0, seed=0)
    tokens = [r.tokens for r in cap.caption_pixels(pixels, cap.decode_config(strategy="rerank", candidates=6,
                                                                               temperature=1.0, seed=0))]
    scorer = cap.reranker.scorer
    for chosen, g, refs in zip(tokens, g_tokens, neighbours):
        a, b = scorer.scores([" ".join(chosen), " ".join(g)], refs)
        assert a >= b
    assert all(c.strip() for c in reranked)
    # saved elsewhere, the memory goes along
    cap.save_pretrained(tmp_path / "copy")
    assert Captioner.from_pretrained(tmp_path / "copy")(images, strategy="rerank", candidates=6, temperature=1.0,
                                                         seed=0) == reranked


def test_memory_command_measures_how_its_captions_name_concepts_when_asked(trained_run, tmp_path):
    pytest.importorskip("tokenizers")
    from vlfuse.cli.main import main
    from vlfuse.tasks.caption.naming import ConceptNaming

    model = tmp_path / "model"
    shutil.copytree(trained_run / "best", model)
    assert main(["memory", "--model", str(model), "--data", str(flickr_or_skip()), "--split", "val",
                 "--limit", "40", "--neighbours", "5", "--name-concepts", "0.5"]) == 0
    raw = json.loads((model / "config.json").read_text())
    assert "name_concepts" not in raw["decode"]  # without --default the model's default is unchanged
    naming = ConceptNaming.load(model)
    # the 40 photos' concepts at >= 0.3, counted; none reaches 10 photos in so few, so each names itself
    assert naming is not None and 0 < sum(naming.photos.values()) <= 40 * 3 and naming.named_by == {}
    cap = Captioner.from_pretrained(model)
    images = [str(flickr_or_skip() / "images" / n) for n in (flickr_or_skip() / "val.txt").read_text().split()[:6]]
    seen = cap.reranker.encode(cap.preprocess(images), concepts=True)
    assert seen.concepts.shape == (6, 1000) and torch.allclose(seen.concepts.sum(1), torch.ones(6), atol=1e-4)
    words = [cap.reranker.words_to_name(c, cap.tokenizer.index, 0.3) for c in cap.reranker.concept_words(seen.concepts)]
    assert any(words)  # some of the six have a concept at >= 0.3 whose word is in the tiny model's vocabulary
    named = cap(images, strategy="rerank", candidates=4, temperature=1.0, seed=0, name_concepts=0.3)
    for caption, must in zip(named, words):
        assert not must or set(must) & set(caption.split()), (caption, must)
    cap.save_pretrained(tmp_path / "copy")  # saved elsewhere, the naming table goes along with the memory
    assert ConceptNaming.load(tmp_path / "copy") == naming


def test_rerank_errors_name_the_problem(trained_run, reranking_model, tmp_path):
    plain = Captioner.from_pretrained(trained_run / "best")
    with pytest.raises(ConfigError, match="no caption memory"):
        plain(str(photo(tmp_path / "a.jpg")), strategy="rerank")
    with pytest.raises(ConfigError, match="rerank"):  # a caption task's strategy: generate runs none
        generate(lambda t, s: None, {"x": torch.zeros(1)}, 1, CaptionDecodeConfig(strategy="rerank"))
    with pytest.raises(ConfigError, match="'rerank'"):
        DecodeConfig(strategy="rerank")
    with pytest.raises(ConfigError, match="candidates"):
        CaptionDecodeConfig(candidates=-1)
    cap = Captioner.from_pretrained(reranking_model)
    with pytest.raises(ConfigError, match="caption_pixels"):
        cap.caption_features(cap.encode(cap.preprocess([str(photo(tmp_path / "a.jpg"))])),
                             cap.decode_config(strategy="rerank"))
    # a memory embedded with another retriever version is refused, not silently used
    other = tmp_path / "other"
    shutil.copytree(reranking_model, other)
    raw = json.loads((other / "config.json").read_text())
    raw["rerank"]["tower_digest"] = "0123456789abcdef"
    (other / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelNotFoundError, match="another version"):
        Captioner.from_pretrained(other).reranker
    (other / "memory.txt").unlink()
    with pytest.raises(ModelNotFoundError, match="memory.txt"):
        Captioner.from_pretrained(other).reranker
    with pytest.raises(ModelNotFoundError, match="not a caption model"):  # refused before anything is written
        attach_memory(resolve_model("flickr8k-retrieval"), None, RerankConfig())


def test_shipped_model_reranks_by_default_and_its_memory_is_its_training_captions():
    flickr = flickr_or_skip()
    cap = Captioner.from_pretrained("flickr8k-caption")
    assert cap.decode_defaults.strategy == "rerank" and cap.decode_defaults.seed is not None
    memory = cap.reranker.memory
    assert len(memory) == 30000 and int(memory.groups.max()) == 5999
    train = read_captions(flickr, split="train")  # the train split only: val is what the model is judged on
    tokenised = [[" ".join(cap.tokenizer.tokenize(c)) for c in caps] for caps in train.captions]
    assert memory.texts[:5] == tokenised[0] and memory.texts[-5:] == tokenised[-1]
    assert memory.texts[2500:2505] == tokenised[500]


def test_service_decodes_greedily_unless_started_with_caption_rerank():
    from vlfuse.serving.models import DISABLED, ModelChoice, ServiceModels

    plain = ServiceModels.load(ModelChoice(), ModelChoice(DISABLED), ModelChoice(DISABLED))
    assert plain.captioner.decode_defaults.strategy == "greedy" and plain.captioner._reranker is None
    rerank = ServiceModels.load(ModelChoice(), ModelChoice(DISABLED), ModelChoice(DISABLED),
                                caption_rerank=True)
    assert rerank.captioner.decode_defaults.strategy == "rerank" and rerank.captioner._reranker is not None
    assert rerank.describe()["caption"]["decode"]["strategy"] == "rerank"


def test_training_config_memory_section_gives_the_best_checkpoint_a_memory(tmp_path, feature_cache):
    """``memory: {build: true}`` in a training config: the run's last step embeds the training captions and makes
    rerank the best checkpoint's decoding default."""
    pytest.importorskip("tokenizers")
    from conftest import tiny_config, write_config

    from vlfuse.cli.main import main

    cfg = tiny_config(tmp_path, feature_cache, epochs=1)
    cfg["memory"] = {"build": True, "rerank": {"neighbours": 7}, "candidates": 3}
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", cfg))]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    cap = Captioner.from_pretrained(summary["best_dir"])
    assert cap.decode_defaults.strategy == "rerank" and cap.decode_defaults.candidates == 3
    assert cap.rerank_config.neighbours == 7 and len(cap.reranker.memory) == 5 * summary["train_images"]
    assert summary["memory_minutes"] > 0
    assert cap(str(photo(tmp_path / "x.jpg"))).strip()
    cfg["memory"] = {"build": True, "rerank": {"neighbours": 0}}
    assert main(["train", "--config", str(write_config(tmp_path / "bad.json", cfg))]) == 2  # names the bad key


def test_without_pycocoevalcap_only_a_memory_that_scores_bleu_falls_back_to_greedy(monkeypatch, reranking_model,
                                                                                     tmp_path):
    """A base install (no [train] extra) reranks with the shipped model, whose consensus is CIDEr-D alone; a memory
    that also scores BLEU-4 (pycocoevalcap's scorer) decodes greedily there, saying why."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycocoevalcap" else real(name, *a))
    assert Captioner.from_pretrained("flickr8k-caption").decode_defaults.strategy == "rerank"
    bleu = tmp_path / "bleu"
    shutil.copytree(reranking_model, bleu)
    raw = json.loads((bleu / "config.json").read_text())
    raw["rerank"]["bleu_weight"], raw["decode"]["strategy"] = 2.0, "rerank"
    (bleu / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="pycocoevalcap"):
        cap = Captioner.from_pretrained(bleu)
    assert cap.decode_defaults.strategy == "greedy"
    with pytest.raises(ConfigError, match="pip install pycocoevalcap"):
        cap.reranker
