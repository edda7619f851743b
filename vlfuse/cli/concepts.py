"""``vlfuse concepts --model DIR --data ...``: give a retrieval checkpoint concept-aware image vectors (the
backbone's ImageNet concepts added to every image vector; see ``vlfuse.tasks.retrieval.concepts``)."""
from __future__ import annotations

import argparse

# options left out take ConceptConfig's defaults (the shipped model's settings)
SETTINGS = ("prompt", "top_k", "weight", "temperature")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("concepts", help="give a retrieval model concept-aware image vectors (search)")
    p.add_argument("--model", required=True, help="retrieval checkpoint directory or built-in name (written in place)")
    p.add_argument("--data", required=True, help="the model's training photos: a dataset directory or file")
    p.add_argument("--split", default="train", help="their split (default train; never the split you evaluate on)")
    p.add_argument("--format", default="auto", help="dataset format (default: detected)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    p.add_argument("--prompt", help="a concept's text: {name} its name, {word} its caption word, {a} a/an "
                   "(default '{name}')")
    p.add_argument("--top-k", type=int, help="concepts per photo (default 5)")
    p.add_argument("--weight", type=float, help="of the concept term (default 1.5; 0 = image vectors as without "
                   "concepts)")
    p.add_argument("--temperature", type=float, help="probabilities ** (1 / this), renormalised (default 1: as "
                   "they are)")
    p.add_argument("--no-novelty", action="store_true", help="count every concept alike, however often the "
                   "training photos show it")
    p.add_argument("--no-center", action="store_true", help="keep the prompt vectors' common part")
    p.add_argument("--batch-size", type=int, default=32)
    return p


def run(args) -> int:
    from pathlib import Path

    from ..data.captions import read_captions
    from ..hub import resolve_model
    from ..tasks.retrieval.concepts import ConceptConfig, attach_concepts, build_concepts
    from ..tasks.retrieval.pipeline import Retriever
    from .environment import runtime_options

    data = read_captions(args.data, split=args.split, fmt=args.format)
    if args.limit:
        data = data.subset(args.limit)
    given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    config = ConceptConfig(**given, novelty=not args.no_novelty, center=not args.no_center,
                           prior_data=f"{Path(args.data).name} {args.split} ({len(data)} photos)")
    directory = resolve_model(args.model)  # a built-in name is written in place too
    retriever = Retriever.from_pretrained(directory, runtime=runtime_options()).without_concepts()
    concepts = build_concepts(retriever, data, config, batch_size=args.batch_size)
    attach_concepts(directory, concepts)
    print(f"{args.model}: {len(concepts.vectors)} concepts ({concepts.config.prompt!r}), prior from "
          f"{config.prior_data}; image vectors now take in the top {config.top_k} at weight {config.weight} "
          f"(rebuild indexes made before: vlfuse index build)")
    return 0
