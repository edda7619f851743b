"""The web page in a real browser: headless Debian Chromium driven by Playwright for Python.

Needs `scripts/install_browser.sh` (apt chromium + pip playwright; no browser downloads). A missing browser
fails the test with a message saying so; set VLFUSE_SKIP_BROWSER_TESTS=1 to skip it on purpose.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from serving_helpers import (
    ColourIndex,
    ColourRetriever,
    ColourVQA,
    image_bytes,
    make_tiny_captioner,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serve_page_test.png"
KEY = "browser-test-key-0123456789"


def _require_browser():
    if os.environ.get("VLFUSE_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("VLFUSE_SKIP_BROWSER_TESTS=1")
    problems = []
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        problems.append(f"{CHROMIUM} not found")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("Playwright for Python is not installed")
    if problems:
        pytest.fail("browser test cannot run: " + "; ".join(problems) + ". Run scripts/install_browser.sh "
                    "(or set VLFUSE_SKIP_BROWSER_TESTS=1 to skip it deliberately).", pytrace=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with a tiny caption model and colour VQA/retrieval stand-ins, on a loopback port in a thread."""
    _require_browser()
    import uvicorn

    from vlfuse.serving.app import create_app
    from vlfuse.serving.models import ServiceModels
    from vlfuse.serving.settings import APIKeys, ServeSettings
    from vlfuse.tasks.caption.pipeline import Captioner

    tmp = tmp_path_factory.mktemp("browser")
    captioner = Captioner.from_pretrained(make_tiny_captioner(tmp / "tiny-caption"))
    models = ServiceModels(captioner, ColourVQA(), ColourRetriever(), ColourIndex(tmp / "photos"),
                           {"caption": "tiny-caption", "vqa": "colour-vqa", "retrieval": "colour-retrieval"})
    app = create_app(models, ServeSettings(), APIKeys([KEY]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    photo = tmp / "photo.png"
    photo.write_bytes(image_bytes("blue", (240, 180)))
    yield f"http://127.0.0.1:{port}", photo, captioner
    srv.should_exit = True
    thread.join(timeout=30)


def test_page_caption_question_search(server):
    from playwright.sync_api import expect, sync_playwright

    base, photo, captioner = server
    expected_caption = captioner(str(photo), beam_size=5)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        offsite = []
        page.on("request", lambda req: offsite.append(req.url) if not req.url.startswith((base, "blob:", "data:"))
                else None)
        page.goto(base + "/")

        # without the key the page shows the service's 401 message
        expect(page.locator("#error")).to_contain_text("401 unauthorized")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#models-status")).to_contain_text("caption: ready")
        expect(page.locator("#error")).to_be_hidden()

        # drop a photo onto the drop zone -> its caption
        page.evaluate("""async (b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
        }""", __import__("base64").b64encode(image_bytes("yellow", (200, 200))).decode())
        expect(page.locator("#preview")).to_be_visible()
        # the beam select starts at "model default": the model's own decoding
        expect(page.locator("#caption")).to_have_text(captioner(image_bytes("yellow", (200, 200))),
                                                      timeout=20_000)

        # pick another photo -> its caption with beam width 5
        page.select_option("#beam", "5")
        page.set_input_files("#file-input", str(photo))
        expect(page.locator("#preview")).to_be_visible()
        expect(page.locator("#caption")).to_have_text(expected_caption, timeout=20_000)

        # ask a question about it
        page.fill("#question", "what colour is the picture?")
        page.click("#ask-btn")
        expect(page.locator("#answer .answer-text")).to_have_text("blue", timeout=20_000)

        # text search -> thumbnails with scores
        page.fill("#search-text", "a red thing")
        page.fill("#search-k", "3")
        page.click("#search-btn")
        hits = page.locator("#hits figure")
        expect(hits).to_have_count(3, timeout=20_000)
        expect(hits.first.locator("img")).to_have_attribute("title", str(Path(photo.parent / "photos" / "red.png")))
        page.wait_for_function("() => [...document.querySelectorAll('#hits img')].every(i => i.complete && "
                               "i.naturalWidth > 0)", timeout=20_000)
        scores = [float(s) for s in hits.locator("figcaption").all_inner_texts()]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3

        # a refused search shows the service's message, and the page keeps working
        page.fill("#api-key", "wrong-key")
        page.click("#search-btn")
        expect(page.locator("#error")).to_contain_text("401 unauthorized: API key not accepted")
        page.fill("#api-key", KEY)
        page.fill("#search-k", "4")
        page.click("#search-btn")
        expect(hits).to_have_count(4, timeout=20_000)
        page.wait_for_function("() => [...document.querySelectorAll('#hits img')].every(i => i.complete && "
                               "i.naturalWidth > 0)", timeout=20_000)
        expect(page.locator("#error")).to_be_hidden()

        screenshot = SCREENSHOT  # gitignored: the README's picture (real models) comes from benchmarks/serve_page.py
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert offsite == []  # the page fetched nothing from anywhere but this server
    assert screenshot.stat().st_size > 10_000
