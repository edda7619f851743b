"""``vlfuse serve --engine ray``: the service's app in Ray Serve replicas, on a local Ray of 2 CPUs over loopback.
Its answers are the single-process service's, auth is the same, and a replica killed with SIGKILL under load is
replaced while the other keeps answering."""
from __future__ import annotations

import collections
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from serving_helpers import colour_service_models, free_port, image_bytes, make_tiny_captioner

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")

from fastapi.testclient import TestClient  # noqa: E402
from ray import serve  # noqa: E402

from vlfuse.serving import ray_app  # noqa: E402
from vlfuse.serving.app import create_app  # noqa: E402
from vlfuse.serving.settings import APIKeys, ServeSettings  # noqa: E402

KEY = "ray-test-key-0123456789abc"
TESTS = str(Path(__file__).resolve().parent)


def replica_pids() -> dict:
    """{replica actor name: its process id} of the running replicas."""
    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{ray_app.APP_NAME}#"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            try:
                pids[actor["name"]] = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=10)
            except (ray.exceptions.RayError, TimeoutError):
                pass  # dead or not started yet
    return pids


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL of Ray Serve with 2 replicas, the same models' app served in this process by TestClient)."""
    root = tmp_path_factory.mktemp("ray-serve")
    load = functools.partial(colour_service_models, make_tiny_captioner(root / "tiny-caption"), root / "photos")
    settings, keys = ServeSettings(), APIKeys([KEY])
    # the replicas import the tests' helpers (the loader above) beside vlfuse
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, old_path) if p)
    # "local": a Ray of its own, even where a `ray start` on this machine left its address in /tmp/ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        app = ray_app.deployment(load, settings, keys,
                                 ray_app.Scaling(min_replicas=2, max_replicas=2, replica_cpus=0.5))
        port = free_port()
        ray_app.start(app, "127.0.0.1", port)
        with TestClient(create_app(load(), settings, keys)) as local:
            local.headers["Authorization"] = f"Bearer {KEY}"
            yield f"http://127.0.0.1:{port}", local
    finally:
        serve.shutdown()
        ray.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def post(base, path, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + path, headers=headers, timeout=60, **kwargs)


def test_ray_serving_answers_as_local_serving(served):
    base, local = served
    assert ray_app.replica_count() == {"RUNNING": 2}
    photo = image_bytes("green", (50, 40))
    for path, kwargs in [
        ("/v1/caption", {"files": {"image": ("p.png", photo)}}),
        ("/v1/caption", {"files": {"image": ("p.png", photo)}, "data": {"beam": "1", "max_len": "5"}}),
        ("/v1/vqa", {"files": {"image": ("p.png", photo)}, "data": {"question": "what colour is it?"}}),
        ("/v1/search", {"json": {"text": "something blue", "k": 3}}),
        ("/v1/search", {"files": {"image": ("p.png", image_bytes("yellow"))}, "data": {"k": "2"}}),
        ("/v1/tags", {"files": {"image": ("p.png", photo)}, "data": {"threshold": "0"}}),
        ("/v1/vqa", {"files": {"image": ("p.png", b"GIF89a broken")}, "data": {"question": "what?"}}),
    ]:
        got, want = post(base, path, **kwargs), local.post(path, **kwargs)
        assert got.status_code == want.status_code and got.json() == want.json(), (path, got.text, want.text)
    hits = post(base, "/v1/search", json={"text": "red", "k": 1}).json()["hits"]
    thumb = httpx.get(base + hits[0]["thumbnail"], headers={"X-API-Key": KEY})
    assert thumb.status_code == 200 and thumb.content == local.get(hits[0]["thumbnail"]).content
    assert httpx.get(base + "/v1/models", headers={"X-API-Key": KEY}).json() == local.get("/v1/models").json()
    page = httpx.get(base + "/")
    assert page.status_code == 200 and page.text == local.get("/").text


def test_ray_serving_refuses_requests_without_a_key(served):
    base, _ = served
    r = post(base, "/v1/caption", key=None, files={"image": ("p.png", image_bytes())})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = post(base, "/v1/search", key="not-the-key-0123456789", json={"text": "red"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "API key not accepted"
    assert httpx.get(base + "/metrics").status_code == 401
    metrics = httpx.get(base + "/metrics", headers={"X-API-Key": KEY})
    assert metrics.status_code == 200 and 'vlfuse_http_requests_total{endpoint="/v1/caption"' in metrics.text
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}


def test_a_replica_killed_under_load_is_replaced_while_the_other_answers(served):
    base, _ = served
    before = replica_pids()
    assert len(before) == 2
    results, stop = collections.Counter(), threading.Event()
    after_kill = collections.Counter()
    killed_at = [None]

    def client():
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            for _ in range(2000):  # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    code = c.post(base + "/v1/vqa", files={"image": ("p.png", image_bytes("red"))},
                                  data={"question": "what colour?"}).status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                results[code] += 1
                if killed_at[0] is not None and time.time() > killed_at[0] + 1.0:
                    after_kill[code] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        victim = sorted(before.values())[0]
        os.kill(victim, signal.SIGKILL)
        killed_at[0] = time.time()
        deadline = time.time() + 90
        now = {}
        while time.time() < deadline:
            time.sleep(1.0)
            now = replica_pids()
            if len(now) == 2 and victim not in now.values() and ray_app.replica_count() == {"RUNNING": 2}:
                break
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert len(now) == 2 and victim not in now.values(), (before, now)  # the killed one came back, a new process
    assert after_kill[200] > 20, after_kill  # the other kept answering while it was gone
    failed = sum(n for code, n in results.items() if code != 200)
    assert failed <= 4, results  # at most the requests the killed replica held (4 clients)


def test_engine_ray_checks_its_scaling_options(capsys):
    from vlfuse.cli.main import main

    assert main(["serve", "--engine", "ray", "--min-replicas", "3", "--max-replicas", "2",
                 "--caption-model", "none"]) == 2
    assert "max_replicas must be at least 1 and at least min_replicas (3), got 2" in capsys.readouterr().err


def test_engine_ray_without_ray_says_how_to_install_it(monkeypatch, capsys):
    import vlfuse.serving
    from vlfuse.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.delitem(sys.modules, "vlfuse.serving.ray_app", raising=False)
    monkeypatch.delattr(vlfuse.serving, "ray_app", raising=False)
    assert main(["serve", "--engine", "ray", "--caption-model", "none"]) == 2
    assert "pip install 'vlfuse[ray]'" in capsys.readouterr().err
