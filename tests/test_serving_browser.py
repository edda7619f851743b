"""The web page in a real browser: headless Debian Chromium driven by Playwright for Python.

Needs `scripts/install_system.sh` (apt chromium + pip playwright; no browser downloads). A missing browser
fails the test with a message saying so; set VLFUSE_SKIP_BROWSER_TESTS=1 to skip it on purpose.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import flickr_or_skip
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
        pytest.fail("browser test cannot run: " + "; ".join(problems) + ". Run scripts/install_system.sh "
                    "(or set VLFUSE_SKIP_BROWSER_TESTS=1 to skip it deliberately).", pytrace=False)


@contextlib.contextmanager
def serving(app):
    """``app`` under uvicorn on a free loopback port, in a thread -> its base URL."""
    import uvicorn

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
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def models_for(tmp: Path):
    from vlfuse.serving.models import ServiceModels
    from vlfuse.tasks.caption.pipeline import Captioner

    captioner = Captioner.from_pretrained(make_tiny_captioner(tmp / "tiny-caption"))
    return ServiceModels(captioner, ColourVQA(), ColourRetriever(), ColourIndex(tmp / "photos"),
                         {"caption": "tiny-caption", "vqa": "colour-vqa", "retrieval": "colour-retrieval"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with a tiny caption model and colour VQA/retrieval stand-ins and an API key, served on loopback."""
    _require_browser()
    from vlfuse.serving.app import create_app
    from vlfuse.serving.settings import APIKeys, ServeSettings

    tmp = tmp_path_factory.mktemp("browser")
    models = models_for(tmp)
    photo = tmp / "photo.png"
    photo.write_bytes(image_bytes("blue", (240, 180)))
    with serving(create_app(models, ServeSettings(), APIKeys([KEY]))) as base:
        yield base, photo, models.captioner


@contextlib.contextmanager
def browser_page(base: str):
    """A headless Chromium page of its own (a fresh session) -> (page, list of off-site URLs it fetched)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        offsite = []
        page.on("request", lambda req: offsite.append(req.url) if not req.url.startswith((base, "blob:", "data:"))
                else None)
        try:
            yield page, offsite
        finally:
            browser.close()


def enter_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#key-submit")


def test_page_asks_for_the_key_and_keeps_it_for_the_session(server, tmp_path):
    """Opening the page shows no error: it asks for the key; a wrong key is named once, in the dialog; the
    right one loads the models, and a reload in the same tab does not ask again."""
    from playwright.sync_api import expect

    base, _, _ = server
    with browser_page(base) as (page, offsite):
        page.goto(base + "/")
        expect(page.locator("#key-dialog")).to_be_visible()
        expect(page.locator("#key-message")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()  # no red 401 banner before the user did anything
        page.screenshot(path=str(tmp_path / "key_dialog.png"))

        enter_key(page, "wrong-key-0123456789")
        expect(page.locator("#key-dialog")).to_be_visible()
        expect(page.locator("#key-message")).to_have_text(
            "The service did not accept that key. Check it and enter it again.")
        expect(page.locator("#error")).to_be_hidden()  # said once, in the dialog, not again in the page
        assert page.locator("text=did not accept").count() == 1
        page.screenshot(path=str(tmp_path / "key_refused.png"))

        enter_key(page, KEY)
        expect(page.locator("#key-dialog")).to_be_hidden()
        expect(page.locator("#models-status")).to_contain_text("caption: ready")
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#key-btn")).to_be_visible()

        page.reload()
        expect(page.locator("#models-status")).to_contain_text("caption: ready")
        expect(page.locator("#key-dialog")).to_be_hidden()
    assert offsite == []


def test_page_without_a_key_says_one_is_needed_when_the_dialog_is_closed(server):
    from playwright.sync_api import expect

    base, _, _ = server
    with browser_page(base) as (page, _):
        page.goto(base + "/")
        expect(page.locator("#key-dialog")).to_be_visible()
        page.click("#key-cancel")
        expect(page.locator("#key-dialog")).to_be_hidden()
        expect(page.locator("#models-status")).to_have_text("An API key is needed to use this service.")
        expect(page.locator("#error")).to_be_hidden()
        page.click("#key-btn")  # the user changes their mind
        enter_key(page, KEY)
        expect(page.locator("#models-status")).to_contain_text("caption: ready")


def test_page_of_a_service_without_keys_never_asks(tmp_path):
    _require_browser()
    from playwright.sync_api import expect

    from vlfuse.serving.app import create_app

    with serving(create_app(models_for(tmp_path))) as base, browser_page(base) as (page, _):
        page.goto(base + "/")
        expect(page.locator("#models-status")).to_contain_text("caption: ready")
        expect(page.locator("#key-dialog")).to_be_hidden()
        expect(page.locator("#key-btn")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()


def test_page_shows_the_photos_tags_under_its_caption(tmp_path):
    """With a tagger loaded, a picked photo gets its tags (name, word, percentage) under the caption; a blank one
    gets the threshold that none reached."""
    _require_browser()
    from playwright.sync_api import expect

    from vlfuse.serving.app import create_app
    from vlfuse.tasks.tagging import Tagger

    models = models_for(tmp_path)
    models.tagger, models.names["tagging"] = Tagger.from_pretrained("efficientnet-lite0"), "efficientnet-lite0"
    dog = flickr_or_skip() / "images" / "1526325728_74eb4153d8.jpg"  # Weimaraner 0.99
    with serving(create_app(models)) as base, browser_page(base) as (page, _):
        page.goto(base + "/")
        expect(page.locator("#models-status")).to_contain_text("tagging: ready")
        page.set_input_files("#file-input", str(dog))
        # (the caption word depends on the word mapping: "weimaraner" from the class name, or "dog")
        expect(page.locator("#tags")).to_have_text(re.compile(r"Tags: Weimaraner \(\w+\) 99%"), timeout=20_000)
        page.set_input_files("#file-input", str(tmp_path / "photos" / "red.png"))
        expect(page.locator("#tags")).to_have_text("Tags: no concept at or above 0.30", timeout=20_000)
        expect(page.locator("#error")).to_be_hidden()


def test_page_caption_question_search(server):
    from playwright.sync_api import expect

    base, photo, captioner = server
    expected_caption = captioner(str(photo), beam_size=5)
    with browser_page(base) as (page, offsite):
        page.goto(base + "/")
        enter_key(page, KEY)
        expect(page.locator("#models-status")).to_contain_text("caption: ready")

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
        expect(page.locator("#answer .doubt")).to_have_count(0)
        # a question the model flags as unsure: the page says so next to the answer
        page.fill("#question", "what is the meaning of life?")
        page.click("#ask-btn")
        expect(page.locator("#answer .doubt")).to_have_text("— not sure: it only knows colour questions",
                                                            timeout=20_000)

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

        # a key that stops working (here: a wrong one the user keeps): the next search asks for a new one, saying
        # why, and runs once it is given
        page.click("#key-btn")
        enter_key(page, "revoked-key-0123456789")
        expect(page.locator("#key-message")).to_contain_text("did not accept")
        page.click("#key-cancel")
        page.fill("#search-k", "4")
        page.click("#search-btn")
        expect(page.locator("#key-dialog")).to_be_visible()
        expect(page.locator("#key-message")).to_contain_text("did not accept")
        enter_key(page, KEY)
        expect(hits).to_have_count(4, timeout=20_000)
        expect(page.locator("#models-status")).to_contain_text("caption: ready")
        page.wait_for_function("() => [...document.querySelectorAll('#hits img')].every(i => i.complete && "
                               "i.naturalWidth > 0)", timeout=20_000)
        expect(page.locator("#error")).to_be_hidden()

        screenshot = SCREENSHOT  # gitignored: the README's picture (real models) comes from benchmarks/serve_page.py
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    assert offsite == []  # the page fetched nothing from anywhere but this server
    assert screenshot.stat().st_size > 10_000


def test_page_plays_a_picked_clip_with_its_shot_subtitles(server, tmp_path):
    """Pick a clip in the video panel: the service's WebVTT becomes the video's text track (its cues listed beside
    it), the clip plays, and at each moment the cue on screen (and highlighted in the list) is that moment's."""
    from playwright.sync_api import expect
    from video_helpers import shot_frames, write_video

    from vlfuse.tasks.subtitle import Subtitler

    base, _, captioner = server
    clip = write_video(tmp_path / "three shots.webm", shot_frames([1.0, 1.5, 1.2], 10, (64, 48)), 10,
                       codec="libvpx")  # VP8 in WebM: what any Chromium build plays
    expected = Subtitler(captioner)(clip).cues
    assert len(expected) >= 2
    with browser_page(base) as (page, offsite):
        page.goto(base + "/")
        enter_key(page, KEY)
        expect(page.locator("#models-status")).to_contain_text("caption: ready")
        page.set_input_files("#video-input", str(clip))
        expect(page.locator("#video")).to_be_visible()
        items = page.locator("#cue-list li")
        expect(items).to_have_count(len(expected), timeout=20_000)
        expect(page.locator("#video-status")).to_have_text(f"{len(expected)} subtitle(s) for three shots.webm")
        track = page.evaluate("""() => {
            const t = document.querySelector('#video track');
            return {kind: t.kind, mode: t.track.mode,
                    cues: [...t.track.cues].map(c => [c.startTime, c.endTime, c.text])};
        }""")
        assert track["kind"] == "captions" and track["mode"] == "showing"
        assert track["cues"] == [[pytest.approx(c.start), pytest.approx(c.end), "\n".join(c.lines)]
                                 for c in expected]
        page.evaluate("() => { const v = document.getElementById('video'); v.muted = true; return v.play(); }")
        page.wait_for_function("() => document.getElementById('video').currentTime > 0.3", timeout=20_000)  # plays
        for moment in (0.5, 1.7, 3.1):  # inside each shot: the cue on screen is that moment's
            active = page.evaluate("""async (moment) => {
                const v = document.getElementById('video'), t = v.textTracks[0];
                v.pause();
                await new Promise((done) => {
                    v.addEventListener('seeked', done, {once: true});
                    v.currentTime = moment;
                });
                await new Promise((done) => setTimeout(done, 100));  // cuechange runs after the seek
                return [...t.activeCues].map(c => c.text);
            }""", moment)
            assert active == ["\n".join(c.lines) for c in expected if c.start <= moment < c.end]
        expect(page.locator("#cue-list li.active")).to_have_count(1)
        expect(page.locator("#vtt-link")).to_have_attribute("download", "three shots.vtt")
        expect(page.locator("#error")).to_be_hidden()
        page.set_input_files("#video-input", str(_not_a_video(tmp_path)))  # a bad clip: the service's message
        expect(page.locator("#error")).to_contain_text("400 bad_video: notes.mp4: not a video file", timeout=20_000)
    assert offsite == []


def _not_a_video(folder: Path) -> Path:
    path = folder / "notes.mp4"
    path.write_text("these are not moving pictures\n")
    return path


def test_language_switch_shows_chinese_captions_as_text_not_boxes(tmp_path):
    """With an English and a Chinese caption model, the switch offers both; the Chinese caption is the Chinese
    model's, marked lang=zh, and its characters are drawn from a font that has them (not the box of a missing
    glyph)."""
    _require_browser()
    from playwright.sync_api import expect

    from vlfuse.serving.app import create_app
    from vlfuse.serving.models import ServiceModels
    from vlfuse.tasks.caption.pipeline import Captioner

    english = Captioner.from_pretrained(make_tiny_captioner(tmp_path / "tiny-caption"))
    chinese = Captioner.from_pretrained(make_tiny_captioner(tmp_path / "tiny-zh", lang="zh"))
    models = ServiceModels(english, names={"caption": "tiny-caption"}, more_captioners=[chinese],
                           more_caption_names=["tiny-zh"])
    photo = tmp_path / "photo.png"
    photo.write_bytes(image_bytes("blue", (240, 180)))
    from PIL import Image

    expected = chinese(Image.open(photo))
    with serving(create_app(models)) as base, browser_page(base) as (page, offsite):
        page.goto(base + "/")
        expect(page.locator("#models-status")).to_contain_text("caption: ready")
        expect(page.locator("#caption-lang option")).to_have_text(["English", "中文 (Chinese)"])
        page.set_input_files("#file-input", str(photo))
        expect(page.locator("#caption")).to_have_text(english(Image.open(photo)), timeout=20_000)
        page.select_option("#caption-lang", "zh")
        expect(page.locator("#caption")).to_have_text(expected, timeout=20_000)
        expect(page.locator("#caption")).to_have_attribute("lang", "zh")
        # a character the fonts lack is drawn as the same empty box as any other missing one; a real glyph is not
        drawn = page.evaluate("""([text]) => {
            const font = getComputedStyle(document.getElementById('caption')).fontFamily;
            const pixels = (s) => { const c = document.createElement('canvas'); c.width = 60; c.height = 40;
                const g = c.getContext('2d'); g.font = `30px ${font}`; g.fillText(s, 5, 32);
                return Array.from(g.getImageData(0, 0, 60, 40).data).join(','); };
            const box = pixels('\\u{10FFFD}');
            return Array.from(text).map((ch) => pixels(ch) !== box); }""", [expected])
        assert drawn and all(drawn), (expected, drawn)
        page.screenshot(path=str(tmp_path / "chinese_caption.png"))
        expect(page.locator("#error")).to_be_hidden()
    assert offsite == []
