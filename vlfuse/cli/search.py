"""``vlfuse search photos.idx "a dog in the snow" -k 10`` (or "两只狗在雪地里玩": any language the model reads) or
``--image q.jpg [--grid results.png]``."""
from __future__ import annotations

import argparse
import json

from ..errors import InputError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("search", help="search an image index by text or by an example image")
    p.add_argument("index", help="index file (or --kind ivfpq folder) made by 'vlfuse index build'")
    p.add_argument("query", nargs="?", default=None, help="text to search for")
    p.add_argument("--image", default=None, help="search with this image instead of text")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--grid", default=None, metavar="PNG", help="also save a contact sheet of the hits")
    p.add_argument("--json", action="store_true", help="one JSON object per hit")
    p.add_argument("--lang", default="auto", help="the query's language: auto (told from its script: "
                                                  "'两只狗在雪地里玩' is Chinese), en or zh")
    p.add_argument("--model", default=None, help="retrieval model (default: the one that built the index)")
    p.add_argument("--device", default=None)
    return p


def run(args) -> int:
    from ..data.images import load_image
    from ..tasks.retrieval.shards import load_any_index
    from ..tasks.retrieval.pipeline import Retriever
    from .environment import runtime_options
    from .index import matching_retriever, model_for

    if (args.query is None) == (args.image is None):
        raise InputError("give either a text query or --image FILE (not both)")
    if args.query is not None and not args.query.strip():
        raise InputError("the text query is empty; type some words to search for")
    if args.k < 1:
        raise InputError(f"-k must be at least 1, got {args.k}")
    index = load_any_index(args.index)
    query_image = load_image(args.image) if args.image else None  # fail on a bad query before loading the model
    retriever = Retriever.from_pretrained(model_for(index, args.model), device=args.device,
                                          runtime=runtime_options())
    retriever = matching_retriever(index, retriever, args.index)
    if query_image is not None:
        vector = retriever.embed_images([query_image])
    else:
        vector = retriever.embed_texts([args.query], lang=None if args.lang == "auto" else args.lang)
    hits = index.search(vector, args.k)[0]
    for rank, hit in enumerate(hits, 1):
        if args.json:
            print(json.dumps({"rank": rank, "path": hit.path, "score": round(hit.score, 4)}, ensure_ascii=False))
        else:
            print(f"{hit.score:.4f}\t{hit.path}")
    if args.grid:
        from ..viz.contact_sheet import save_contact_sheet

        save_contact_sheet(hits, args.grid, query_image=query_image, query_text=args.query or "")
    return 0
