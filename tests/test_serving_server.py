"""The real server: ``python -m vlfuse serve`` on a free loopback port, spoken to over HTTP; SIGTERM lets the
requests in flight finish."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving_helpers import image_bytes, make_tiny_captioner

httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[1]
KEY = "server-test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "vlfuse", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def wait_ready(base: str, proc, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def test_real_server_over_http_and_graceful_shutdown(tmp_path):
    model = make_tiny_captioner(tmp_path / "tiny-caption")
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# keys\n{KEY}\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # a long batch window keeps requests in flight when SIGTERM arrives
    proc = start_server(["--host", "127.0.0.1", "--port", str(port), "--api-keys-file", str(keys),
                         "--caption-model", str(model), "--vqa-model", "none", "--retrieval-model", "none",
                         "--batch-wait-ms", "1500", "--log-level", "warning", "--threads", "2", "--workers", "2"])
    try:
        wait_ready(base, proc)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(base + "/healthz").json() == {"status": "ok"}
        r = httpx.post(base + "/v1/caption", files={"image": ("a.png", image_bytes("red"))})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = httpx.post(base + "/v1/caption", files={"image": ("a.png", image_bytes("red"))}, data={"beam": "2"},
                       headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["beam"] == 2 and r.json()["caption"]
        r = httpx.post(base + "/v1/vqa", files={"image": ("a.png", image_bytes())}, data={"question": "what?"},
                       headers={"X-API-Key": KEY})
        assert r.status_code == 503 and "disabled" in r.json()["error"]["message"]
        described = httpx.get(base + "/v1/models", headers=auth).json()
        models = described["models"]
        assert described["batching"] == {"max_batch_size": 16, "batch_wait_ms": 1500.0, "inference_workers": 2}
        assert models["caption"]["loaded"] and not models["vqa"]["loaded"] and not models["retrieval"]["loaded"]
        assert 'status="401"' in httpx.get(base + "/metrics", headers=auth).text

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(httpx.post, base + "/v1/caption", files={"image": ("a.png", image_bytes(c))},
                                headers=auth, timeout=30) for c in ("red", "green", "blue", "yellow")]
            time.sleep(0.7)  # all four are now waiting in the 1.5 s batch window
            proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futs]
        assert codes == [200, 200, 200, 200]
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_rejects_a_thread_count_below_one(capsys):
    from vlfuse.cli.main import main

    assert main(["serve", "--threads", "0", "--caption-model", "none"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_serve_rejects_a_worker_count_below_one(capsys):
    from vlfuse.cli.main import main

    assert main(["serve", "--workers", "0", "--caption-model", "none"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
