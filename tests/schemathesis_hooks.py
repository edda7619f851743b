"""Schemathesis against the service's own OpenAPI schema (``/openapi.json``), and the verdict on what it sent.

Schemathesis' CLI (``st run``) loads this module as its hooks (``SCHEMATHESIS_HOOKS=schemathesis_hooks``): an
uploaded ``image`` is, in about half the generated cases, a real photo (PNG, JPEG, GIF, BMP, WebP or TIFF of a
random size and colour), so the generated options (beam, max_len, lang, question, top_k, top, threshold, k) reach
the models too, not only the upload checks. ``run_schemathesis`` runs the CLI with a HAR report of every request
and response; ``har_verdict`` reads it: the statuses, every 5xx, and every 4xx whose body is not the service's JSON
error (``{"error": {"code": str, "message": str}}``, vlfuse/serving/errors.py).
"""
from __future__ import annotations

import collections
import functools
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import schemathesis
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parent
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


def _photo(fmt: str, width: int, height: int, rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), tuple(rgb)).save(buf, format=fmt)
    return buf.getvalue()


photos = st.builds(_photo, st.sampled_from(FORMATS), st.integers(1, 300), st.integers(1, 300),
                   st.tuples(*[st.integers(0, 255)] * 3))


@schemathesis.hook
def flatmap_body(context, body):
    """A multipart body with an ``image`` field: as generated, or with a real photo in that field."""
    if isinstance(body, dict) and "image" in body:
        return st.one_of(st.just(body), photos.map(functools.partial(_with_image, body)))
    return st.just(body)


def _with_image(body: dict, data: bytes) -> dict:  # a named function: Hypothesis describes lambdas by parsing
    return {**body, "image": data}                 # their source, which fails in Schemathesis' worker threads


def run_schemathesis(base_url: str, key: str, max_examples: int, report_dir: Path, seed: int = 0,
                     timeout_s: float = 900.0, workers: int = 2, extra: List[str] = ()) -> dict:
    """``st run`` against ``base_url``'s schema with ``key``, every phase that applies; the HAR's verdict."""
    report_dir = Path(report_dir).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    har = report_dir / "schemathesis.har.json"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{base_url}/openapi.json",
           "-H", f"Authorization: Bearer {key}", "--checks", "not_a_server_error", "--max-examples",
           str(max_examples), "--seed", str(seed), "--report", "har", "--report-har-path", str(har),
           "--no-color", "--workers", str(workers), "--request-timeout", "60", *extra]
    start = time.perf_counter()
    # run in the report folder: Schemathesis and Hypothesis keep their caches in the working directory
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=report_dir)
    verdict = har_verdict(har)
    verdict.update(seconds=round(time.perf_counter() - start, 1), exit_code=proc.returncode,
                   summary=proc.stdout[-3000:])
    return verdict


def _is_error_body(text: str) -> bool:
    try:
        body = json.loads(text)
    except (TypeError, ValueError):
        return False
    err = body.get("error") if isinstance(body, dict) else None
    return (isinstance(body, dict) and set(body) == {"error"} and isinstance(err, dict)
            and isinstance(err.get("code"), str) and isinstance(err.get("message"), str))


def har_verdict(path: Path) -> dict:
    """Requests by status and endpoint, every 5xx, and every 4xx without the JSON error body, from a HAR file."""
    entries = json.loads(Path(path).read_text())["log"]["entries"]
    statuses: Dict[str, int] = collections.Counter()
    by_endpoint: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
    server_errors, bad_4xx = [], []
    for e in entries:
        req, resp = e["request"], e["response"]
        status = resp["status"]
        path_only = "/" + req["url"].split("://", 1)[-1].split("/", 1)[-1].split("?")[0]
        statuses[str(status)] += 1
        by_endpoint[f"{req['method']} {path_only}"][str(status)] += 1
        text = resp.get("content", {}).get("text", "")
        sample = {"request": f"{req['method']} {req['url']}", "status": status, "body": text[:300]}
        if status >= 500:
            server_errors.append(sample)
        elif status >= 400 and not _is_error_body(text):
            bad_4xx.append(sample)
    return {"requests": len(entries), "statuses": dict(sorted(statuses.items())),
            "by_endpoint": {k: dict(sorted(v.items())) for k, v in sorted(by_endpoint.items())},
            "server_errors": len(server_errors), "non_json_4xx": len(bad_4xx),
            "examples": (server_errors + bad_4xx)[:10]}
