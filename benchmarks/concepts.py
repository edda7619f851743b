"""Concepts from the backbone: how far to trust the ImageNet classifier's top concept on everyday photos, and how
probable its best guess gets on images that show nothing. Calibrates ``CONCEPT_THRESHOLD`` (vlfuse/nn/concepts.py).

- photos: the 80 MS-COCO photos of ../shared/data/coco_ood_dev. Per photo its top-1 concept; it counts as right
  when its caption word, or a word of its name, is a word of one of the photo's 5 reference captions (a plural
  "s"/"es" allowed). Rates by probability bin (>= 0.5, 0.3-0.5, < 0.3), a sweep of thresholds (photos reaching
  it, and how often their top-1 is right) and the fraction of photos with a concept at the threshold.
- blank: 20 solid colours (black, white, mid grey, 17 seeded random colours), 640x480.
- noise: 20 seeded per-pixel noise images: uniform and Gaussian (mean 128, sd 40), each at the model's input size
  (224x224, fed unresized) and at 640x480 (resized down, as a photo is).
- noise stress test (reported beside the claim, not part of it): 200 more seeded noise images, 20 per family:
  per-pixel uniform and Gaussian noise at 224x224, 112x112 and 640x480, and coarse noise (64x64, 32x32) or smooth
  noise (a 40x30 grid resized bilinearly to 320x240) that the model's resize turns into soft colour blotches, which
  ImageNet's texture classes (prayer rug, velvet, quilt) can match.

Everything runs through ``Tagger`` as users do (ONNX Runtime on a CPU). Concept words come from the head
(``concept_words.json`` where it exists, else each class's head word); the JSON records which.

    python benchmarks/concepts.py [--data ../shared/data/coco_ood_dev] [--model efficientnet-lite0] [--threads 1]
    -> benchmarks/results/concepts.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence, Set

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "coco_ood_dev").resolve()
BINS = (("p >= 0.5", 0.5, 1.01), ("0.3 <= p < 0.5", 0.3, 0.5), ("p < 0.3", 0.0, 0.3))
SWEEP = (0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)
STOPWORDS = {"a", "an", "and", "the", "of", "for", "with", "in", "on", "to", "or"}


def words(text: str) -> List[str]:
    return re.findall(r"[a-z]+", text.lower())


def concept_terms(name: str, word: str) -> Set[str]:
    """The words that count as naming a concept in a caption: its caption word and its name's words (stop words
    and words under 3 letters left out), each also with a plural 's' / 'es'."""
    base = {w for w in words(word) + words(name) if w not in STOPWORDS and len(w) >= 3}
    return {v for w in base for v in (w, w + "s", w + "es")}


def named_in(terms: Set[str], captions: Sequence[str]) -> bool:
    return any(terms & set(words(c)) for c in captions)


def blank_images() -> List[Image.Image]:
    rng = np.random.default_rng(0)
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128)]
    colours += [tuple(int(x) for x in rng.integers(0, 256, 3)) for _ in range(17)]
    return [Image.new("RGB", (640, 480), c) for c in colours]


def noise_images() -> List[Image.Image]:
    out = []
    for seed in range(20):
        rng = np.random.default_rng(1000 + seed)
        w, h = (224, 224) if seed % 2 == 0 else (640, 480)
        if seed % 4 < 2:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            arr = np.clip(rng.normal(128, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr))
    return out


def noise_family(kind: str, size, seed: int, n: int = 20) -> List[Image.Image]:
    """``n`` seeded noise images of one kind ("uniform", "gaussian" or "smooth": a grid of 1/8 the size, resized
    bilinearly) and ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        if kind == "uniform":
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind == "gaussian":
            arr = np.clip(rng.normal(128, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        else:
            grid = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            arr = np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR))
        out.append(Image.fromarray(arr))
    return out


STRESS = (("uniform", (224, 224)), ("gaussian", (224, 224)), ("uniform", (112, 112)), ("gaussian", (112, 112)),
          ("uniform", (640, 480)), ("gaussian", (640, 480)), ("uniform", (64, 64)), ("uniform", (32, 32)),
          ("gaussian", (32, 32)), ("smooth", (320, 240)))


def rate(hits: int, n: int):
    return round(hits / n, 4) if n else None


def non_photos(tagger, images: List[Image.Image], threshold: float) -> Dict[str, object]:
    """Max top-1 probability over ``images`` and how many reach ``threshold``."""
    probs = tagger.probabilities(images)
    top = tagger.concepts(probs, top=1, threshold=0.0)
    best = max(range(len(top)), key=lambda i: top[i][0].probability)
    return {"images": len(images), "max_probability": round(float(probs.max()), 4),
            "max_concept": top[best][0].name,
            "mean_top1_probability": round(float(probs.max(1).values.mean()), 4),
            "reaching_threshold": int((probs.max(1).values >= threshold).sum())}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv=None) -> dict:
    from vlfuse.data.captions import read_captions
    from vlfuse.nn.concepts import CONCEPT_THRESHOLD, WORDS_FILE
    from vlfuse.tasks.tagging import Tagger

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--model", default="efficientnet-lite0", help="backbone with a concept head")
    p.add_argument("--threshold", type=float, default=CONCEPT_THRESHOLD, help="the threshold to report on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "concepts.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tagger = Tagger.from_pretrained(args.model)
    data = read_captions(args.data, split="val")
    probs = tagger.probabilities(data.images)  # (80, 1000)
    top1 = [c[0] for c in tagger.concepts(probs, top=1, threshold=0.0)]
    rows = []
    for path, refs, c in zip(data.images, data.captions, top1):
        rows.append({"image": Path(path).name, "name": c.name, "word": c.word,
                     "probability": round(c.probability, 4), "named_in_captions": named_in(
                         concept_terms(c.name, c.word), refs)})

    def summary(selected):
        return {"photos": len(selected), "top1_named_in_captions": sum(r["named_in_captions"] for r in selected),
                "rate": rate(sum(r["named_in_captions"] for r in selected), len(selected))}

    by_bin = {label: summary([r for r in rows if lo <= r["probability"] < hi]) for label, lo, hi in BINS}
    sweep = [{"threshold": t, **summary([r for r in rows if r["probability"] >= t]),
              "fraction_of_photos": rate(sum(r["probability"] >= t for r in rows), len(rows))} for t in SWEEP]
    reached = [r for r in rows if r["probability"] >= args.threshold]
    result = {
        "what": "top-1 ImageNet concept of the backbone's classifier on everyday photos vs blank and noise images",
        "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform()},
        "model": args.model, "image_encoder": tagger.runtime.backends()["image_encoder"],
        "concept_words": "concept_words.json" if WORDS_FILE.is_file() else "head word of each class's first synonym",
        "threshold": args.threshold,
        "photos": {"data": Path(args.data).name, "images": len(rows),
                   "with_a_concept_at_threshold": len(reached),
                   "fraction_with_a_concept_at_threshold": rate(len(reached), len(rows)),
                   "top1_named_in_captions_at_threshold": summary(reached)["rate"],
                   "top1_named_in_captions_all": summary(rows)["rate"],
                   "by_top1_probability": by_bin, "threshold_sweep": sweep},
        "blank": non_photos(tagger, blank_images(), args.threshold),
        "noise": non_photos(tagger, noise_images(), args.threshold),
        "noise_stress": {f"{kind} {w}x{h}": non_photos(tagger, noise_family(kind, (w, h), 2000 + i), args.threshold)
                         for i, (kind, (w, h)) in enumerate(STRESS)},
        "per_photo": rows,
    }
    result["blank_and_noise_stay_below_threshold"] = (result["blank"]["reaching_threshold"] == 0
                                                      and result["noise"]["reaching_threshold"] == 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_photo"}, indent=1))
    return result


if __name__ == "__main__":
    main()
