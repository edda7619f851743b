"""HTTP service endpoints through FastAPI's TestClient: results equal the Python API's, every bad input gets
its JSON error, auth runs before any work, and the service keeps serving after each failure."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image
from serving_helpers import (
    ColourIndex,
    ColourRetriever,
    ColourVQA,
    image_bytes,
    make_tiny_captioner,
    png_bomb,
)

from vlfuse.errors import ConfigError
from vlfuse.runtime import RuntimeOptions
from vlfuse.tasks.caption import CaptionDecodeConfig

fastapi = pytest.importorskip("fastapi")  # the "serve" extra; installed in CI
from fastapi.testclient import TestClient  # noqa: E402

from vlfuse.serving.app import create_app  # noqa: E402
from vlfuse.serving.batching import Batcher  # noqa: E402
from vlfuse.serving.models import ModelChoice, ServiceModels  # noqa: E402
from vlfuse.serving.settings import (  # noqa: E402
    APIKeys,
    ServeSettings,
    check_bind_allowed,
    is_loopback,
    load_api_keys,
    read_keys_file,
)
from vlfuse.tasks.caption.pipeline import Captioner  # noqa: E402

KEY = "test-key-0123456789abcdef"
NONE = ModelChoice("none")  # a model ServiceModels.load leaves out (the tagger: tests/test_tagging.py serves it)


@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory):
    return make_tiny_captioner(tmp_path_factory.mktemp("cap") / "tiny-caption")


@pytest.fixture(scope="module")
def captioner(caption_dir):
    return Captioner.from_pretrained(caption_dir)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return ColourIndex(tmp_path_factory.mktemp("photos"))


def build_models(captioner=None, vqa=None, retriever=None, index=None) -> ServiceModels:
    names = {k: v for k, v in (("caption", "tiny-caption" if captioner else None), ("vqa", "colour-vqa" if vqa else
             None), ("retrieval", "colour-retrieval" if retriever else None)) if v}
    return ServiceModels(captioner, vqa, retriever, index, names, problems={"vqa": "disabled at startup"})


@contextlib.contextmanager
def client_for(models: ServiceModels, keys=(), **settings):
    app = create_app(models, ServeSettings(**settings), APIKeys(keys))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture()
def full(captioner, index):
    """A client over all three tasks, with an API key."""
    vqa = ColourVQA()
    with client_for(build_models(captioner, vqa, ColourRetriever(), index), keys=[KEY]) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        client.vqa = vqa
        yield client


def assert_error(resp, status: int, code: str, words: str = ""):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert words.lower() in body["error"]["message"].lower(), body
    return body["error"]["message"]


def post_image(client, path="/v1/caption", data=b"", name="photo.png", ctype="image/png", **fields):
    return client.post(path, files={"image": (name, data, ctype)}, data={k: str(v) for k, v in fields.items()})


# -- results are the Python API's ------------------------------------------------------------------------
@pytest.mark.parametrize("beam", [1, 3])
def test_caption_equals_python_api(full, captioner, beam):
    data = image_bytes("green", (50, 40))
    resp = post_image(full, data=data, beam=beam)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = captioner(Image.open(io.BytesIO(data)), beam_size=beam, max_len=20)
    assert body["caption"] == expected and body["beam"] == beam and body["model"] == "tiny-caption"
    assert body["tokens"] == expected.split() and isinstance(body["score"], float)


def test_caption_without_options_uses_the_models_own_decoding(full, captioner):
    data = image_bytes("green", (50, 40))
    body = post_image(full, data=data).json()
    assert body["caption"] == captioner(Image.open(io.BytesIO(data))) == captioner(Image.open(io.BytesIO(data)),
                                                                                   beam=3)
    assert body["beam"] == captioner.decode_defaults.width == 3
    short = post_image(full, data=data, max_len=2).json()
    assert short["caption"] == captioner(Image.open(io.BytesIO(data)), max_len=2) and len(short["tokens"]) <= 2


def test_caption_lang_picks_the_language_served(captioner, tmp_path):
    chinese = Captioner.from_pretrained(make_tiny_captioner(tmp_path / "tiny-zh", lang="zh"))
    models = ServiceModels(captioner, names={"caption": "tiny-caption"}, more_captioners=[chinese],
                           more_caption_names=["tiny-zh"])
    data = image_bytes("green", (50, 40))
    with client_for(models) as client:
        zh = post_image(client, data=data, lang="zh").json()
        assert zh["lang"] == "zh" and zh["model"] == "tiny-zh"
        assert zh["caption"] == chinese(Image.open(io.BytesIO(data))) and " " not in zh["caption"]
        en = post_image(client, data=data).json()  # no lang: the caption model's own
        assert en["lang"] == "en" and en["caption"] == captioner(Image.open(io.BytesIO(data)))
        assert post_image(client, data=data, lang="en", beam=1).json()["lang"] == "en"
        assert_error(post_image(client, data=data, lang="fr"), 422, "invalid_parameter", "unknown language 'fr'")
        assert_error(post_image(client, data=data, lang="x" * 100), 422, "invalid_parameter", "lang")
        caption = client.get("/v1/models").json()["models"]["caption"]
        assert caption["lang"] == "en" and caption["langs"] == {"en": "tiny-caption", "zh": "tiny-zh"}
    with client_for(build_models(captioner)) as client:
        assert_error(post_image(client, data=data, lang="zh"), 422, "invalid_parameter",
                     "this service captions in en, not 'zh' (start it with --caption-lang en,zh)")


def test_vqa_answers_from_pixels(full):
    resp = post_image(full, "/v1/vqa", image_bytes("blue", fmt="JPEG"), "b.jpg", "image/jpeg",
                      question="  what colour is it?  ", top_k=2)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["answer"] == "blue" and body["question"] == "what colour is it?"
    assert [t["answer"] for t in body["top"]][0] == "blue" and len(body["top"]) == 2
    assert body["sure"] is True and body["doubt"] == ""
    body = post_image(full, "/v1/vqa", image_bytes("blue"), question="what is the meaning of life?").json()
    assert body["sure"] is False and body["doubt"] == "it only knows colour questions"


def test_search_by_text_and_by_image_with_thumbnails(full, index):
    resp = full.post("/v1/search", json={"text": "something red", "k": 2})
    assert resp.status_code == 200, resp.text
    hits = resp.json()["hits"]
    assert len(hits) == 2 and hits[0]["path"].endswith("red.png") and hits[0]["score"] > hits[1]["score"]
    thumb = full.get(hits[0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (64, 48)  # smaller than the limit: kept as is
    resp = post_image(full, "/v1/search", image_bytes("yellow"), k=3)
    assert resp.status_code == 200, resp.text
    assert resp.json()["hits"][0]["path"].endswith("yellow.png") and len(resp.json()["hits"]) == 3


def test_models_readyz_healthz(full):
    models = full.get("/v1/models").json()["models"]
    assert models["caption"] == {"loaded": True, "model": "tiny-caption", "lang": "en",  # its language, the languages
                                 "langs": {"en": "tiny-caption"},  # served, its saved decoding default, and
                                 "decode": dataclasses.asdict(CaptionDecodeConfig()),  # images encoded and decoding
                                 "image_encoder": "onnxruntime", "decoding_step": "onnxruntime"}  # steps run by ORT
    assert models["retrieval"]["index"]["images"] == 4
    assert full.get("/readyz").json() == {"ready": True, "models": {"caption": True, "vqa": True, "retrieval": True,
                                                                     "tagging": False}}
    assert full.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}


def test_only_captioning_loaded_reports_others_503(captioner):
    with client_for(build_models(captioner)) as client:  # no keys: loopback-only mode
        assert client.get("/readyz").json()["models"] == {"caption": True, "vqa": False, "retrieval": False,
                                                          "tagging": False}
        assert client.get("/v1/models").json()["models"]["vqa"] == {"loaded": False, "reason": "disabled at startup"}
        assert_error(post_image(client, "/v1/vqa", image_bytes(), question="what?"), 503, "model_not_loaded", "vqa")
        assert_error(client.post("/v1/search", json={"text": "a dog"}), 503, "model_not_loaded", "retrieval")
        assert_error(client.get("/v1/thumbnail", params={"path": "x"}), 503, "model_not_loaded")
        assert post_image(client, data=image_bytes()).status_code == 200


def test_no_models_not_ready():
    with client_for(build_models()) as client:
        assert_error(client.get("/readyz"), 503, "not_ready", "no model")


# -- auth -------------------------------------------------------------------------------------------------
def test_auth_required_before_any_work(captioner, index):
    vqa = ColourVQA()
    with client_for(build_models(captioner, vqa, ColourRetriever(), index), keys=[KEY, "another-key-abcdefghijk"]
                    ) as client:
        args = dict(path="/v1/vqa", data=image_bytes(), question="what colour?")
        assert_error(post_image(client, **args), 401, "unauthorized", "missing API key")
        wrong = {"Authorization": "Bearer " + KEY[:-1] + "X"}
        assert_error(client.post("/v1/vqa", headers=wrong, files={"image": ("a.png", image_bytes())},
                                 data={"question": "what colour?"}), 401, "unauthorized", "not accepted")
        assert_error(client.get("/v1/models", headers={"X-API-Key": "nope"}), 401, "unauthorized")
        assert_error(client.get("/metrics"), 401, "unauthorized")
        assert client.get("/v1/models", headers={"X-API-Key": "nope"}).headers["www-authenticate"] == "Bearer"
        # a huge body with no key is refused by the key check, not read
        assert_error(client.post("/v1/caption", content=b"x" * (11 << 20)), 401, "unauthorized")
        assert vqa.batches == []  # no model work was done for any refused request
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
        ok = client.post("/v1/vqa", headers={"X-API-Key": "another-key-abcdefghijk"},
                         files={"image": ("a.png", image_bytes("green"))}, data={"question": "what colour?"})
        assert ok.status_code == 200 and ok.json()["answer"] == "green" and vqa.batches == [1]
        ok = client.get("/v1/models", headers={"authorization": f"bearer {KEY}"})
        assert ok.status_code == 200


def test_api_keys_compare_and_sources(tmp_path):
    keys = APIKeys(["k" * 20, "j" * 24])
    assert keys.check("k" * 20) and keys.check("j" * 24)
    assert not keys.check("k" * 19) and not keys.check("") and not keys.check(None) and not keys.check("k" * 21)
    f = tmp_path / "keys.txt"
    f.write_text("# service keys\n\n  first-key-0123456789  \nsecond-key-0123456789\n")
    assert read_keys_file(f) == ["first-key-0123456789", "second-key-0123456789"]
    both = load_api_keys(str(f), environ={"VLFUSE_API_KEYS": "env-key-0123456789abc, "})
    assert len(both) == 3 and both.check("env-key-0123456789abc")
    assert len(load_api_keys(None, environ={"VLFUSE_API_KEYS_FILE": str(f)})) == 2
    assert not load_api_keys(None, environ={}).enabled
    f.write_text("short\n")
    with pytest.raises(ConfigError, match="shorter than 16"):
        read_keys_file(f)
    with pytest.raises(ConfigError, match="does not exist"):
        read_keys_file(tmp_path / "missing.txt")


def test_no_keys_means_loopback_only():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0 without API keys"):
        check_bind_allowed("0.0.0.0", APIKeys([]))
    check_bind_allowed("0.0.0.0", APIKeys(["k" * 20]))
    check_bind_allowed("127.0.0.1", APIKeys([]))


def test_cli_refuses_public_bind_without_keys(caption_dir):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "vlfuse", "serve", "--host", "0.0.0.0", "--port", "1",
                           "--caption-model", str(caption_dir)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("vlfuse serve: error: refusing to listen on 0.0.0.0 without API keys")
    assert "Traceback" not in proc.stderr


# -- bad input --------------------------------------------------------------------------------------------
def test_upload_limits(captioner):
    with client_for(build_models(captioner), max_upload_bytes=5000, max_pixels=100 * 100) as client:
        big = image_bytes("red", (400, 400), fmt="BMP")  # 480 kB: over the 5000-byte upload limit
        assert_error(post_image(client, data=big[:20_000]), 413, "upload_too_large", "5,000 bytes")
        assert_error(post_image(client, data=big), 413, "payload_too_large", "request body")
        assert_error(post_image(client, data=image_bytes("red", (101, 100))), 413, "image_too_large", "10,000")
        assert post_image(client, data=image_bytes("red", (100, 100))).status_code == 200


def test_decompression_bomb_is_413_before_decoding(full):
    msg = assert_error(post_image(full, data=png_bomb(), name="bomb.png"), 413, "image_too_large", "bomb.png")
    assert "100000x100000" in msg


@pytest.mark.parametrize("data,name,ctype,status,code,words", [
    (b"hello, I am text", "notes.txt", "text/plain", 415, "unsupported_media_type", "JPEG, PNG"),
    (b"%PDF-1.4 fake", "doc.pdf", "image/png", 415, "unsupported_media_type", "not a supported image type"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "x.svg", "image/svg+xml", 415, "unsupported_media_type", ""),
    (b"", "empty.png", "image/png", 400, "bad_image", "empty"),
    (image_bytes("red", fmt="JPEG")[:60], "cut.jpg", "image/jpeg", 400, "bad_image", "cut.jpg"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "junk.png", "image/png", 400, "bad_image", "junk.png"),
])
def test_bad_images(full, data, name, ctype, status, code, words):
    for path, extra in (("/v1/caption", {}), ("/v1/vqa", {"question": "what colour?"}), ("/v1/search", {})):
        assert_error(post_image(full, path, data, name, ctype, **extra), status, code, words)
    assert post_image(full, data=image_bytes()).status_code == 200  # still serving


@pytest.mark.parametrize("fields,words", [
    ({"beam": 0}, "beam"), ({"beam": 99}, "less than or equal to 8"), ({"beam": "wide"}, "beam"),
    ({"max_len": 0}, "max_len"),
])
def test_caption_bad_parameters(full, fields, words):
    assert_error(post_image(full, data=image_bytes(), **fields), 422, "invalid_parameter", words)


def test_missing_fields(full):
    assert_error(full.post("/v1/caption", data={"beam": "2"}), 422, "invalid_parameter", "image: this field is required")
    assert_error(full.post("/v1/vqa", files={"image": ("a.png", image_bytes())}), 422, "invalid_parameter", "question")
    assert_error(full.post("/v1/search", files={"k": (None, "3")}), 422, "invalid_parameter", "image")
    assert_error(full.post("/v1/caption", data={"image": "not a file"}), 422, "invalid_parameter", "image")


@pytest.mark.parametrize("question,words", [("   ", "empty"), ("why " * 60, "over the limit of 200")])
def test_vqa_bad_questions(full, question, words):
    assert_error(post_image(full, "/v1/vqa", image_bytes(), question=question), 422, "invalid_parameter", words)
    assert full.vqa.batches == []  # checked before any model work


def test_vqa_model_input_error_fails_only_that_request(captioner):
    vqa = ColourVQA(delay_s=0.05)
    with client_for(build_models(captioner, vqa), batch_wait_ms=100) as client:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(post_image, client, "/v1/vqa", image_bytes("red"), question=q)
                    for q in ("what colour?", "boom?", "what colour is it", "colour?")]
            resps = [f.result() for f in futs]
        assert [r.status_code for r in resps] == [200, 422, 200, 200]
        assert_error(resps[1], 422, "invalid_parameter", "forbidden word")
        assert all(r.json()["answer"] == "red" for i, r in enumerate(resps) if i != 1)


@pytest.mark.parametrize("body,status,code,words", [
    ({"text": "red", "k": 0}, 422, "invalid_parameter", "between 1 and 50"),
    ({"text": "red", "k": 51}, 422, "invalid_parameter", "between 1 and 50"),
    ({"text": "red", "k": "many"}, 422, "invalid_parameter", "whole number"),
    ({"text": "red", "k": 2.5}, 422, "invalid_parameter", "whole number"),
    ({"text": "   "}, 422, "invalid_parameter", "non-empty"),
    ({"text": 5}, 422, "invalid_parameter", "non-empty"),
    ({"text": "x" * 501}, 422, "invalid_parameter", "over the limit of 500"),
    ({"text": "red", "limit": 3}, 422, "invalid_parameter", "unknown field"),
    (["red"], 422, "invalid_parameter", "JSON object"),
    ({"text": "red", "lang": "fr"}, 422, "invalid_parameter", "lang: must be 'auto' or one of en"),
    ({"text": "红色", "lang": "zh"}, 422, "invalid_parameter", "one of en, got 'zh'"),  # this model reads English
])
def test_search_bad_json(full, body, status, code, words):
    assert_error(full.post("/v1/search", json=body), status, code, words)


def test_search_bad_requests(full):
    assert_error(full.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "bad_request", "not valid JSON")
    assert_error(full.post("/v1/search", content=b"text=red", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type", "application/json")
    assert_error(post_image(full, "/v1/search", image_bytes(), k=0), 422, "invalid_parameter", "k")
    assert full.post("/v1/search", json={"text": "blue"}).json()["query"] == {"text": "blue", "k": 5, "lang": "auto"}
    assert full.get("/v1/models").json()["models"]["retrieval"]["langs"] == ["en"]  # what a search may be in
    assert full.post("/v1/search", json={"text": "blue", "lang": "en"}).json()["hits"][0]["path"].endswith("blue.png")


def test_thumbnails_only_for_indexed_paths(full, index, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(image_bytes())
    for path in (str(outside), "/etc/passwd", index.paths[0] + "/../red.png", "../" + index.paths[0]):
        assert_error(full.get("/v1/thumbnail", params={"path": path}), 404, "not_found", "index")
    assert full.get("/v1/thumbnail", params={"path": index.paths[1]}).status_code == 200
    assert_error(full.get("/v1/thumbnail"), 422, "invalid_parameter", "path")


def test_unknown_routes_and_methods_are_json(full):
    assert_error(full.get("/v1/nothing"), 404, "not_found")
    assert_error(full.get("/v1/caption"), 405, "method_not_allowed")


def test_timeout_is_504_and_service_recovers(captioner):
    vqa = ColourVQA(delay_s=0.5)
    with client_for(build_models(captioner, vqa), request_timeout_s=0.1) as client:
        assert_error(post_image(client, "/v1/vqa", image_bytes(), question="colour?"), 504, "timeout", "0.1 s")
        vqa.delay_s = 0.0
        time.sleep(0.6)  # the abandoned batch still occupies the inference thread until it ends
        ok = post_image(client, "/v1/vqa", image_bytes("green"), question="colour?")
        assert ok.status_code == 200 and ok.json()["answer"] == "green"


def test_internal_error_is_json_500_and_service_recovers(captioner):
    class Broken(ColourVQA):
        def predict(self, *a, **kw):
            raise RuntimeError("kaput")

    with client_for(build_models(captioner, Broken())) as client:
        assert_error(post_image(client, "/v1/vqa", image_bytes(), question="colour?"), 500, "internal_error",
                     "RuntimeError")
        assert post_image(client, data=image_bytes()).status_code == 200


# -- batching and metrics ---------------------------------------------------------------------------------
def test_batcher_groups_by_key_and_caps_batch_size():
    calls = []

    def fn(key, items):
        calls.append((key, list(items)))
        return [f"{key}:{i}" for i in items]

    async def main():
        pool = concurrent.futures.ThreadPoolExecutor(1)
        b = Batcher("t", fn, pool, max_batch_size=4, wait_s=0.05)
        b.start()
        jobs = [b.submit(i, key=i % 2) for i in range(10)]
        results = await asyncio.gather(*jobs)
        await b.stop()
        pool.shutdown()
        return results

    results = asyncio.run(main())
    assert results == [f"{i % 2}:{i}" for i in range(10)]
    assert all(len(items) <= 4 and all(i % 2 == key for i in items) for key, items in calls)
    assert sum(len(items) for _, items in calls) == 10 and len(calls) == 4  # 5 evens -> 4+1, 5 odds -> 4+1


def test_batcher_runs_up_to_max_in_flight_batches_at_once():
    active, peak, lock = [0], [0], threading.Lock()

    def fn(key, items):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return [i * 10 for i in items]

    async def main(in_flight):
        pool = concurrent.futures.ThreadPoolExecutor(in_flight)
        b = Batcher("t", fn, pool, max_batch_size=2, wait_s=0.0, max_in_flight=in_flight)
        b.start()
        start = time.perf_counter()
        results = await asyncio.gather(*(b.submit(i) for i in range(8)))
        await b.stop()  # waits for the batches in flight
        pool.shutdown()
        return results, time.perf_counter() - start

    results, _ = asyncio.run(main(1))
    assert results == [i * 10 for i in range(8)] and peak[0] == 1
    peak[0] = 0
    results, _ = asyncio.run(main(2))
    assert results == [i * 10 for i in range(8)] and peak[0] == 2 and active[0] == 0
    with pytest.raises(ValueError, match="max_in_flight"):
        Batcher("t", fn, None, max_batch_size=2, wait_s=0.0, max_in_flight=0)


def test_batcher_shares_a_burst_among_idle_workers():
    """Eight requests arriving together with two idle workers run as two batches of four at once, not as one
    batch of eight on one worker while the other waits."""
    sizes, active, peak, lock = [], [0], [0], threading.Lock()

    def fn(key, items):
        with lock:
            sizes.append(len(items))
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return [i + 1 for i in items]

    async def main():
        pool = concurrent.futures.ThreadPoolExecutor(2)
        b = Batcher("t", fn, pool, max_batch_size=32, wait_s=0.05, max_in_flight=2)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(8)))
        await b.stop()
        pool.shutdown()
        return results

    assert asyncio.run(main()) == [i + 1 for i in range(8)]
    assert sorted(sizes) == [4, 4] and peak[0] == 2


def test_concurrent_requests_are_batched_and_counted(caption_dir):
    # the float decoder: the int8 one scales each batch's activations by that batch's range, so with this
    # untrained model's near-tied words a caption may change with its batch-mates (a real model's rarely do)
    captioner = Captioner.from_pretrained(caption_dir, int8=False)
    with client_for(build_models(captioner), batch_wait_ms=200, max_batch_size=8) as client:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            resps = list(pool.map(lambda c: post_image(client, data=image_bytes(c), beam=2),
                                  ["red", "green", "blue", "yellow", "red", "green"]))
        assert all(r.status_code == 200 for r in resps)
        expected = captioner([Image.open(io.BytesIO(image_bytes(c))) for c in ["red", "green"]], beam_size=2)
        assert [r.json()["caption"] for r in resps[:2]] == expected  # batching does not change results
        post_image(client, data=b"junk")
        scrape = client.get("/metrics")
    assert scrape.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = prometheus_samples(scrape.text)
    assert samples[("vlfuse_batch_size_count", (("model", "caption"),))] < 6  # some requests shared a batch
    assert samples[("vlfuse_batch_size_sum", (("model", "caption"),))] == 6
    caption_ok = (("endpoint", "/v1/caption"), ("method", "POST"), ("status", "200"))
    assert samples[("vlfuse_http_requests_total", caption_ok)] == 6
    assert samples[("vlfuse_http_requests_total", caption_ok[:2] + (("status", "415"),))] == 1
    assert samples[("vlfuse_http_request_duration_seconds_count", (("endpoint", "/v1/caption"),))] == 7
    assert samples[("vlfuse_model_loaded", (("model", "caption"),))] == 1
    assert samples[("vlfuse_model_loaded", (("model", "vqa"),))] == 0
    assert "# TYPE vlfuse_http_request_duration_seconds histogram" in scrape.text


def prometheus_samples(text: str) -> dict:
    """{(sample name, sorted labels): value} from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_app_counts_only_its_own_requests(captioner):
    """Apps in one process (the tests make many) keep separate metrics."""
    with client_for(build_models(captioner)) as first, client_for(build_models(captioner)) as second:
        for _ in range(3):
            first.get("/healthz")
        second.get("/healthz")
        healthz = ("vlfuse_http_requests_total", (("endpoint", "/healthz"), ("method", "GET"), ("status", "200")))
        assert prometheus_samples(first.get("/metrics").text)[healthz] == 3
        assert prometheus_samples(second.get("/metrics").text)[healthz] == 1
        openmetrics = second.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.rstrip().endswith("# EOF")


# -- docs, page, packaging --------------------------------------------------------------------------------
def test_openapi_docs_and_page_are_offline(full):
    spec = full.get("/openapi.json").json()
    for path in ("/v1/caption", "/v1/vqa", "/v1/search", "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]) == {"application/json",
                                                                                   "multipart/form-data"}
    page = full.get("/")
    assert page.status_code == 200 and "vlfuse" in page.text
    assert full.get("/docs").status_code == 200
    from vlfuse.serving.routes.status import STATIC_DIR

    for f in STATIC_DIR.iterdir():
        text = f.read_text()
        assert not re.search(r"https?://|(src|href)=[\"']?//|url\(", text), f.name  # nothing fetched off-site
        assert full.get(f"/static/{f.name}").status_code == 200


def test_importing_vlfuse_does_not_import_fastapi():
    code = "import sys, vlfuse, vlfuse.cli.main; sys.exit(int(any(m.split('.')[0] in ('fastapi', 'uvicorn', " \
           "'starlette', 'prometheus_client') for m in sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_first_start_builds_the_onnx_graphs_in_a_child_process(caption_dir, tmp_path, monkeypatch, caplog):
    """With an empty graph cache the server exports the caption model's ONNX Runtime graphs in a child process
    (the exporter's memory never enters the server) and reads them from the cache; if the child fails, it
    exports them itself."""
    import logging

    from vlfuse.runtime import onnx_step as onnx_decoder
    from vlfuse.runtime import onnx_vision
    from vlfuse.serving import models as service_models

    cache = tmp_path / "cache"

    def no_export(*args, **kwargs):
        raise AssertionError("exported in the server's own process")

    with monkeypatch.context() as m:
        m.setattr(onnx_vision, "export_onnx", no_export)
        m.setattr(onnx_decoder, "export_step", no_export)
        models = ServiceModels.load(ModelChoice(str(caption_dir)), NONE, NONE, tagging=NONE,
                                    runtime=RuntimeOptions(cache_dir=cache))
    captioner, weights = models.captioner, Captioner.from_pretrained(str(caption_dir)).model
    assert sorted(p.name for p in cache.glob("*.onnx")) == sorted(
        [onnx_vision.graph_name(weights.vision), onnx_decoder.step_graph_name(weights.decoder)])
    assert captioner.runtime.backends() == {"image_encoder": "onnxruntime", "decoding_step": "onnxruntime"}
    assert captioner.runtime.graphs_to_build() == []  # built: a second start has nothing to export

    monkeypatch.setattr(service_models, "_BUILD_GRAPHS", "raise SystemExit('no luck')")
    with caplog.at_level(logging.WARNING, logger="vlfuse.serving.models"):
        models = ServiceModels.load(ModelChoice(str(caption_dir)), NONE, NONE, tagging=NONE,
                                    runtime=RuntimeOptions(cache_dir=tmp_path / "cache2"))
    assert "no luck" in caplog.text  # exported here instead
    assert models.captioner.runtime.backends()["decoding_step"] == "onnxruntime"


def test_service_models_load_subset_and_errors(caption_dir):
    models = ServiceModels.load(ModelChoice(str(caption_dir)), NONE, NONE, tagging=NONE)
    assert models.loaded() == {"caption": True, "vqa": False, "retrieval": False, "tagging": False}
    assert models.describe()["vqa"] == {"loaded": False, "reason": "disabled at startup"}
    assert models.describe()["caption"]["image_encoder"] == "onnxruntime"
    plain = ServiceModels.load(ModelChoice(str(caption_dir)), NONE, NONE, tagging=NONE,
                               runtime=RuntimeOptions(onnx=False))
    assert plain.describe()["caption"]["image_encoder"] == "torch"  # `vlfuse serve --no-onnx`
    assert plain.describe()["caption"]["decoding_step"] == "torchscript"
    from vlfuse.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        ServiceModels.load(ModelChoice("no-such-model"), NONE, NONE, tagging=NONE)
    with pytest.raises(ModelNotFoundError, match="needs a retrieval model"):
        ServiceModels.load(ModelChoice(str(caption_dir)), NONE, NONE, tagging=NONE, index="x.idx")
    json.dumps(models.describe())


def test_service_models_load_more_caption_languages(caption_dir):
    """`vlfuse serve --caption-lang en,zh`: the caption model's language, and the built-in model of each other one."""
    from vlfuse.errors import ModelNotFoundError

    models = ServiceModels.load(ModelChoice(str(caption_dir)), NONE, NONE, tagging=NONE, caption_langs=["en", "zh"])
    assert models.describe()["caption"]["langs"] == {"en": str(caption_dir), "zh": "flickr8k-caption-zh"}
    assert models.captioners["zh"].lang == "zh" and models.caption_lang(None) == "en"
    with pytest.raises(ConfigError, match="unknown language 'fr'"):
        ServiceModels.load(ModelChoice(str(caption_dir)), NONE, NONE, tagging=NONE, caption_langs=["fr"])
    with pytest.raises(ModelNotFoundError, match="captions in 'zh' were asked for, but no caption model is loaded"):
        ServiceModels.load(NONE, NONE, NONE, tagging=NONE, caption_langs=["zh"])


def test_vqa_endpoint_equals_shipped_easyvqa_model(captioner):
    vqa_module = pytest.importorskip("vlfuse.tasks.vqa.pipeline")  # merged from the vqa branch
    model = vqa_module.QuestionAnswerer.from_pretrained("easyvqa")
    data = image_bytes("red", (64, 64))
    with client_for(build_models(captioner, model)) as client:
        resp = post_image(client, "/v1/vqa", data, question="what color is the shape?", top_k=2)
        assert_error(post_image(client, "/v1/vqa", data, question="?" * 201), 422, "invalid_parameter", "200")
    assert resp.status_code == 200, resp.text
    expected = model.predict([Image.open(io.BytesIO(data))], ["what color is the shape?"], top_k=2)[0]
    body = resp.json()
    assert body["answer"] == expected.answer and abs(body["probability"] - expected.probability) < 1e-6
    assert [t["answer"] for t in body["top"]] == [a for a, _ in expected.top]


# -- the service captions as the CLI does (shipped model, real photos) ------------------------------------
PARITY_PHOTOS = 8  # the first val photos
DECODINGS = {"greedy": (["--beam", "1"], False),  # the service's default: greedy unless started with --caption-rerank
             "rerank": ([], True)}                 # the model's own default, reranking, in both


def cli_captions(paths, *args) -> list:
    """``vlfuse caption --json PATHS ARGS`` -> one caption per path, in order."""
    from vlfuse.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["caption", "--json", *map(str, paths), *args]) == 0
    return [json.loads(line)["caption"] for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module", params=sorted(DECODINGS))
def parity(request):
    """(decoding, photo paths, the service's caption of each photo sent on its own)."""
    from conftest import flickr_or_skip

    flickr = flickr_or_skip()
    decoding = request.param
    cli_args, caption_rerank = DECODINGS[decoding]
    paths = [flickr / "images" / n for n in (flickr / "val.txt").read_text().split()[:PARITY_PHOTOS]]
    models = ServiceModels.load(ModelChoice(), NONE, NONE, tagging=NONE, caption_rerank=caption_rerank)
    if models.captioner is None:  # reranking needs pycocoevalcap
        pytest.skip(models.problems["caption"])
    assert models.captioner.decode_defaults.strategy == decoding
    with client_for(models) as client:  # one request at a time: each photo is a batch of its own
        served = []
        for path in paths:
            resp = post_image(client, data=path.read_bytes(), name=path.name, ctype="image/jpeg")
            assert resp.status_code == 200, resp.text
            served.append(resp.json()["caption"])
    return decoding, paths, served


def test_service_captions_equal_the_clis_with_the_same_settings(parity):
    """`vlfuse serve` (greedy by default; the model's reranking with --caption-rerank) gives the captions of
    `vlfuse caption --beam 1` (greedy) and of `vlfuse caption` (its default, reranking): the service passes the
    CLI's decoding settings. The CLI captions one photo per batch here, as the service does a lone request."""
    decoding, paths, served = parity
    assert served == cli_captions(paths, *DECODINGS[decoding][0], "--batch-size", "1")


def test_service_captions_equal_the_clis_whatever_the_batch(parity):
    """The CLI captions the photos in one batch, the service one at a time: a caption must depend only on the
    photo, the model and the decoding settings (issue 19, determinism: samples seeded per image from its pixels,
    int8 decoding copies decode each image on its own)."""
    decoding, paths, served = parity
    assert served == cli_captions(paths, *DECODINGS[decoding][0])
