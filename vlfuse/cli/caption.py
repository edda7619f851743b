"""``vlfuse caption IMAGE_OR_DIR ...``: caption photos; bad files are reported one line each on stderr."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Set, TextIO, Tuple

from tqdm.auto import tqdm

from ..data.images import list_images
from .engine import add_engine_arguments, ray_job


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
    p.add_argument("--name-concepts", type=float, default=None, metavar="P",
                   help="reranking names each photo's ImageNet concept of probability >= P in its caption, 0 = off "
                        "(default: the model's; flickr8k-caption 0.5)")


def decode_options(args) -> dict:
    """The decoding options given on the command line (``Captioner.decode_config`` lays them over the model's
    own default); those left out are None."""
    strategy = "sample" if args.sample else "rerank" if args.rerank else None
    return dict(beam=args.beam, strategy=strategy, max_len=args.max_len, top_p=args.top_p,
                temperature=args.temperature, seed=args.seed, length_penalty=args.length_penalty,
                no_repeat_ngram=args.no_repeat_ngram, candidates=args.candidates, name_concepts=args.name_concepts)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("caption", help="caption images or folders of images")
    p.add_argument("paths", nargs="*", help="image files and/or folders")
    p.add_argument("--samples", action="store_true", help="also caption scikit-image's bundled sample photos")
    p.add_argument("--model", default=None,
                   help="built-in model name or checkpoint directory (default: the --lang's built-in model; "
                        "flickr8k-caption for English)")
    p.add_argument("--lang", default=None,
                   help="the captions' language: en, zh, or several comma-separated (en,zh: one caption per "
                        "language per photo, each by that language's built-in model; default: the model's)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line ({image, caption, score, lang}; several languages: {image, "
                        "captions: {lang: caption}, scores}) instead of tab-separated lines: the path, then a "
                        "caption per language in --lang's order")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--resume", metavar="FILE",
                   help="append to FILE (an earlier run's output, same --json or not) the photos it does not hold "
                        "yet; a line cut off by a killed run is dropped and its photo done again")
    p.add_argument("--no-progress", action="store_true", help="with --engine ray: no progress line on stderr")
    add_engine_arguments(p)
    p.add_argument("--attention-map", metavar="PNG", help="save the per-word attention over the (first) image")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    p.add_argument("--float32", action="store_true",
                   help="decode with the float32 decoder (on a CPU the default is its faster int8 copy)")
    p.add_argument("--no-onnx", action="store_true",
                   help="encode images with PyTorch and decode with TorchScript (on a CPU the default is ONNX "
                        "Runtime for both where it is installed)")
    add_decode_arguments(p)
    return p


def load_captioners(args) -> list:
    """The captioners ``--model`` and ``--lang`` ask for: the model given (checked against a single --lang), else
    each language's built-in model."""
    from ..data.languages import parse_languages
    from ..errors import ConfigError
    from ..tasks.caption.pipeline import Captioner
    from .environment import runtime_options

    langs = parse_languages(args.lang) if args.lang else []
    if args.model and len(langs) > 1:
        raise ConfigError(f"--model names one model, which writes one language; with --lang {args.lang} each "
                          f"language is captioned by its built-in model (leave out --model)")
    names = [args.model] if args.model else [Captioner.default_model_for(lang) for lang in langs or ["en"]]
    runtime = runtime_options(no_onnx=args.no_onnx, float32=args.float32)
    captioners = [Captioner.from_pretrained(name, device=args.device, runtime=runtime) for name in names]
    if langs and captioners[0].lang != langs[0]:
        raise ConfigError(f"model '{args.model}' writes captions in '{captioners[0].lang}', not '{langs[0]}'")
    return captioners


def format_line(path: str, results: dict, as_json: bool) -> str:
    """One photo's output line: {lang: CaptionResult} as JSON or tab-separated (one caption per language)."""
    if len(results) == 1:
        (lang, result), = results.items()
        return json.dumps({"image": path, "caption": result.caption, "score": round(result.score, 4), "lang": lang},
                          ensure_ascii=False) if as_json else f"{path}\t{result.caption}"
    if as_json:
        return json.dumps({"image": path, "captions": {k: r.caption for k, r in results.items()},
                           "scores": {k: round(r.score, 4) for k, r in results.items()}}, ensure_ascii=False)
    return "\t".join([path] + [r.caption for r in results.values()])


def line_path(line: str) -> str:
    """The photo an output line is about (a JSON line's "image", else the first tab-separated field)."""
    if line.startswith("{"):
        try:
            return json.loads(line)["image"]
        except (ValueError, KeyError, TypeError):
            pass
    return line.split("\t", 1)[0]


def open_resumed(path: str) -> Tuple[Set[str], TextIO]:
    """The photos ``path`` already holds, and ``path`` open for appending. A last line without its newline (a run
    killed while writing it) is cut off, so its photo is done again."""
    done: Set[str] = set()
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            complete = data[:data.rfind(b"\n") + 1]
            if len(complete) < len(data):
                f.truncate(len(complete))
        done = {line_path(line) for line in complete.decode("utf-8").splitlines() if line.strip()}
    return done, open(path, "a", encoding="utf-8")


def caption_rows(args, captioners, decodes, paths) -> Iterator[Tuple[str, Optional[list], Optional[str]]]:
    """(path, [CaptionResult per captioner] or None, error or None) for every path, in order, by --engine."""
    if args.engine == "local":
        # each language's captions of the same photos, in the same order (a bad file fails for all of them alike)
        streams = [c.caption_files(paths, d, batch_size=args.batch_size) for c, d in zip(captioners, decodes)]
        for rows in zip(*streams):
            path, _, error = rows[0]
            yield path, None if error else [r for _, r, _ in rows], error
        return
    from ..scale.batch import caption_files
    from ..scale.cluster import ray_session
    from .environment import runtime_options

    job = ray_job(args)
    if not paths:
        return
    resolved = [str(Path(p).resolve()) for p in paths]  # workers get absolute paths; lines show them as given
    shown = dict(zip(resolved, map(str, paths)))
    models = [str(Path(m).resolve()) if m and Path(m).is_dir() else m
              for m in ([args.model] if args.model else [c.default_model_for(c.lang) for c in captioners])]
    with ray_session(job.address), tqdm(total=len(paths), desc="captioning", unit="photo", file=sys.stderr,
                                        disable=args.no_progress or not paths, dynamic_ncols=True) as bar:
        rows = caption_files(models, resolved, job, decode_options(args),
                             runtime_options(no_onnx=args.no_onnx, float32=args.float32), args.device)
        for path, results, error in rows:
            bar.update(1)
            given = shown[path]
            yield given, results, error and error.replace(path, given, 1)


def run(args) -> int:
    if args.engine == "ray":
        from ..scale.cluster import require_ray

        require_ray()  # before loading any model: say at once how to install it
    captioners = load_captioners(args)
    decodes = [c.decode_config(**decode_options(args)) for c in captioners]
    paths = list_images(args.paths)
    if args.samples:
        from ..data.samples import sample_photos

        paths += sample_photos()
    out, done = sys.stdout, set()
    if args.resume:
        done, out = open_resumed(args.resume)
        skipped = sum(str(p) in done for p in paths)
        paths = [p for p in paths if str(p) not in done]
        print(f"vlfuse caption: {args.resume} holds {skipped} of these photos; captioning the other {len(paths)}",
              file=sys.stderr)
    failed, first_ok = 0, None
    try:
        for path, results, error in caption_rows(args, captioners, decodes, paths):
            if error:
                failed += 1
                tqdm.write(f"vlfuse caption: error: {error}", file=sys.stderr)  # (above --engine ray's progress line)
                continue
            first_ok = first_ok or path
            line = format_line(path, {c.lang: r for c, r in zip(captioners, results)}, args.json)
            print(line, file=out, flush=True)
    finally:
        if out is not sys.stdout:
            out.close()
    if args.attention_map and first_ok:
        from ..viz.attention import save_attention_figure

        words, att = captioners[0].attention_map(first_ok, decodes[0])
        if att is None:
            print("vlfuse caption: this model's fusion module has no spatial attention to draw", file=sys.stderr)
        else:
            save_attention_figure(first_ok, words, att, args.attention_map)
            print(f"attention map written to {args.attention_map}", file=sys.stderr)
    if not paths and not done:
        print("vlfuse caption: error: no image files found", file=sys.stderr)
        return 2
    return 2 if failed else 0
