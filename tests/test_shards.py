"""IVF-PQ shards (``vlfuse.tasks.retrieval.shards``): search fans out over the shards and merges their top k; recall
against exact search on a small synthetic set; a sharded folder saves, loads and answers alike."""
from __future__ import annotations

import numpy as np
import pytest

from vlfuse.errors import InputError
from vlfuse.tasks.retrieval.index import ImageIndex, exact_topk
from vlfuse.tasks.retrieval.shards import IVFPQParams, ShardedIndex, load_any_index, merge_topk, recall_at_k

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss trains on one OpenMP thread here: on a shared 2-core CPU its spinning threads made training 2-4x
    slower, and 50x inside the test process (torch's threads beside them)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    """4,000 unit vectors of 32 dims around 40 centres, and 100 queries near some of them."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32))
    x = unit(centres[rng.integers(0, 40, 4000)] + 0.5 * rng.standard_normal((4000, 32)))
    q = unit(x[rng.choice(4000, 100, replace=False)] + 0.1 * rng.standard_normal((100, 32)))
    return [f"/photos/{i:05d}.jpg" for i in range(len(x))], x, q


def test_merge_keeps_the_best_k_over_shards_and_skips_missing():
    scores = np.array([[[0.9, 0.5]], [[0.95, -1.0]]], np.float32)  # (S=2, B=1, k=2)
    ids = np.array([[[3, 7]], [[12, -1]]])
    s, i = merge_topk(scores, ids, 2)
    assert i.tolist() == [[12, 3]] and s[0].tolist() == pytest.approx([0.95, 0.9])


def test_sharded_ivfpq_recall_against_exact_search(data, tmp_path):
    paths, x, q = data
    params = IVFPQParams(m=16, nprobe=8)
    sharded = ShardedIndex.build("model@1", paths, x, shards=4, params=params)
    assert len(sharded) == 4000 and [len(p) for p in sharded.paths] == [1000] * 4
    _, exact = exact_topk(q, x, 10)
    _, approx = merge_topk(*sharded.search_shards(q, 10), 10)
    recall = recall_at_k(approx, exact)
    one = ShardedIndex.build("model@1", paths, x, shards=1, params=params)
    recall_one = recall_at_k(merge_topk(*one.search_shards(q, 10), 10)[1], exact)
    print(f"recall@10 vs exact: 4 shards {recall:.3f}, 1 shard {recall_one:.3f}")
    assert recall >= 0.85 and recall_one >= 0.85
    hits = sharded.search(q[:2], k=5)
    assert [h.path for h in hits[0]] == [paths[j] for j in approx[0, :5]]
    # saved as a folder and loaded (also by load_any_index, which the search command uses): the same answers
    sharded.save(tmp_path / "photos.shards")
    loaded = load_any_index(tmp_path / "photos.shards")
    assert isinstance(loaded, ShardedIndex) and loaded.params == params
    assert [[h.path for h in row] for row in loaded.search(q[:2], 5)] == [[h.path for h in row] for row in hits]


def test_a_flat_index_goes_into_shards_and_too_few_vectors_say_so(data, tmp_path):
    paths, x, _ = data
    flat = ImageIndex("model@1", 32, paths[:300], [1] * 300, [0.0] * 300, x[:300])
    sharded = ShardedIndex.from_index(flat, shards=2, params=IVFPQParams(m=8))
    assert sharded.model_id == "model@1" and len(sharded) == 300
    with pytest.raises(InputError, match="flat index"):
        ShardedIndex.from_index(ImageIndex("model@1", 32, paths[:100], [1] * 100, [0.0] * 100, x[:100]), 2)
