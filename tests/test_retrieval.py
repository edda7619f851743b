"""Retrieval: metrics, the persistent image index, the shipped model and the index/search CLI."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vlfuse.cli.main import main
from vlfuse.data.captions import read_captions
from vlfuse.errors import InputError
from vlfuse.metrics.retrieval import recall_metrics
from vlfuse.tasks.retrieval.index import (
    ImageIndex,
    IndexFileError,
    ModelMismatchError,
    exact_topk,
)
from vlfuse.tasks.retrieval.pipeline import Retriever

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "flickr8k"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/flickr8k")


@pytest.fixture(scope="module")
def retriever():
    torch.set_num_threads(2)
    return Retriever.from_pretrained("flickr8k-retrieval")


@pytest.fixture(scope="module")
def val():
    return read_captions(DATA, split="val").subset(24)


@pytest.fixture()
def photos(tmp_path, val):
    """A folder with 4 real val photos, a zero-byte .jpg and a text file named .jpg."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in val.images[:4]:
        shutil.copy(p, folder / p.name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    return folder


def test_recall_metrics_known_values():
    # 2 images, 4 captions (2 each). Image 0 ranks its caption first; image 1's best own caption is 2nd.
    sim = np.array([[0.9, 0.1, 0.5, 0.2],
                    [0.8, 0.3, 0.7, 0.6]])
    m = recall_metrics(sim, [0, 0, 1, 1])
    assert m["i2t_R@1"] == 50.0 and m["i2t_median_rank"] == 1.5
    # t2i ranks: cap0 -> image0 (0.9 > 0.8) rank 1; cap1 -> 0.1 vs 0.3 rank 2; cap2 -> 0.7 > 0.5 rank 1; cap3 rank 1
    assert m["t2i_R@1"] == 75.0 and m["t2i_R@5"] == 100.0


def test_exact_topk_matches_sort():
    rng = np.random.default_rng(0)
    vecs, q = rng.standard_normal((50, 8), dtype=np.float32), rng.standard_normal((3, 8), dtype=np.float32)
    scores, ids = exact_topk(q, vecs, 5)
    want = np.argsort(-(q @ vecs.T), axis=1)[:, :5]
    assert (ids == want).all() and (np.diff(scores, axis=1) <= 0).all()


def test_faiss_path_agrees_with_exact(tmp_path):
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((2000, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = ImageIndex("m@1", 16, [f"{i}.jpg" for i in range(2000)], np.zeros(2000), np.zeros(2000), vecs,
                       ann_threshold=1000)
    index.save(tmp_path / "big.idx")
    loaded = ImageIndex.load(tmp_path / "big.idx")
    assert loaded._ann is not None  # the IVF index travels inside the file
    hits = loaded.search(vecs[:5], 3)
    assert [h[0].path for h in hits] == [f"{i}.jpg" for i in range(5)]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-4)


def test_embed_texts_normalised_and_empty_query_refused(retriever):
    v = retriever.embed_texts(["a dog runs on the grass", "two children play in the snow"])
    assert v.shape == (2, retriever.dim) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    with pytest.raises(InputError, match="empty"):
        retriever.embed_texts(["   "])
    # mixed text and emoji are embedded (Chinese queries: tests/test_retrieval_languages.py)
    assert retriever.embed_texts(["two dogs 在雪地里 🐶", "a dog " * 2000]).shape == (2, retriever.dim)


def test_index_round_trip_with_bad_files(retriever, photos, tmp_path, val):
    paths = sorted(photos.iterdir())
    index = ImageIndex.build(retriever, paths, progress=False)
    assert len(index) == 4
    failed = {Path(p).name for p, _ in index.last_report.failed}
    assert failed == {"empty.jpg", "notes.jpg"}
    assert any("empty" in e for _, e in index.last_report.failed)
    index.save(tmp_path / "photos.idx")
    loaded = ImageIndex.load(tmp_path / "photos.idx")
    assert loaded.paths == index.paths and np.allclose(loaded.vectors, index.vectors)
    assert loaded.model_id == retriever.model_id
    # image->image: every photo finds itself first, with cosine ~1
    hits = loaded.search(retriever.embed_images([photos / val.images[2].name]), k=3)[0]
    assert Path(hits[0].path).name == val.images[2].name and hits[0].score > 0.99
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_incremental_add_only_embeds_changed_files(retriever, photos, tmp_path, val):
    paths = [photos / p.name for p in val.images[:4]]
    index = ImageIndex.build(retriever, paths, progress=False)
    before = index.vectors.copy()
    shutil.copy(val.images[5], paths[1])      # changed content (and size) under the same name
    paths[3].unlink()                         # removed
    new = photos / val.images[6].name
    shutil.copy(val.images[6], new)           # new
    seen = []
    original = retriever.embed_files

    def spy(files, batch_size=32):
        seen.extend(str(f) for f in files)
        return original(files, batch_size)

    retriever.embed_files = spy
    try:
        report = index.add(retriever, sorted(photos.iterdir()), progress=False)
    finally:
        del retriever.embed_files
    assert sorted(Path(s).name for s in seen) == sorted([paths[1].name, new.name, "empty.jpg", "notes.jpg"])
    assert (report.embedded, report.unchanged, report.removed, len(report.failed)) == (2, 2, 1, 2)
    assert len(index) == 4 and str(paths[3].resolve()) not in index.paths
    i0 = index.paths.index(str(paths[0].resolve()))
    i1 = index.paths.index(str(paths[1].resolve()))
    assert np.array_equal(index.vectors[i0], before[0]) and not np.allclose(index.vectors[i1], before[1])


def test_index_refuses_another_model(retriever, photos):
    index = ImageIndex.build(retriever, [photos / n for n in sorted(p.name for p in photos.iterdir())][:2],
                             progress=False)
    other_model = copy.deepcopy(retriever.model)
    with torch.no_grad():
        other_model.text_proj.linear.bias += 0.01
    other = Retriever(other_model, retriever.tokenizer, retriever.name)
    assert other.model_id != retriever.model_id
    with pytest.raises(ModelMismatchError, match="built by model"):
        index.check_compatible(other)
    with pytest.raises(ModelMismatchError):
        index.add(other, [])


def test_missing_and_corrupt_index_errors(tmp_path):
    with pytest.raises(IndexFileError, match="does not exist"):
        ImageIndex.load(tmp_path / "nope.idx")
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(IndexFileError, match="corrupt"):
        ImageIndex.load(bad)
    index = ImageIndex("m@1", 4, ["a.jpg"], [1], [1.0], np.ones((1, 4), np.float32))
    index.save(tmp_path / "ok.idx")
    data = (tmp_path / "ok.idx").read_bytes()
    (tmp_path / "cut.idx").write_bytes(data[: len(data) // 2])  # a half-written file
    with pytest.raises(IndexFileError):
        ImageIndex.load(tmp_path / "cut.idx")


def test_save_and_reload_keeps_identity_and_outputs(retriever, tmp_path, val):
    out = retriever.save_pretrained(tmp_path / "model")
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    assert size_mb < 20  # frozen EfficientNet stem and MiniLM are not re-saved
    again = Retriever.from_pretrained(out)
    assert again.model_id == retriever.model_id
    assert np.allclose(again.embed_texts(["a man rides a bike"]), retriever.embed_texts(["a man rides a bike"]),
                       atol=1e-5)


def test_shipped_model_ranks_real_val_sample(retriever, val):
    """Floor check on 24 real val images: most first captions find their own photo near the top."""
    images = retriever.embed_images(val.images)
    texts = retriever.embed_texts([caps[0] for caps in val.captions])
    m = recall_metrics(images @ texts.T, list(range(len(val))))
    assert m["t2i_R@1"] >= 50.0 and m["t2i_R@5"] >= 80.0, m
    assert m["i2t_R@1"] >= 50.0, m


def test_cli_index_and_search(photos, tmp_path, capsys, val):
    idx = tmp_path / "photos.idx"
    assert main(["index", "build", str(photos), "--out", str(idx), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "4 images" in err and "skipped 2" in err and "empty.jpg" in err
    assert main(["search", str(idx), val.captions[0][0], "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(float(ln.split("\t")[0]) <= 1.0 for ln in lines)
    grid = tmp_path / "results.png"
    assert main(["search", str(idx), "--image", str(val.images[0]), "-k", "4", "--grid", str(grid)]) == 0
    top = capsys.readouterr().out.splitlines()[0]
    assert top.endswith(val.images[0].name) and grid.stat().st_size > 1000
    shutil.copy(val.images[7], photos / "late.jpg")
    assert main(["index", "add", str(idx), str(photos), "--no-progress"]) == 0
    assert "embedded 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv_tail, message", [
    (["  "], "empty"),
    (["--image", "/no/such/file.jpg"], "does not exist"),
])
def test_cli_bad_queries_exit_2(photos, tmp_path, capsys, retriever, argv_tail, message):
    idx = tmp_path / "p.idx"
    ImageIndex.build(retriever, [photos / p for p in sorted(x.name for x in photos.iterdir())][:1],
                     progress=False).save(idx)
    assert main(["search", str(idx), *argv_tail]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("vlfuse search: error:")


def test_cli_missing_and_corrupt_index_exit_2(tmp_path, capsys):
    assert main(["search", str(tmp_path / "none.idx"), "dogs"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.idx").write_text("garbage")
    assert main(["search", str(tmp_path / "bad.idx"), "dogs"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err
    assert main(["index", "add", str(tmp_path / "bad.idx"), str(tmp_path)]) == 2


def test_cli_trains_a_loadable_dual_encoder(tmp_path, feature_cache):
    """`vlfuse train` on a retrieval config: 24 real train photos, 8 val; the best checkpoint loads and embeds."""
    import json

    from conftest import write_config

    cfg = write_config(tmp_path / "r.json", {
        "task": "retrieval", "name": "tiny-retrieval",
        "data": {"path": str(DATA), "train_limit": 24, "val_limit": 8, "cache_dir": str(feature_cache),
                 "text_cache_dir": str(tmp_path / "text"), "mirror": 0.5},
        "model": {"embed_dim": 32, "hidden_dim": 64, "pool_heads": 4},
        "train": {"epochs": 2, "batch_size": 32, "warmup_steps": 2, "out_dir": str(tmp_path / "run"),
                  "progress": False, "checkpoint_every": 0, "threads": 2}})
    assert main(["train", "--config", str(cfg)]) == 0
    hist = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2] and all(0 <= h["val_rsum"] <= 600 for h in hist)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_images"] == 24 and summary["train_captions"] == 120 and summary["val_images"] == 8
    model = Retriever.from_pretrained(tmp_path / "run" / "best")
    vectors = model.embed_texts(["a dog runs on the grass", "two children play in the water"])
    assert vectors.shape == (2, 32) and torch.allclose(torch.as_tensor(vectors).norm(dim=-1), torch.ones(2), atol=1e-4)


def test_training_validation_embeds_images_like_the_retriever(retriever, val, tmp_path):
    """Validation during training scores the photos' cached stem outputs through the same ``embed_cells`` as
    ``Retriever.embed_images`` (without the concept term, which training's checkpoints do not have)."""
    from vlfuse.training.retrieval import image_cells

    data = val.subset(4)
    cells, kept, bad = image_cells(retriever.model, str(tmp_path / "cache"), data, progress=False)
    assert not bad and len(kept) == 4
    with torch.no_grad():
        cached = retriever.model.eval().embed_cells(cells.float(), normalized=True).numpy()
    assert np.allclose(cached, retriever.without_concepts().embed_images(data.images), atol=2e-3)  # fp16 cache


def test_checkpoint_saved_with_mirror_average_off_loads_as_before(retriever, tmp_path, val):
    """Checkpoints saved while ``model.mirror_average`` existed (the shipped one among them) list it off; they
    load with the same id and embeddings. One that had it on asked for a second CNN pass that no longer exists."""
    import json

    from vlfuse.errors import ConfigError

    out = retriever.save_pretrained(tmp_path / "old")
    raw = json.loads((out / "config.json").read_text())
    raw["model"]["mirror_average"] = False
    (out / "config.json").write_text(json.dumps(raw))
    old = Retriever.from_pretrained(out)
    assert old.model_id == retriever.model_id  # indexes it built stay valid
    assert np.allclose(old.embed_images(val.images[:2]), retriever.embed_images(val.images[:2]), atol=1e-5)
    raw["model"]["mirror_average"] = True
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="'model.mirror_average' was removed"):
        Retriever.from_pretrained(out)


def test_the_shipped_model_keeps_its_id_after_options_were_removed(retriever):
    """Indexes record the retrieval model's id and the shipped caption memory its image tower's digest; both
    hash the model config, so options removed since (config.REMOVED_OPTIONS) must not change them."""
    import json

    from vlfuse.hub import resolve_model
    from vlfuse.tasks.retrieval.pipeline import RetrievalImageTower

    # the id before the clean-up (the shipped model's id without its concept term, issue 20)
    assert retriever.without_concepts().model_id == "flickr8k-retrieval@1669e0e281b304ec"
    memory = json.loads((resolve_model("flickr8k-caption") / "config.json").read_text())["rerank"]
    assert RetrievalImageTower.from_pretrained("flickr8k-retrieval").digest() == memory["tower_digest"]


def test_token_state_cache_round_trips_and_matches_the_live_encoder(tmp_path, val):
    from vlfuse.config import Part
    from vlfuse.nn.text import pad_batch
    from vlfuse.tasks.retrieval.model import RetrievalModel, RetrievalModelConfig
    from vlfuse.training.retrieval import cached_text_states

    model = RetrievalModel(RetrievalModelConfig(text=Part("minilm", {"trainable_layers": 1}), embed_dim=16,
                                             hidden_dim=32, pool_heads=4))
    tok = model.text.make_tokenizer()
    caps = [c for cs in val.captions[:3] for c in cs]
    states = cached_text_states(model, tok, caps, str(tmp_path), progress=False)
    files = list(tmp_path.glob("minilm-states5-*.npz"))
    assert len(files) == 1 and len(states) == 15
    again = cached_text_states(model, tok, caps, str(tmp_path), progress=False)  # read back from the file
    assert torch.equal(again.flat, states.flat) and torch.equal(again.offsets, states.offsets)
    ids, mask = pad_batch([tok.encode(c, model.config.max_len) for c in caps])
    cached, cached_mask = states.batch(range(len(caps)))
    assert torch.equal(cached_mask, mask)
    live = model.text.frozen_states(ids, mask)  # (B, T, 384) after 5 of 6 layers
    assert torch.allclose(cached[mask], live[mask], atol=1e-2)
    with torch.no_grad():  # the top layer on cached states gives the encoder's own output
        assert torch.allclose(model.encode_text_states(cached, mask), model.encode_text(ids, mask), atol=1e-2)


def test_training_from_cached_token_states_equals_training_live(tmp_path, val):
    from vlfuse.config import Part
    from vlfuse.tasks.retrieval.model import RetrievalModel, RetrievalModelConfig
    from vlfuse.training.retrieval import cached_text_states, make_collate

    torch.manual_seed(0)
    model = RetrievalModel(RetrievalModelConfig(text=Part("minilm", {"trainable_layers": 1}), embed_dim=16,
                                             hidden_dim=32, pool_heads=4, dropout=0.1))
    tok = model.text.make_tokenizer()
    data = val.subset(6)
    caps = [c for cs in data.captions for c in cs]
    items = [(i, list(range(5 * i, 5 * i + 5))) for i in range(len(data))]
    cells = torch.randn(len(data), 49, 1280).half()
    inputs = {"live": [tok.encode(c, model.config.max_len) for c in caps],
              "cached": cached_text_states(model, tok, caps, str(tmp_path), progress=False)}
    trained = {}
    for name, text in inputs.items():
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        collate = make_collate(cells, text)
        torch.manual_seed(1)  # same captions drawn, same dropout masks
        for _ in range(3):
            loss = m(*collate(items))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained[name] = m.state_dict()
    top = "text.bert.encoder.layer.5.output.dense.weight"
    assert not torch.allclose(trained["live"][top], model.state_dict()[top])  # the top layer did train
    for key in (top, "text_proj.linear.weight", "image_proj.linear.weight", "logit_scale"):
        assert torch.allclose(trained["live"][key], trained["cached"][key], atol=1e-3), key
