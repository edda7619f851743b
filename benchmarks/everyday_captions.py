"""Captions of everyday photos (issue 20): caption models on ../shared/data/coco_ood_dev (80 MS-COCO photos, 5
references each) and on Flickr8k val, in one run, with the metrics and how the captions use the photos' concepts.

    python benchmarks/everyday_captions.py [--models flickr8k-caption runs/.../best] [--beam 1]
        [--decode '{"concept_bias": 2}'] [--concept-weight 2] [--skip-flickr] [--out ...]
Writes benchmarks/results/everyday_captions.json (and each model's coco captions beside it).

Concept use: the photo's concepts are the ImageNet classifier's (EfficientNet-Lite0's own, vlfuse.nn.concepts) on
the frozen backbone, each named by its caption word. ``names_confident`` is the share of photos with a concept at
probability >= 0.5 whose caption names its word; ``names_outside_top5`` the share of captions naming a concept word
(any of the 1000 classes' words) that is none of the photo's top 5: a guess the classifier does not back.
The sample photos' captions (the README's main command) are listed too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]


def photo_concepts(paths: List[Path]) -> List[List]:
    """Each photo's top-5 concepts from the frozen EfficientNet-Lite0 and its ImageNet classifier."""
    import vlfuse.nn  # noqa: F401  (registration)
    from vlfuse.data.images import load_image
    from vlfuse.registry import CONCEPT_HEADS, VISION_ENCODERS

    encoder = VISION_ENCODERS.build("efficientnet-lite0").eval()
    head = CONCEPT_HEADS.build("imagenet-efficientnet-lite0")
    out = []
    with torch.no_grad():
        for s in range(0, len(paths), 32):
            pixels = torch.stack([encoder.transform(load_image(p)) for p in paths[s:s + 32]])
            out += head.top(head(encoder(pixels).pooled), 5)
    return out


def concept_use(captions: Dict[str, str], concepts: Dict[str, List], all_words: set) -> Dict[str, float]:
    confident = [name for name, cs in concepts.items() if cs and cs[0].probability >= 0.5]
    named = sum(any(c.word in captions[n].split() for c in concepts[n] if c.probability >= 0.5) for n in confident)
    outside = sum(bool({w for w in captions[n].split() if w in all_words} - {c.word for c in concepts[n]})
                  for n in captions)
    return {"photos_with_confident_concept": len(confident),
            "names_confident": named / max(1, len(confident)),
            "names_outside_top5": outside / max(1, len(captions))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["flickr8k-caption"])
    ap.add_argument("--labels", nargs="+", help="a name per model in the JSON (default: the model argument)")
    ap.add_argument("--coco", default=str(ROOT.parent / "shared/data/coco_ood_dev"))
    ap.add_argument("--flickr", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--beam", type=int, default=None, help="1 = greedy (default: each model's own decoding)")
    ap.add_argument("--skip-flickr", action="store_true", help="coco_ood_dev only")
    ap.add_argument("--decode", default="{}", help='decoding options as JSON, e.g. \'{"concept_bias": 2}\'')
    ap.add_argument("--concept-weight", type=float, default=None,
                    help="rerank.concept_weight for models that rerank (default: each model's own)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/everyday_captions.json"))
    args = ap.parse_args()
    from vlfuse.data.captions import read_captions
    from vlfuse.data.samples import sample_photos
    from vlfuse.evaluation.caption import evaluate_captioner
    from vlfuse.nn.concepts import imagenet_words
    from vlfuse.tasks.caption.pipeline import Captioner

    coco = read_captions(args.coco, split="val")
    concepts = dict(zip((p.name for p in coco.images), photo_concepts(list(coco.images))))
    labels = args.labels or args.models
    results = {"coco_ood_dev_photos": len(coco), "decoding": "each model's default" if args.beam is None
               else f"beam {args.beam}", "decode_options": json.loads(args.decode),
               "concept_weight": args.concept_weight, "models": {}}
    samples = sample_photos()
    for label, model in zip(labels, args.models):
        cap = Captioner.from_pretrained(model)
        decode = cap.decode_config(beam=args.beam, **json.loads(args.decode))
        if args.concept_weight is not None and cap.reranker is not None:
            cap.reranker.config = dataclasses.replace(cap.reranker.config, concept_weight=args.concept_weight)
        stem = Path(args.out).with_suffix("")
        captions_path = f"{stem}.{Path(label).name}.captions.json"
        m = evaluate_captioner(cap, args.coco, "val", decode, results_path=captions_path, progress=False)
        hyps = {r["image_id"]: r["caption"] for r in json.loads(Path(captions_path).read_text())}
        entry = {"coco_ood_dev": {k: m[k] for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                                                   "CIDEr") if k in m},
                 "concept_use": concept_use(hyps, concepts, set(imagenet_words())),
                 "samples": dict(zip((p.stem for p in samples),
                                     cap([str(p) for p in samples], **({} if args.beam is None
                                                                       else {"beam": args.beam}))))}
        if not args.skip_flickr:
            f = evaluate_captioner(cap, args.flickr, "val", decode, progress=False)
            entry["flickr8k_val"] = {k: f[k] for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in f}
        results["models"][label] = entry
        print(label, json.dumps(entry, indent=1))
    results["targets"] = {"coco_ood_dev_CIDEr": 0.50, "coco_ood_dev_CIDEr_goal": 0.60,
                          "flickr8k_val_BLEU-4": 0.221, "flickr8k_val_CIDEr": 0.567}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
