"""Naming the photo's concepts in reranked captions (issue 20): quality and speed with ``name_concepts`` (decoding) off
and at several thresholds, for one caption model, on coco_ood_dev (80 everyday photos: the dev set) and Flickr8k
val (the setting shipped was chosen on these two).

    python benchmarks/caption_naming.py [--model flickr8k-caption] [--thresholds 0 0.3 0.4 0.5 0.6] [--rounds 3]
Writes benchmarks/results/caption_naming.json: per threshold, both sets' BLEU-1..4 / METEOR / ROUGE-L / CIDEr and
how often a caption names a confident concept (``everyday_captions.concept_use``); then the default decoding's
throughput (photos/s, batches of 32 decoded in memory, 2 threads) with naming off and at the model's own threshold,
interleaved round by round in one process (the machine's speed drifts; the medians are compared).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flickr8k-caption")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--coco", default=str(ROOT.parent / "shared/data/coco_ood_dev"))
    ap.add_argument("--flickr", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--speed-photos", type=int, default=160, help="Flickr8k val photos timed (and all of coco)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/caption_naming.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from everyday_captions import concept_use, photo_concepts

    from vlfuse.data.captions import read_captions
    from vlfuse.data.images import load_image
    from vlfuse.evaluation.caption import evaluate_captioner
    from vlfuse.nn.concepts import imagenet_words
    from vlfuse.tasks.caption.pipeline import Captioner

    cap = Captioner.from_pretrained(args.model)
    decode = cap.decode_config()
    shipped = decode.name_concepts
    if decode.strategy != "rerank":
        raise SystemExit(f"{args.model} does not rerank by default: naming is part of reranking")
    coco = read_captions(args.coco, split="val")
    concepts = dict(zip((p.name for p in coco.images), photo_concepts(list(coco.images))))
    keys = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    quality = {}
    for threshold in args.thresholds:
        naming = decode.override(name_concepts=threshold)
        out = str(Path(args.out).with_suffix("")) + f".coco_{threshold}.captions.json"
        c = evaluate_captioner(cap, args.coco, "val", naming, results_path=out, progress=False)
        hyps = {r["image_id"]: r["caption"] for r in json.loads(Path(out).read_text())}
        Path(out).unlink()
        f = evaluate_captioner(cap, args.flickr, "val", naming, progress=False)
        quality["off" if threshold == 0 else str(threshold)] = {
            "coco_ood_dev": {k: round(c[k], 4) for k in keys},
            "concept_use": concept_use(hyps, concepts, set(imagenet_words())),
            "flickr8k_val": {k: round(f[k], 4) for k in keys}}
        print(threshold, json.dumps(quality["off" if threshold == 0 else str(threshold)]), flush=True)

    flickr = Path(args.flickr)
    val = [flickr / "images" / n for n in (flickr / "val.txt").read_text().split()[:args.speed_photos]]
    speed = {}
    for name, paths in (("flickr8k_val", val), ("coco_ood_dev", list(coco.images))):
        images = [load_image(p) for p in paths]
        cap.caption_pixels(cap.preprocess(images[:32]), decode)  # warm-up
        times = {"off": [], "on": []}
        for r in range(args.rounds):
            for key in (("on", "off") if r % 2 == 0 else ("off", "on")):
                timed = decode if key == "on" else dataclasses.replace(decode, name_concepts=0.0)
                t = time.perf_counter()
                for s in range(0, len(images), 32):
                    cap.caption_pixels(cap.preprocess(images[s:s + 32]), timed)
                times[key].append(len(images) / (time.perf_counter() - t))
        speed[name] = {"photos": len(images), "photos_per_s_off": round(statistics.median(times["off"]), 1),
                       f"photos_per_s_at_{shipped}": round(statistics.median(times["on"]), 1),
                       "slower_by": round(1 - statistics.median(times["on"]) / statistics.median(times["off"]), 3)}
        print(name, speed[name], flush=True)
    Path(args.out).write_text(json.dumps({
        "model": args.model, "shipped_name_concepts": shipped, "threads": args.threads,
        "quality": quality, "speed": speed,
        "note": "thresholds chosen on these two sets (coco_ood_dev is the dev set); the held-out sets are not here"},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
