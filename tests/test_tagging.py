"""Tagging: the concept head's probabilities, top-k and the threshold, blank and noise images, real photos, the
``vlfuse tag`` command and ``POST /v1/tags``."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, bad_images, flickr_or_skip
from PIL import Image

from vlfuse.cli.main import main
from vlfuse.errors import ConfigError, InputError
from vlfuse.nn.concepts import CONCEPT_THRESHOLD
from vlfuse.tasks.tagging import Tagger

COCO = (REPO / ".." / "shared" / "data" / "coco_ood_dev").resolve()
DOG_PHOTO = "1526325728_74eb4153d8.jpg"  # Flickr8k val: "A grey colored dog walks in wet sand at a beach ."
ZEBRA_PHOTO = "000000281789.jpg"         # coco_ood_dev: "two zebras grazing in a field during the day."
IMAGENET_DOGS = range(151, 269)          # ImageNet-1k's 118 dog breeds, classes 151-268


def coco_or_skip():
    if not (COCO / "captions.txt").is_file():
        pytest.skip("coco_ood_dev is not present at ../shared/data/coco_ood_dev")
    return COCO


def blank_images():
    return [Image.new("RGB", (640, 480), c) for c in ((0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30))]


def noise_images():
    """Per-pixel noise, seeded: uniform and Gaussian, at the model's input size and at a photo's."""
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
            Image.fromarray(np.clip(rng.normal(128, 40, (224, 224, 3)), 0, 255).astype(np.uint8))]


@pytest.fixture(scope="module")
def tagger():
    return Tagger.from_pretrained("efficientnet-lite0")


@pytest.fixture(scope="module")
def dog_photo():
    return flickr_or_skip() / "images" / DOG_PHOTO


@pytest.fixture(scope="module")
def folder(tmp_path_factory, dog_photo):
    """A dog photo, a blank image and the four kinds of bad file."""
    folder = tmp_path_factory.mktemp("tag")
    good = [str(shutil.copy(dog_photo, folder / "dog.jpg"))]
    blank_images()[1].save(folder / "white.png")
    good.append(str(folder / "white.png"))
    return folder, good, bad_images(folder)


# -- the head and the pipeline ----------------------------------------------------------------------------
def test_probabilities_sum_to_one(tagger, dog_photo):
    probs = tagger.probabilities([dog_photo, blank_images()[0], noise_images()[0]])
    assert probs.shape == (3, 1000) and probs.dtype == torch.float32 and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(3), atol=1e-5, rtol=0)
    assert tagger.runtime.backends() == {"image_encoder": "onnxruntime"}
    head = tagger.head
    torch.testing.assert_close(head(torch.randn(4, head.in_dim) * 3).sum(1), torch.ones(4), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match=r"pooled features \(B, 1280\)"):
        head(torch.randn(2, 7, 1280))


def test_top_k_order_and_threshold(tagger):
    probs = torch.zeros(2, 1000)
    probs[0, [3, 7, 9, 11]] = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs[1, 400] = 1.0
    names = tagger.head.names
    ranked = tagger.concepts(probs, top=3, threshold=0.0)
    assert [c.index for c in ranked[0]] == [3, 7, 9] and [c.name for c in ranked[0]] == [names[i] for i in (3, 7, 9)]
    assert [round(c.probability, 6) for c in ranked[0]] == [0.5, 0.3, 0.15]
    assert ranked[1][0].index == 400 and ranked[1][0].probability == 1.0 and len(ranked[1]) == 3
    assert [[c.index for c in row] for row in tagger.concepts(probs)] == [[3, 7], [400]]  # 0.3 is claimed
    assert [c.index for c in tagger.concepts(probs, threshold=0.31)[0]] == [3]
    assert [c.index for c in tagger.concepts(probs, top=1)[0]] == [3]
    assert tagger.concepts(probs, threshold=0.6)[0] == []
    assert ranked[0][0].to_dict() == {"index": 3, "name": names[3], "word": tagger.head.words[3], "probability": 0.5}


def test_a_call_returns_the_top_concepts_of_each_image(tagger, dog_photo):
    images = [dog_photo, noise_images()[0]]
    probs = tagger.probabilities(images)
    tags = tagger(images, top=3, threshold=0.0)
    for row, p in zip(tags, probs):
        values, indices = p.topk(3)
        assert [c.index for c in row] == indices.tolist()
        assert [c.probability for c in row] == pytest.approx(values.tolist())
        assert row[0].probability >= row[1].probability >= row[2].probability
    assert tagger(dog_photo, top=3, threshold=0.0) == tags[0]  # one image -> its list
    # an image's concepts do not depend on the other images of its batch
    assert torch.equal(tagger.probabilities([dog_photo]), probs[:1])


@pytest.mark.parametrize("options, words", [({"top": 0}, "at least 1"), ({"top": 2.5}, "whole number"),
                                            ({"threshold": -0.1}, "between 0 and 1"),
                                            ({"threshold": 1.5}, "between 0 and 1"),
                                            ({"threshold": float("nan")}, "between 0 and 1")])
def test_bad_options(tagger, options, words):
    with pytest.raises(InputError, match=words):
        tagger(blank_images()[0], **options)


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="no concept head for vision encoder 'small-cnn'"):
        Tagger.from_pretrained("small-cnn")


def test_blank_and_noise_images_get_no_concept(tagger):
    images = blank_images() + noise_images()
    assert tagger(images) == [[] for _ in images]
    assert float(tagger.probabilities(images).max()) < CONCEPT_THRESHOLD


def test_real_photos(tagger, dog_photo):
    dog = tagger(dog_photo)
    assert dog and dog[0].index in IMAGENET_DOGS and dog[0].probability >= 0.5, dog  # Weimaraner, 0.99
    zebra = tagger(coco_or_skip() / "images" / ZEBRA_PHOTO)
    assert [c.name for c in zebra] == ["zebra"] and zebra[0].probability > 0.9


def test_tag_files_reports_bad_files_in_order(tagger, folder):
    _, good, bad = folder
    paths = [good[0], bad["empty"], good[1], bad["text"], good[0]]
    out = list(tagger.tag_files(paths, top=2, threshold=0.0, batch_size=2))
    assert [p for p, _, _ in out] == [str(p) for p in paths]
    assert [e is None for _, _, e in out] == [True, False, True, False, True]
    assert "file is empty" in out[1][2] and "not a recognised image" in out[3][2]
    assert out[0][1] == out[4][1] == tagger(good[0], top=2, threshold=0.0) and len(out[2][1]) == 2


# -- vlfuse tag --------------------------------------------------------------------------------------------
def test_cli_text_output(folder, capsys):
    _, good, _ = folder
    assert main(["tag", *good, "--top", "3"]) == 0
    out, err = capsys.readouterr()
    blocks = out.strip().split("\n" + str(good[1]) + "\n")
    dog_lines = blocks[0].splitlines()
    assert dog_lines[0] == good[0] and 1 <= len(dog_lines) - 1 <= 3
    first = dog_lines[1].split()
    assert float(first[0]) >= 0.5 and first[-1].startswith("(") and first[-1].endswith(")")
    assert blocks[1].strip() == f"no concept at or above {CONCEPT_THRESHOLD:.2f}"  # the blank image
    assert err == ""


def test_cli_json_folder_and_bad_files(folder, capsys, tagger):
    path, good, bad = folder
    # some files failed: every good one is still tagged, and the exit status says that some failed
    assert main(["tag", str(path), "--json", "--top", "2", "--threshold", "0"]) == 2
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(good)
    for r in rows:
        assert r["threshold"] == 0.0 and len(r["concepts"]) == 2
        expected = [c.to_dict() for c in tagger(r["image"], top=2, threshold=0.0)]
        assert r["concepts"] == expected
    lines = err.splitlines()
    assert len(lines) == len(bad) and all(ln.startswith("vlfuse tag: error: ") for ln in lines), err
    for p in bad.values():
        assert sum(str(p) in ln for ln in lines) == 1
    assert "Traceback" not in err


def test_cli_exit_status(folder, capsys):
    _, _, bad = folder
    assert main(["tag", str(bad["empty"]), str(bad["text"])]) == 2  # every file failed
    assert capsys.readouterr().err.count("vlfuse tag: error: ") == 2
    assert main(["tag", str(bad["empty"]), "--top", "0"]) == 2
    assert "top: the number of concepts must be a whole number of at least 1" in capsys.readouterr().err
    assert main(["tag", str(bad["empty"]), "--threshold", "2"]) == 2
    assert "threshold: must be a probability between 0 and 1" in capsys.readouterr().err


# -- POST /v1/tags -----------------------------------------------------------------------------------------
KEY = "tag-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def service(tagger):
    """A TestClient over a service with the tagger loaded (and an API key), and one without it."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vlfuse.serving.app import create_app
    from vlfuse.serving.models import ServiceModels
    from vlfuse.serving.settings import APIKeys, ServeSettings

    models = ServiceModels(names={"tagging": "efficientnet-lite0"}, tagger=tagger)
    with TestClient(create_app(models, ServeSettings(), APIKeys([KEY])), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        with TestClient(create_app(ServiceModels(), ServeSettings()), raise_server_exceptions=False) as without:
            yield client, without


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def post_tags(client, data: bytes, name="photo.jpg", **fields):
    return client.post("/v1/tags", files={"image": (name, data, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def test_service_tags_equal_the_python_api(service, tagger, dog_photo):
    client, _ = service
    data = dog_photo.read_bytes()
    resp = post_tags(client, data, top=3, threshold=0.05)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = tagger(Image.open(io.BytesIO(data)), top=3, threshold=0.05)
    assert body["concepts"] == [c.to_dict() for c in expected] and body["concepts"]
    assert body["concepts"][0]["index"] in IMAGENET_DOGS
    assert body["top"] == 3 and body["threshold"] == 0.05 and body["model"] == "efficientnet-lite0"
    default = post_tags(client, data).json()
    assert default["top"] == 5 and default["threshold"] == CONCEPT_THRESHOLD
    assert default["concepts"] == [c.to_dict() for c in tagger(Image.open(io.BytesIO(data)))]
    blank = post_tags(client, png(blank_images()[1]), "white.png")
    assert blank.status_code == 200 and blank.json()["concepts"] == []


@pytest.mark.parametrize("fields, words", [({"top": 0}, "top"), ({"top": 11}, "top"), ({"top": "many"}, "top"),
                                           ({"threshold": -0.5}, "threshold"), ({"threshold": 1.01}, "threshold"),
                                           ({"threshold": "nan"}, "threshold")])
def test_service_bad_parameters_are_422(service, fields, words):
    client, _ = service
    resp = post_tags(client, png(blank_images()[0]), **fields)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_parameter" and words in error["message"]


def test_service_auth_uploads_and_503(service):
    client, without = service
    data = png(blank_images()[0])
    refused = client.post("/v1/tags", files={"image": ("a.png", data)}, headers={"Authorization": ""})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    wrong = client.post("/v1/tags", files={"image": ("a.png", data)}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    junk = post_tags(client, b"not an image at all")
    assert junk.status_code == 415 and junk.json()["error"]["code"] == "unsupported_media_type"
    assert client.post("/v1/tags", data={"top": "3"}).status_code == 422  # no image
    missing = post_tags(without, data)
    assert missing.status_code == 503 and missing.json()["error"]["code"] == "model_not_loaded"
    assert "tagging" in missing.json()["error"]["message"]


def test_service_describes_counts_and_documents_tags(service):
    client, without = service
    tagging = client.get("/v1/models").json()["models"]["tagging"]
    assert tagging == {"loaded": True, "model": "efficientnet-lite0", "image_encoder": "onnxruntime",
                       "threshold": CONCEPT_THRESHOLD, "concepts": 1000}
    assert client.get("/readyz").json()["models"]["tagging"] is True
    assert without.get("/v1/models").json()["models"]["tagging"]["loaded"] is False
    post_tags(client, png(blank_images()[0]))
    metrics = client.get("/metrics").text
    assert 'vlfuse_http_requests_total{endpoint="/v1/tags",method="POST",status="200"}' in metrics
    assert 'vlfuse_batch_size_count{model="tags"}' in metrics
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/tags"]["post"]
    assert set(post["responses"]) >= {"200", "401", "413", "415", "422", "503"}
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in form:
        form = spec["components"]["schemas"][form["$ref"].split("/")[-1]]
    assert set(form["properties"]) == {"image", "top", "threshold"}
    assert "TagsResponse" in spec["components"]["schemas"]


def test_service_loads_the_tagger_by_default(tmp_path):
    pytest.importorskip("fastapi")
    from vlfuse.runtime import RuntimeOptions
    from vlfuse.serving.models import ModelChoice, ServiceModels

    none = ModelChoice("none")
    models = ServiceModels.load(none, none, none, runtime=RuntimeOptions(cache_dir=tmp_path / "cache"))
    assert models.loaded() == {"caption": False, "vqa": False, "retrieval": False, "tagging": True}
    assert models.names["tagging"] == "efficientnet-lite0"
    assert [f.name for f in (tmp_path / "cache").glob("*.onnx")]  # exported by a child process, read from here
    assert next(models.tagger.vision.parameters()).device.type == "meta"  # ONNX Runtime encodes: weights freed
    probs = models.tag_batch(None, [models.tag_pixels(blank_images()[0])] * 2)
    assert len(probs) == 2 and probs[0].shape == (1000,) and torch.equal(probs[0], probs[1])
    with pytest.raises(ConfigError, match="no concept head for vision encoder 'small-cnn'"):
        ServiceModels.load(none, none, none, tagging=ModelChoice("small-cnn"))
    assert ServiceModels.load(none, none, none, tagging=none).loaded()["tagging"] is False
