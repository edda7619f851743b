"""vlfuse.io: atomic writes (concurrent writers, failures, interrupted writers) and the one digest scheme (shipped
model ids unchanged, digests independent of layout and order, feature-cache folders per stem)."""
import hashlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from vlfuse.io import (
    atomic_path,
    atomic_write,
    config_digest,
    file_digest,
    tensors_digest,
)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


WRITER = """
import sys
from vlfuse.io import atomic_write
for _ in range(30):
    atomic_write(sys.argv[1], bytes([int(sys.argv[2])]) * 300_000)
"""


def _write_many(path, fill: int, errors: list) -> None:
    try:
        for _ in range(30):
            atomic_write(path, bytes([fill]) * 300_000)
    except Exception as exc:  # noqa: BLE001 — reported by the test
        errors.append(exc)


def test_concurrent_writers_end_with_one_complete_file(tmp_path):
    """Four processes and two threads write the same file 30 times each; every read in between and the file at
    the end hold one writer's whole content, never a mix or a torn write, and no temporary file is left."""
    target = tmp_path / "shared.bin"
    atomic_write(target, b"\x00" * 300_000)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(i + 1)]) for i in range(4)]
    errors = []
    threads = [threading.Thread(target=_write_many, args=(target, 10 + i, errors)) for i in range(2)]
    for t in threads:
        t.start()
    while any(p.poll() is None for p in procs) or any(t.is_alive() for t in threads):
        data = target.read_bytes()
        assert len(data) == 300_000 and data == data[:1] * len(data)
    for t in threads:
        t.join()
    assert [p.wait() for p in procs] == [0] * 4 and errors == []
    data = target.read_bytes()
    assert len(data) == 300_000 and data == data[:1] * len(data) and data[0] in {1, 2, 3, 4, 10, 11}
    assert leftovers(tmp_path) == []


def test_a_failing_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "model.safetensors"
    atomic_write(target, b"old weights")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new wei")
            raise RuntimeError("disk full")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the middle of a write
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old weights" and leftovers(tmp_path) == []


def test_writers_that_choose_a_format_by_suffix_write_the_target(tmp_path):
    with atomic_path(tmp_path / "sub" / "entry.npy", fsync=False) as tmp:  # the folder is created
        np.save(tmp, np.arange(3))  # np.save adds ".npy" to a name without it
    assert np.load(tmp_path / "sub" / "entry.npy").tolist() == [0, 1, 2]
    atomic_write(tmp_path / "text.json", "héllo")
    assert (tmp_path / "text.json").read_text(encoding="utf-8") == "héllo"
    assert leftovers(tmp_path / "sub") == [] and leftovers(tmp_path) == []


def test_digests():
    assert file_digest(__file__) == hashlib.sha1(open(__file__, "rb").read()).hexdigest()
    w = torch.randn(8, 4, 3, 3)
    state = {"a.weight": w, "b.bias": torch.arange(5)}
    key = tensors_digest(state, {"size": 224, "name": "x"})
    assert len(key) == 16
    # equal values give equal digests whatever the dict order, memory layout or key order of the config
    same = {"b.bias": torch.arange(5), "a.weight": w.to(memory_format=torch.channels_last)}
    assert tensors_digest(same, {"name": "x", "size": 224}) == key
    assert tensors_digest({**state, "a.weight": w + 1e-3}, {"size": 224, "name": "x"}) != key
    assert tensors_digest(state, {"size": 240, "name": "x"}) != key
    assert config_digest([1, {"b": 2, "a": 1}]) == config_digest([1, {"a": 1, "b": 2}]) != config_digest([1])


def test_shipped_model_identities_are_unchanged():
    """The retrieval model id is stored in saved indexes and the image tower's digest in the shipped caption
    model's memory (config.json): both must keep their values, or those files would be refused."""
    import json

    from vlfuse.hub import resolve_model
    from vlfuse.tasks.retrieval.pipeline import RetrievalImageTower, Retriever

    retriever = Retriever.from_pretrained("flickr8k-retrieval")
    # with its concept term (issue 20); without it, the id indexes built before have (still searchable)
    assert retriever.model_id == "flickr8k-retrieval@94745de60212cf2e"
    assert retriever.without_concepts().model_id == "flickr8k-retrieval@1669e0e281b304ec"
    recorded = json.loads((resolve_model("flickr8k-caption") / "config.json").read_text())["rerank"]["tower_digest"]
    assert recorded == "b60416b4da47b95b"
    assert RetrievalImageTower.from_pretrained("flickr8k-retrieval").digest() == recorded


def test_feature_cache_folder_names_what_the_stem_computes():
    from vlfuse.registry import VISION_ENCODERS

    lite = VISION_ENCODERS.build("efficientnet-lite0")
    assert lite.cache_key == VISION_ENCODERS.build("efficientnet-lite0").cache_key  # stable
    assert lite.cache_key.startswith("efficientnetlite-224px-")
    others = [VISION_ENCODERS.build("efficientnet-lite0", pretrained=False),  # random stem weights
              VISION_ENCODERS.build("efficientnet-lite0", trainable_blocks=1),  # another split point
              VISION_ENCODERS.build("efficientnet-lite0", image_size=192)]
    assert len({lite.cache_key, *(o.cache_key for o in others)}) == 4
