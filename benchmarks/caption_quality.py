"""Quality of a caption model on Flickr8k val (beam 3): BLEU-1..4, METEOR, ROUGE-L, CIDEr vs the targets.

    python benchmarks/caption_quality.py [--model flickr8k-caption] [--beam 3] [--batch-size 4]
Writes benchmarks/results/caption_quality.json and the generated captions next to it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flickr8k-caption")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--beam", type=int, default=None, help="1 = greedy (default: the model's own decoding)")
    ap.add_argument("--batch-size", type=int, default=32, help="images captioned at once (the captions do not "
                    "depend on it)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/caption_quality.json"))
    args = ap.parse_args()
    from vlfuse.evaluation.caption import evaluate_captioner
    from vlfuse.tasks.caption.pipeline import Captioner

    cap = Captioner.from_pretrained(args.model)
    decode = cap.decode_config(beam=args.beam)
    results = str(Path(args.out).with_suffix("")) + ".captions.json"
    m = evaluate_captioner(cap, args.data, "val", decode, batch_size=args.batch_size, results_path=results)
    m["model"] = args.model
    m["batch_size"] = args.batch_size
    m.update(cap.runtime.backends(args.batch_size))  # what runs the image encoder and the decoding step
    m["targets"] = {"BLEU-4": 0.22, "CIDEr": 0.55}
    m["meets_targets"] = {"BLEU-4": m["BLEU-4"] >= 0.22, "CIDEr": m["CIDEr"] >= 0.55}
    m["training"] = cap.extra_config.get("training", {}).get("model")
    Path(args.out).write_text(json.dumps(m, indent=2) + "\n")
    print(json.dumps({k: v for k, v in m.items() if k != "training"}, indent=2))


if __name__ == "__main__":
    main()
