"""Batch jobs on Ray (``--engine ray``): the same output as the local commands, photo for photo; a bad file is an
error line, not a failed job; ``--resume``; a worker killed mid-run loses and repeats nothing; without Ray the
command says how to install it. One local Ray cluster (loopback, 2 CPUs) serves the whole module."""
from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vlfuse.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k" / "images"
if not FLICKR.is_dir():
    FLICKR = Path("/work/shared/data/flickr8k/images")
pytestmark = pytest.mark.skipif(not FLICKR.is_dir(), reason="needs the Flickr8k photos in ../shared/data")

N_PHOTOS = 10


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """10 Flickr8k photos, a truncated JPEG and a text file named .jpg."""
    folder = tmp_path_factory.mktemp("photos")
    names = sorted(os.listdir(FLICKR))[:N_PHOTOS + 1]
    for name in names[:N_PHOTOS]:
        shutil.copy(FLICKR / name, folder / name)
    (folder / "truncated.jpg").write_bytes((FLICKR / names[N_PHOTOS]).read_bytes()[:3000])
    (folder / "text.jpg").write_text("not a photo\n")
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """The local commands on one thread, as the Ray workers run (--threads 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster on loopback with 2 CPUs for the module; its address (HOST:PORT) for subprocesses
    (loopback only and token authentication with a token of the session's own: tests/conftest.py)."""
    ray = pytest.importorskip("ray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:"), address
        yield address
    finally:
        ray.shutdown()


def run_cli(argv, capsys):
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def error_lines(stderr: str):
    return sorted(line for line in stderr.splitlines() if line.startswith("vlfuse caption: error:"))


@pytest.fixture(scope="module")
def local_captions(photos, one_thread):
    """The local command's --json output and its error lines (one thread)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(["caption", str(photos), "--json", "--batch-size", "4"])
    assert status == 2  # two bad files
    return out.getvalue(), error_lines(err.getvalue())


def test_without_ray_the_command_says_how_to_install_it(photos, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    status, out, err = run_cli(["caption", str(photos), "--engine", "ray"], capsys)
    assert status == 2 and out == ""
    assert "pip install 'vlfuse[ray]'" in err


def test_caption_on_ray_equals_local_with_error_lines_for_bad_files(photos, local_captions, cluster):
    # the real entry point in its own process, connecting to the cluster by address
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "vlfuse", "caption", str(photos), "--json", "--batch-size", "4",
                          "--engine", "ray", "--address", cluster, "--actors", "2", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=240)
    expected, expected_errors = local_captions
    assert out.returncode == 2, out.stderr[-3000:]  # the bad files, as locally
    assert out.stdout == expected  # every line, byte for byte: same captions, same scores, same order
    assert len(expected.splitlines()) == N_PHOTOS
    assert error_lines(out.stderr) == expected_errors and len(expected_errors) == 2
    assert "photo/s" in out.stderr  # the progress line


def test_resume_appends_only_what_is_missing(photos, local_captions, cluster, tmp_path, capsys):
    expected = local_captions[0].splitlines(keepends=True)
    done = tmp_path / "captions.jsonl"
    done.write_text("".join(expected[:3]) + expected[3][:25])  # three done, the fourth cut off by a killed run
    status, out, err = run_cli(["caption", str(photos), "--json", "--batch-size", "4", "--engine", "ray",
                                "--resume", str(done), "--no-progress"], capsys)
    assert status == 2 and out == ""
    assert done.read_text() == "".join(expected)  # nothing lost, nothing twice, in order
    assert "holds 3 of these photos" in err


def test_index_on_ray_equals_local_bitwise(photos, one_thread, cluster, tmp_path, capsys):
    from vlfuse.tasks.retrieval.index import ImageIndex

    local, ray_out = tmp_path / "local.idx", tmp_path / "ray.idx"
    assert run_cli(["index", "build", str(photos), "--out", str(local), "--batch-size", "4", "--no-progress"],
                   capsys)[0] == 0
    status, _, err = run_cli(["index", "build", str(photos), "--out", str(ray_out), "--engine", "ray",
                              "--actors", "2", "--batch-size", "4", "--no-progress"], capsys)
    assert status == 0, err
    a, b = ImageIndex.load(local), ImageIndex.load(ray_out)
    assert len(a) == N_PHOTOS and a.paths == b.paths and a.model_id == b.model_id
    assert np.array_equal(a.vectors, b.vectors)  # bit for bit (same chunks, same thread count)
    assert np.array_equal(a.sizes, b.sizes) and np.array_equal(a.mtimes, b.mtimes)
    assert "skipped 2" in err


def worker_pids(name: str):
    """Processes under this one (the cluster's raylet and its workers) running Ray actor ``name``."""
    mine = {os.getpid()}
    found, procs = [], {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        procs[int(pid)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    for pid, (_, cmd) in procs.items():
        ancestor, seen = pid, 0
        while ancestor in procs and ancestor not in mine and seen < 50:
            ancestor, seen = procs[ancestor][0], seen + 1
        if ancestor in mine and name in cmd:
            found.append(pid)
    return found


def test_a_worker_killed_mid_run_loses_and_repeats_nothing(photos, local_captions, cluster, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    originals = sorted(p for p in os.listdir(photos) if p not in ("truncated.jpg", "text.jpg"))
    for i in range(40):  # 40 files, copies of the 10 photos: 20 chunks for one worker
        shutil.copy(photos / originals[i % N_PHOTOS], folder / f"{i:02d}_{originals[i % N_PHOTOS]}")
    out = tmp_path / "captions.jsonl"
    result = {}

    def job():
        result["status"] = main(["caption", str(folder), "--json", "--batch-size", "2", "--engine", "ray",
                                 "--actors", "1", "--resume", str(out), "--no-progress"])

    thread = threading.Thread(target=job)
    thread.start()
    killed, lines_then = None, None
    deadline = time.monotonic() + 120
    while thread.is_alive() and killed is None and time.monotonic() < deadline:
        lines = out.read_text().count("\n") if out.exists() else 0
        pids = worker_pids("CaptionWorker")
        if lines >= 2 and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed, lines_then = pids[0], lines
        time.sleep(0.01)
    restarted = set()
    while thread.is_alive() and time.monotonic() < deadline:  # Ray starts the worker again, and it finishes the job
        restarted.update(worker_pids("CaptionWorker"))
        time.sleep(0.05)
    thread.join(timeout=180)
    print(f"killed worker {killed} after {lines_then} of 40 lines; worker(s) after: {sorted(restarted - {killed})}")
    assert not thread.is_alive() and result["status"] == 0
    assert killed is not None and lines_then < 40, "the worker was not killed while the job ran"
    assert restarted - {killed}, "Ray did not start the worker again"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(folder / name) for name in sorted(os.listdir(folder))]  # each once
    local = {Path(r["image"]).name: r for r in map(json.loads, local_captions[0].splitlines())}
    for r in rows:  # and what the local command wrote for the same photo
        same = local[Path(r["image"]).name.split("_", 1)[1]]
        assert (r["caption"], r["score"]) == (same["caption"], same["score"])


def test_serve_joins_a_running_cluster_by_address(cluster, photos):
    """``vlfuse serve --engine ray --address`` joins the cluster (as the batch commands do, through the same
    ``init_ray``), answers like the local service, and on SIGTERM removes its application and leaves the cluster
    running."""
    import httpx
    from serving_helpers import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "vlfuse", "serve", "--engine", "ray", "--address", cluster, "--port", str(port),
           "--vqa-model", "none", "--retrieval-model", "none", "--tagging-model", "none", "--min-replicas", "1",
           "--max-replicas", "1", "--replica-cpus", "0.5", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the service did not become ready"
            time.sleep(1)
        photo = sorted(photos.glob("*.jpg"))[0]
        r = httpx.post(base + "/v1/caption", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["caption"].split()) >= 3, r.text
        assert httpx.post(base + "/v1/vqa", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                          data={"question": "what is it?"}, timeout=30).status_code == 503  # left out: 'none'
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(90)
    import ray

    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2.0  # the cluster is still up
