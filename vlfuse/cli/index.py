"""``vlfuse index build DIR... --out photos.idx`` and ``vlfuse index add photos.idx DIR...``."""
from __future__ import annotations

import argparse
import sys

from ..data.images import list_images
from ..errors import InputError
from .engine import add_engine_arguments, ray_job

DEFAULT_MODEL = "flickr8k-retrieval"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("index", help="build or update an image search index")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    b = actions.add_parser("build", help="embed every image under the given folders/files into a new index")
    b.add_argument("paths", nargs="+", help="image folders and/or files")
    b.add_argument("--out", required=True, help="index file to write (e.g. photos.idx)")
    b.add_argument("--model", default=DEFAULT_MODEL, help="retrieval model: built-in name or checkpoint directory")
    b.add_argument("--kind", choices=("flat", "ivfpq"), default="flat",
                   help="flat: one file, every vector, exact search (default); ivfpq: a folder of faiss IVF-PQ "
                        "shards for millions of photos (approximate search; docs/scaling.md)")
    b.add_argument("--shards", type=int, default=1, help="with --kind ivfpq: number of shards (default 1)")
    b.add_argument("--nlist", type=int, default=0,
                   help="with --kind ivfpq: inverted lists per shard (default: ~4 sqrt(photos per shard))")
    b.add_argument("--pq-m", type=int, default=32, help="with --kind ivfpq: bytes per vector (PQ codes; default 32)")
    b.add_argument("--nprobe", type=int, default=16, help="with --kind ivfpq: lists searched per query (default 16)")
    add_engine_arguments(b)
    a = actions.add_parser("add", help="add new or changed images to an index; drop files that are gone")
    a.add_argument("index", help="index file to update")
    a.add_argument("paths", nargs="+", help="image folders and/or files")
    a.add_argument("--model", default=None, help="retrieval model (default: the one that built the index)")
    for q in (b, a):
        q.add_argument("--batch-size", type=int, default=32)
        q.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def model_for(index, requested):
    """The retriever to use with ``index``: ``requested`` or the model named in the index."""
    return requested or index.model_id.split("@")[0]


def matching_retriever(index, retriever, path):
    """``retriever`` as it embedded ``index`` (``ImageIndex.compatible_retriever``), saying so where that is the
    model without its concept term."""
    matching = index.compatible_retriever(retriever)
    if matching is not retriever:
        print(f"note: {path} was built by {retriever.name} before it knew concepts; images are embedded as then. "
              f"For concept-aware search rebuild it: vlfuse index build DIR... --out {path}", file=sys.stderr)
    return matching


def print_report(report, index, out) -> None:
    print(f"{out}: {len(index)} images (embedded {report.embedded}, unchanged {report.unchanged}, "
          f"removed {report.removed}, skipped {len(report.failed)})", file=sys.stderr)
    if report.failed:
        print(f"skipped {len(report.failed)} file(s) that could not be used:", file=sys.stderr)
        for _, error in report.failed:
            print(f"  {error}", file=sys.stderr)


def run(args) -> int:
    from ..tasks.retrieval.index import ImageIndex
    from ..tasks.retrieval.pipeline import Retriever
    from .environment import runtime_options

    if getattr(args, "engine", "local") == "ray":
        from ..scale.cluster import require_ray

        require_ray()  # before loading any model: say at once how to install it
    paths = list_images(args.paths)
    if args.action == "build":
        if not paths:
            raise InputError(f"no image files found in {', '.join(args.paths)}")
        retriever = Retriever.from_pretrained(args.model, device=args.device, runtime=runtime_options())
        if args.engine == "ray":
            return build_on_ray(args, retriever, paths)
        index = ImageIndex.build(retriever, paths, progress=not args.no_progress, batch_size=args.batch_size)
        out = args.out
    else:
        index = ImageIndex.load(args.index)
        retriever = Retriever.from_pretrained(model_for(index, args.model), device=args.device,
                                              runtime=runtime_options())
        retriever = matching_retriever(index, retriever, args.index)
        index.add(retriever, paths, progress=not args.no_progress, batch_size=args.batch_size)
        out = args.index
    return save_index(index, out, args)


def build_on_ray(args, retriever, paths) -> int:
    """``index build --engine ray``: the workers embed chunks of the photos, the vectors come back here in order
    and make one index, as the local command's."""
    from pathlib import Path

    from ..scale.batch import embed_files
    from ..scale.cluster import ray_session
    from ..tasks.retrieval.index import ImageIndex
    from .environment import runtime_options

    job = ray_job(args)
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    with ray_session(job.address):
        index = ImageIndex.build(retriever, paths, progress=not args.no_progress,
                                 embed=lambda files: embed_files(model, files, job, runtime_options(), args.device))
    return save_index(index, args.out, args)


def save_index(index, out, args) -> int:
    """Write ``index`` to ``out`` (for ``--kind ivfpq``, as a folder of shards) and report what was done."""
    if len(index) == 0:
        print_report(index.last_report, index, out)
        raise InputError("none of the images could be read; no index written")
    if getattr(args, "kind", "flat") == "ivfpq":
        from ..tasks.retrieval.shards import IVFPQParams, ShardedIndex

        params = IVFPQParams(nlist=args.nlist, m=args.pq_m, nprobe=args.nprobe)
        ShardedIndex.from_index(index, args.shards, params).save(out)
    else:
        index.save(out)
    print_report(index.last_report, index, out)
    return 0
