"""``vlfuse caption IMAGE_OR_DIR ...``: caption photos; bad files are reported one line each on stderr."""
from __future__ import annotations

import argparse
import json
import sys

from ..data.images import list_images


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding options; each one left out keeps the model's own decoding default (``vlfuse models`` lists it)."""
    p.add_argument("--beam", type=int, default=None,
                   help="beam width: 1 = greedy, more = beam search (default: the model's own decoding, "
                        "which `vlfuse models` lists; flickr8k-caption reranks, see --rerank)")
    p.add_argument("--sample", action="store_true", help="top-p sampling instead")
    p.add_argument("--rerank", action="store_true",
                   help="consensus reranking: the greedy caption and --candidates samples, the one the model's "
                        "caption memory agrees with most (models with a memory, e.g. flickr8k-caption)")
    p.add_argument("--candidates", type=int, default=None, help="samples drawn for --rerank (default: the model's, or 12)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus size for --sample and --rerank's samples (default: the model's, or 0.9)")
    p.add_argument("--temperature", type=float, default=None, help="of the samples (default: the model's, or 1.0)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed for --sample/--rerank: each photo's samples come from it and the photo's "
                        "pixels, so a photo gets the same caption in any batch (default: the model's; --sample "
                        "without one draws new samples each run)")
    p.add_argument("--max-len", type=int, default=None, help="at most this many words (default 20)")
    p.add_argument("--length-penalty", type=float, default=None, help="beam score / length ** this (default 0)")
    p.add_argument("--no-repeat-ngram", type=int, default=None,
                   help="forbid repeating any n-gram of this size, 0 = off (default 3)")


def decode_options(args) -> dict:
    """The decoding options given on the command line (``Captioner.decode_config`` lays them over the model's
    own default); those left out are None."""
    strategy = "sample" if args.sample else "rerank" if args.rerank else None
    return dict(beam=args.beam, strategy=strategy, max_len=args.max_len, top_p=args.top_p,
                temperature=args.temperature, seed=args.seed, length_penalty=args.length_penalty,
                no_repeat_ngram=args.no_repeat_ngram, candidates=args.candidates)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("caption", help="caption images or folders of images")
    p.add_argument("paths", nargs="*", help="image files and/or folders")
    p.add_argument("--samples", action="store_true", help="also caption scikit-image's bundled sample photos")
    p.add_argument("--model", default="flickr8k-caption", help="built-in model name or checkpoint directory")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of 'path<TAB>caption'")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--attention-map", metavar="PNG", help="save the per-word attention over the (first) image")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    p.add_argument("--float32", action="store_true",
                   help="decode with the float32 decoder (on a CPU the default is its faster int8 copy)")
    p.add_argument("--no-onnx", action="store_true",
                   help="encode images with PyTorch and decode with TorchScript (on a CPU the default is ONNX "
                        "Runtime for both where it is installed)")
    add_decode_arguments(p)
    return p


def run(args) -> int:
    from ..tasks.caption.pipeline import Captioner
    from .environment import runtime_options

    captioner = Captioner.from_pretrained(args.model, device=args.device,
                                          runtime=runtime_options(no_onnx=args.no_onnx, float32=args.float32))
    decode = captioner.decode_config(**decode_options(args))
    paths = list_images(args.paths)
    if args.samples:
        from ..data.samples import sample_photos

        paths += sample_photos()
    failed, first_ok = 0, None
    for path, result, error in captioner.caption_files(paths, decode, batch_size=args.batch_size):
        if error:
            failed += 1
            print(f"vlfuse caption: error: {error}", file=sys.stderr)
            continue
        first_ok = first_ok or path
        if args.json:
            print(json.dumps({"image": path, "caption": result.caption, "score": round(result.score, 4)},
                             ensure_ascii=False), flush=True)
        else:
            print(f"{path}\t{result.caption}", flush=True)
    if args.attention_map and first_ok:
        from ..viz.attention import save_attention_figure

        words, att = captioner.attention_map(first_ok, decode)
        if att is None:
            print("vlfuse caption: this model's fusion module has no spatial attention to draw", file=sys.stderr)
        else:
            save_attention_figure(first_ok, words, att, args.attention_map)
            print(f"attention map written to {args.attention_map}", file=sys.stderr)
    if not paths:
        print("vlfuse caption: error: no image files found", file=sys.stderr)
        return 2
    return 2 if failed else 0
