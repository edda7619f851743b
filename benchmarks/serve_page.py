"""Screenshot of the web page with the shipped models: `vlfuse serve` on loopback over an index of Flickr8k val
photos, headless Debian Chromium (scripts/install_system.sh) captions a photo and runs a text search.

    python benchmarks/serve_page.py [--photos 200] [--photo 0] [--query "a dog running on the beach"]
    -> benchmarks/results/serve_page.png (the README's picture) and serve_page.json (what it shows)
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import DATA, HOST, REPO, free_port, wait_ready  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=200, help="val photos in the search index")
    p.add_argument("--photo", type=int, default=0, help="which of them to caption")
    p.add_argument("--query", default="a dog running on the beach")
    p.add_argument("--beam", default="", help="beam width to select on the page (default: the model's own decoding)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_page.png"))
    args = p.parse_args(argv)
    from playwright.sync_api import expect, sync_playwright

    names = (DATA / "val.txt").read_text().split()[: args.photos]
    key = secrets.token_urlsafe(24)
    port = free_port()
    base = f"http://{HOST}:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for n in names:
            shutil.copy(DATA / "images" / n, photos / n)
        index = Path(tmp) / "photos.idx"
        subprocess.run([sys.executable, "-m", "vlfuse", "index", "build", str(photos), "--out", str(index)],
                       check=True, env=env)
        (Path(tmp) / "keys.txt").write_text(key + "\n")
        proc = subprocess.Popen([sys.executable, "-m", "vlfuse", "serve", "--host", HOST, "--port", str(port),
                                 "--api-keys-file", str(Path(tmp) / "keys.txt"), "--index", str(index),
                                 "--log-level", "warning"], env=env)
        try:
            models = wait_ready(base, proc)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1200, "height": 820})
                page.goto(base + "/")
                page.fill("#api-key", key)  # the page asks for the key: the service needs one
                page.click("#key-submit")
                expect(page.locator("#models-status")).to_contain_text("caption: ready", timeout=30_000)
                page.select_option("#beam", args.beam)  # "" = the "model default" entry
                page.set_input_files("#file-input", str(photos / names[args.photo]))
                expect(page.locator("#caption")).not_to_have_text("Captioning…", timeout=60_000)
                caption = page.locator("#caption").inner_text()
                page.fill("#search-text", args.query)
                page.fill("#search-k", "8")
                page.click("#search-btn")
                expect(page.locator("#hits figure")).to_have_count(8, timeout=60_000)
                page.wait_for_function("() => [...document.querySelectorAll('#hits img')].every(i => i.complete "
                                       "&& i.naturalWidth > 0)", timeout=60_000)
                hits = page.locator("#hits img").evaluate_all("els => els.map(e => e.title.split('/').pop())")
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out, full_page=True)
                browser.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    refs = {}
    for line in (DATA / "captions.txt").read_text(encoding="utf-8").splitlines():
        name, _, text = line.partition("\t")
        refs.setdefault(name, []).append(text)
    report = {"models_loaded": models, "photo": names[args.photo],
              "caption": caption, "references": refs.get(names[args.photo], []), "query": args.query,
              "hits": hits, "index_photos": len(names)}
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
