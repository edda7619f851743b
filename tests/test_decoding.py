"""Decoding (vlfuse.generation): greedy == beam 1, batched == unbatched, n-gram blocking, max_len, top-p, sampling
seeded per image; and a caption depends only on the photo, the model and the decoding options."""
import json
import math

import pytest
import torch
from conftest import flickr_or_skip

from vlfuse.errors import ConfigError
from vlfuse.generation import DecodeConfig, content_seeds, generate

PAD, BOS, EOS = 0, 1, 2
V = 10  # 0 pad, 1 bos, 2 eos, 3 unk, 4..9 words


def table_step(table):
    """A toy model: next-token probabilities depend only on the last token (``table[last] -> {token: p}``)."""
    def step(tokens, state):
        rows = []
        for last in tokens[:, -1].tolist():
            p = torch.full((V,), 1e-6)
            for tok, prob in table.get(last, table.get("default", {})).items():
                p[tok] = prob
            rows.append((p / p.sum()).log())
        return torch.stack(rows), state
    return step


def state_for(batch):
    return {"x": torch.zeros(batch, 1)}


def test_beam_finds_a_better_sequence_than_greedy():
    # greedy takes the likelier first word (4) and is then stuck with a flat continuation;
    # beam 2 keeps word 5, which ends the caption with probability 0.9
    table = {BOS: {4: 0.6, 5: 0.4},
             4: {EOS: 0.25, 6: 0.15, 7: 0.15, 8: 0.15, 9: 0.15, 3: 0.15},
             5: {EOS: 0.9, 6: 0.1},
             "default": {EOS: 1.0}}
    step = table_step(table)
    (g_ids, g_score), = generate(step, state_for(1), 1, DecodeConfig(strategy="greedy", no_repeat_ngram=0))
    (b_ids, b_score), = generate(step, state_for(1), 1, DecodeConfig(strategy="beam", beam_size=2, no_repeat_ngram=0))
    assert g_ids == [4] and g_score == pytest.approx(math.log(0.6) + math.log(0.25), abs=1e-4)
    assert b_ids == [5] and b_score == pytest.approx(math.log(0.4) + math.log(0.9), abs=1e-4)
    assert b_score > g_score
    (b1_ids, b1_score), = generate(step, state_for(1), 1, DecodeConfig(strategy="beam", beam_size=1, no_repeat_ngram=0))
    assert (b1_ids, b1_score) == (g_ids, pytest.approx(g_score, abs=1e-6))


def random_table(seed):
    """A toy model over words 3..9 (3 is an ordinary word here) with random next-word probabilities."""
    gen = torch.Generator().manual_seed(seed)
    table = {}
    for last in [BOS] + list(range(3, V)):
        p = torch.rand(V - 2, generator=gen) ** 3  # peaked: a few likely words per context
        table[last] = {tok: float(x) for tok, x in zip([EOS] + list(range(3, V)), p / p.sum())}
    return table


def best_sequence(table, max_len, allowed=lambda seq: True):
    """Brute force: the most probable caption (words 3..9, then <eos>) of at most ``max_len`` words that
    ``allowed`` accepts, with its log-probability."""
    import itertools
    best = (None, float("-inf"))
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(3, V), repeat=n):
            if not allowed(seq):
                continue
            score, last = 0.0, BOS
            for tok in seq + (EOS,):
                score += math.log(table[last][tok])
                last = tok
            if score > best[1]:
                best = (list(seq), score)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constrained_beam_search_finds_the_best_caption_that_includes_a_marked_word(seed):
    table, step = random_table(seed), table_step(random_table(seed))
    cfg = DecodeConfig(strategy="beam", beam_size=400, max_len=3, no_repeat_ngram=0)  # wide enough to be exact
    free_ids, free_score = best_sequence(table, 3)
    assert generate(step, state_for(1), 1, cfg)[0] == (free_ids, pytest.approx(free_score, abs=1e-4))
    # mark two words the best free caption does not use: the caption must include one of them
    marked = [w for w in range(3, V) if w not in free_ids][:2]
    must = torch.zeros(1, V, dtype=torch.bool)
    must[0, marked] = True
    want_ids, want_score = best_sequence(table, 3, lambda seq: any(w in seq for w in marked))
    (ids, score), = generate(step, state_for(1), 1, cfg, must_include=must)
    assert (ids, score) == (want_ids, pytest.approx(want_score, abs=1e-4)) and score < free_score
    # a narrow search still includes one; every beam it returns does, best first
    narrow = DecodeConfig(strategy="beam", beam_size=3, max_len=3, no_repeat_ngram=0)
    beams, = generate(step, state_for(1), 1, narrow, must_include=must, all_beams=True)
    assert 1 <= len(beams) <= 3 and all(set(marked) & set(b) for b, _ in beams)
    assert [s for _, s in beams] == sorted((s for _, s in beams), reverse=True)
    assert beams[0][1] <= want_score + 1e-4


def test_constrained_beam_search_leaves_unmarked_rows_and_impossible_words_as_plain_beam_search():
    table = random_table(3)
    step = table_step(table)
    cfg = DecodeConfig(strategy="beam", beam_size=3, max_len=4, no_repeat_ngram=0)
    plain = generate(step, state_for(3), 3, cfg)
    must = torch.zeros(3, V, dtype=torch.bool)
    must[0, [w for w in range(3, V) if w not in plain[0][0]][0]] = True  # row 0 must change
    must[2, PAD] = True  # a word that is never generated cannot be placed: row 2 decodes as if unmarked
    out = generate(step, state_for(3), 3, cfg, must_include=must)
    assert out[0][0] != plain[0][0] and must[0, out[0][0]].any()
    assert out[1:] == [(ids, pytest.approx(s, abs=1e-5)) for ids, s in plain[1:]]
    with pytest.raises(ConfigError, match="beam search"):
        generate(step, state_for(3), 3, DecodeConfig(strategy="greedy"), must_include=must)
    with pytest.raises(ConfigError, match="must_include"):
        generate(step, state_for(3), 3, cfg, all_beams=True)


def test_max_len_is_respected_by_every_strategy():
    step = table_step({"default": {4: 0.5, 5: 0.3, EOS: 0.01}})  # never wants to stop
    for cfg in [DecodeConfig(strategy="greedy", max_len=5, no_repeat_ngram=0),
                DecodeConfig(strategy="beam", beam_size=3, max_len=5, no_repeat_ngram=0),
                DecodeConfig(strategy="sample", max_len=5, seed=1, no_repeat_ngram=0, top_p=1.0)]:
        out = generate(step, state_for(4), 4, cfg)
        assert [len(ids) for ids, _ in out] == [5] * 4, cfg.strategy
    assert generate(step, state_for(1), 1, DecodeConfig(strategy="greedy", max_len=5, no_repeat_ngram=0))[0][0] == [4] * 5


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_the_unknown_word_is_never_generated_when_its_id_is_given(strategy):
    # the toy model's likeliest word after <bos> is <unk> (3); a caption model passes its id, so a caption never
    # says "<unk>" (which decoded text drops, leaving a hole) but the model's next choice
    step = table_step({BOS: {3: 0.7, 4: 0.3}, 4: {EOS: 1.0}, 3: {EOS: 1.0}, "default": {EOS: 1.0}})
    cfg = DecodeConfig(strategy=strategy, beam_size=2, seed=0, top_p=1.0, no_repeat_ngram=0)
    rows = generate(step, state_for(8), 8, cfg, unk=3)
    assert [ids for ids, _ in rows] == [[4]] * 8
    assert rows[0][1] == pytest.approx(math.log(0.3), abs=1e-4)  # scored as the model scores it, not renormalised
    if strategy != "sample":  # without its id, <unk> is an ordinary word (and the likeliest here)
        assert generate(step, state_for(1), 1, cfg)[0][0] == [3]


def test_caption_models_pass_their_unknown_word_to_the_decoder(model_and_features, monkeypatch):
    import vlfuse.tasks.caption.model as caption_model
    from vlfuse.data.tokenizer import UNK

    seen = {}

    def spy(*args, **kwargs):
        seen["unk"] = kwargs.get("unk")
        return generate(*args, **kwargs)

    monkeypatch.setattr(caption_model, "generate", spy)
    cap, feats = model_and_features
    cap.model.generate(feats, DecodeConfig(strategy="greedy"))
    assert seen["unk"] == UNK


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_ngram_blocking_really_blocks(strategy):
    # the toy model loves the loop 4 5 4 5 ...; with no_repeat_ngram=2 no bigram may occur twice
    step = table_step({BOS: {4: 0.9, 6: 0.1}, 4: {5: 0.9, 6: 0.1}, 5: {4: 0.9, 7: 0.1},
                       "default": {4: 0.4, 5: 0.3, 8: 0.2, 9: 0.1}})
    base = dict(strategy=strategy, max_len=10, seed=0, top_p=0.5)
    free, = generate(step, state_for(1), 1, DecodeConfig(no_repeat_ngram=0, **base))
    assert free[0][:6] == [4, 5, 4, 5, 4, 5]
    for n in (2, 3):
        ids, _ = generate(step, state_for(1), 1, DecodeConfig(no_repeat_ngram=n, **base))[0]
        grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        assert len(grams) == len(set(grams)), (n, ids)
        assert len(ids) >= 3  # blocking changes the continuation, it does not just stop decoding


def test_top_p_is_reproducible_and_stays_in_the_nucleus():
    # words 4..7 with p = .5 .3 .15 .05: top_p 0.7 keeps {4, 5}; top_p 0.85 keeps {4, 5, 6}
    step = table_step({BOS: {4: 0.5, 5: 0.3, 6: 0.15, 7: 0.05}, "default": {EOS: 1.0}})
    cfg = DecodeConfig(strategy="sample", top_p=0.7, max_len=1, seed=123, no_repeat_ngram=0)
    first = [ids[0] for ids, _ in generate(step, state_for(400), 400, cfg)]
    again = [ids[0] for ids, _ in generate(step, state_for(400), 400, cfg)]
    assert first == again
    assert set(first) == {4, 5}
    assert 0.55 < first.count(4) / 400 < 0.70  # renormalised nucleus: 0.5 / 0.8 = 0.625
    other_seed = [ids[0] for ids, _ in generate(step, state_for(400), 400, DecodeConfig(**{**cfg.__dict__, "seed": 7}))]
    assert other_seed != first
    wider = DecodeConfig(strategy="sample", top_p=0.85, max_len=1, seed=1, no_repeat_ngram=0)
    assert set(ids[0] for ids, _ in generate(step, state_for(400), 400, wider)) == {4, 5, 6}


def test_sampling_without_a_nucleus_follows_the_distribution():
    # top_p = 1 samples from the whole distribution (no sort): frequencies match p, tokens of p = 0 never come
    step = table_step({BOS: {4: 0.5, 5: 0.3, 6: 0.15, 7: 0.05}, "default": {EOS: 1.0}})
    cfg = DecodeConfig(strategy="sample", top_p=1.0, max_len=1, seed=5, no_repeat_ngram=0)
    picks = [ids[0] for ids, _ in generate(step, state_for(4000), 4000, cfg)]
    assert set(picks) == {4, 5, 6, 7}
    for token, p in {4: 0.5, 5: 0.3, 6: 0.15, 7: 0.05}.items():
        assert abs(picks.count(token) / 4000 - p) < 0.03, (token, picks.count(token))


def test_sampling_seeded_per_image_does_not_depend_on_the_batch():
    """Each image's rows draw from its own seed: an image's samples are the same alone, in any batch, in any
    position, and its first samples are the same whether few or many are drawn."""
    step = table_step({BOS: {4: 0.4, 5: 0.3, 6: 0.2, 7: 0.1}, "default": {4: 0.3, 5: 0.3, 8: 0.2, EOS: 0.2}})
    cfg = DecodeConfig(strategy="sample", top_p=1.0, max_len=6, no_repeat_ngram=0)

    def draw(seeds, rows):
        out = generate(step, state_for(len(seeds) * rows), len(seeds) * rows, cfg, seeds=seeds)
        return [[ids for ids, _ in out[i * rows:(i + 1) * rows]] for i in range(len(seeds))]

    alone = [draw([s], 4)[0] for s in (11, 22, 33)]
    assert draw([11, 22, 33], 4) == alone
    assert draw([33, 11], 4) == [alone[2], alone[0]]
    assert draw([22, 22], 4) == [alone[1], alone[1]]  # the same image twice: the same samples
    assert draw([22], 2)[0] == alone[1][:2]
    assert len({tuple(map(tuple, a)) for a in alone}) == 3  # and different seeds draw differently
    with pytest.raises(ConfigError, match="one per image"):
        generate(step, state_for(5), 5, cfg, seeds=[1, 2])


def test_greedy_first_decodes_each_images_first_row_greedily_beside_its_samples():
    step = table_step({BOS: {4: 0.4, 5: 0.35, 6: 0.25}, 4: {7: 0.6, 8: 0.4}, "default": {EOS: 0.6, 9: 0.4}})
    cfg = DecodeConfig(strategy="sample", top_p=1.0, max_len=5, no_repeat_ngram=0)
    greedy = generate(step, state_for(1), 1, DecodeConfig(strategy="greedy", max_len=5, no_repeat_ngram=0))[0]
    out = generate(step, state_for(2 * 8), 2 * 8, cfg, seeds=[1, 2], greedy_first=True)
    for first in (out[0], out[8]):
        assert first[0] == greedy[0] and first[1] == pytest.approx(greedy[1])
    assert {tuple(ids) for ids, _ in out[1:8]} != {tuple(greedy[0])}  # the other rows are samples
    assert out[1:8] == generate(step, state_for(8), 8, cfg, seeds=[1], greedy_first=True)[1:]


def test_content_seeds_depend_on_the_content_and_the_seed_only():
    pixels = torch.randn(3, 3, 8, 8)
    seeds = content_seeds(pixels, 0)
    assert seeds == content_seeds(pixels.clone(), 0) and len(set(seeds)) == 3
    assert content_seeds(pixels[[2, 0]], 0) == [seeds[2], seeds[0]]  # per input, whatever the batch
    assert content_seeds(pixels, 1) != seeds
    assert content_seeds(pixels, None) != content_seeds(pixels, None)  # no seed: fresh samples every call
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_decode_config_override_keeps_what_is_not_given():
    base = DecodeConfig(strategy="greedy", max_len=12, no_repeat_ngram=2)
    assert base.override() == base and base.override(beam=None, max_len=None) == base
    assert base.override(beam=4) == DecodeConfig(strategy="beam", beam_size=4, max_len=12, no_repeat_ngram=2)
    assert base.override(beam=1).strategy == "greedy" and base.override(beam=1).width == 1
    assert base.override(beam=4).width == 4 and base.override(beam=4, strategy="sample").width == 1
    assert base.override(top_p=0.5, strategy="sample").top_p == 0.5
    with pytest.raises(ConfigError, match="beam_wdith"):
        base.override(beam_wdith=3)
    with pytest.raises(ConfigError, match="beam_size"):
        base.override(beam=0)
    assert len({base, base.override(), base.override(beam=2)}) == 2  # hashable: the service batches by it


def test_decode_config_rejects_bad_values():
    for bad in [dict(strategy="nucleus"), dict(beam_size=0), dict(max_len=0), dict(top_p=0.0), dict(temperature=0)]:
        with pytest.raises(ConfigError):
            DecodeConfig(**bad)


# -- on a real (tiny, trained) caption model ------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_features(trained_run):
    from conftest import FLICKR

    from vlfuse.tasks.caption.pipeline import Captioner

    cap = Captioner.from_pretrained(trained_run / "best")
    names = (FLICKR / "val.txt").read_text().split()[:5]
    feats = cap.encode(cap.preprocess([FLICKR / "images" / n for n in names]))
    return cap, feats


@pytest.mark.parametrize("ngram", [0, 3])
def test_greedy_equals_beam_width_1_on_a_real_model(model_and_features, ngram):
    cap, feats = model_and_features
    greedy = cap.model.generate(feats, DecodeConfig(strategy="greedy", no_repeat_ngram=ngram))
    beam1 = cap.model.generate(feats, DecodeConfig(strategy="beam", beam_size=1, no_repeat_ngram=ngram))
    assert [ids for ids, _ in greedy] == [ids for ids, _ in beam1]
    assert [s for _, s in greedy] == pytest.approx([s for _, s in beam1], abs=1e-4)
    assert all(len(ids) >= 1 for ids, _ in greedy)


def test_batched_beam_search_equals_unbatched(model_and_features):
    cap, feats = model_and_features
    cfg = DecodeConfig(strategy="beam", beam_size=3)
    batched = cap.model.generate(feats, cfg)
    single = [cap.model.generate(feats.index_select(torch.tensor([i])), cfg)[0] for i in range(len(batched))]
    assert [ids for ids, _ in batched] == [ids for ids, _ in single]
    assert [s for _, s in batched] == pytest.approx([s for _, s in single], abs=1e-4)
    # and beam search never scores below greedy on the same model
    greedy = cap.model.generate(feats, DecodeConfig(strategy="greedy"))
    assert all(b >= g - 1e-4 for (_, b), (_, g) in zip(batched, greedy))


def test_beam_search_copies_only_the_state_that_changes(model_and_features, monkeypatch):
    """Entries the step never replaces (the image memory) are not reordered; results equal a full reorder."""
    import vlfuse.generation as decoding

    cap, feats = model_and_features
    cfg = DecodeConfig(strategy="beam", beam_size=4)
    kept, original = [], decoding.reorder_state

    def spy(state, index, keep=frozenset()):
        kept.append(set(keep))
        return original(state, index, keep)

    monkeypatch.setattr(decoding, "reorder_state", spy)
    fast = cap.model.generate(feats, cfg)
    assert any(kept) and all("grid" in k for k in kept)  # the image grid is never copied, not even per beam
    # the cross-attention keys/values stay one row per image: the beams of an image read them together
    rows, step = [], cap.model.decoder.step
    monkeypatch.setattr(cap.model.decoder, "step", lambda t, s: (rows.append((len(t), len(s["x0mk"]))), step(t, s))[1])
    cap.model.generate(feats, cfg)
    n = feats.pooled.shape[0]
    assert set(rows) == {(n * 4, n)}
    monkeypatch.undo()
    monkeypatch.setattr(decoding, "reorder_state", spy)
    monkeypatch.setattr(decoding, "reorder_state", lambda state, index, keep=frozenset(): original(state, index))
    full = cap.model.generate(feats, cfg)
    assert [ids for ids, _ in fast] == [ids for ids, _ in full]
    assert [s for _, s in fast] == pytest.approx([s for _, s in full], abs=1e-5)


# -- the shipped model: a caption depends only on the photo, the model and the decoding options ------------------

@pytest.fixture(scope="module")
def shipped_and_photos():
    from vlfuse.tasks.caption.pipeline import Captioner

    flickr = flickr_or_skip()
    names = (flickr / "val.txt").read_text().split()[:16]
    return Captioner.from_pretrained("flickr8k-caption"), [str(flickr / "images" / n) for n in names]


@pytest.mark.parametrize("options", [{}, {"beam": 1}, {"strategy": "sample", "seed": 3}],
                         ids=["default-rerank", "greedy", "sample"])
def test_a_caption_does_not_depend_on_the_batch(shipped_and_photos, options):
    cap, photos = shipped_and_photos
    alone = cap(photos, batch_size=1, **options)
    assert cap(photos, batch_size=3, **options) == alone
    assert cap(photos, batch_size=16, **options) == alone
    assert cap([photos[5], photos[0], photos[5]], **options) == [alone[5], alone[0], alone[5]]  # a photo twice


def test_cli_and_python_api_give_the_same_captions(shipped_and_photos, capsys):
    from vlfuse.cli.main import main

    cap, photos = shipped_and_photos
    assert main(["caption", *photos[:5], "--json", "--batch-size", "2"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["caption"] for p in printed] == cap(photos[:5])
