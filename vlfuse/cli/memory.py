"""``vlfuse memory --model DIR --data ...``: give a caption checkpoint a caption memory for the ``rerank``
decoding strategy (training captions embedded by a retrieval model; see ``vlfuse.tasks.caption.rerank``)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("memory", help="build a caption model's memory for consensus reranking (--rerank)")
    p.add_argument("--model", required=True, help="caption checkpoint directory or built-in name (written in place)")
    p.add_argument("--data", required=True, help="captions the memory holds: a dataset directory or file (in the "
                                                 "caption model's language: captions_zh.txt for a Chinese model)")
    p.add_argument("--split", default="train", help="their split (default train; never the split you evaluate on)")
    p.add_argument("--format", default="auto", help="dataset format (default: detected)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    p.add_argument("--retriever", default="flickr8k-retrieval", help="retrieval model: built-in name or directory")
    p.add_argument("--neighbours", type=int, default=40, help="memory captions each image is compared with")
    p.add_argument("--bleu-weight", type=float, default=0.0,
                   help="consensus = CIDEr-D + this x BLEU-4 (default 0; > 0 needs pycocoevalcap)")
    p.add_argument("--logprob-weight", type=float, default=0.5,
                   help="score = consensus + this x the candidate's mean log-probability per word")
    p.add_argument("--name-concepts", type=float, default=0.0, metavar="P",
                   help="measure how these captions name their photos' concepts (the retriever's ImageNet "
                        "classifier), for reranking that names them; with --default, name each photo's concepts of "
                        "probability >= P by default (0 = off, the default)")
    p.add_argument("--default", action="store_true",
                   help="make rerank the model's decoding default (with --candidates, --temperature, --seed)")
    p.add_argument("--candidates", type=int, default=12, help="samples drawn besides the greedy caption")
    p.add_argument("--temperature", type=float, default=0.5, help="of the samples (default 0.5; top-p 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the default (reproducible captions)")
    return p


def run(args) -> int:
    from ..checkpoint import read_config
    from ..data.captions import read_captions
    from ..hub import resolve_model
    from ..tasks.caption.rerank import MemoryConfig, RerankConfig, build_and_attach

    config = MemoryConfig(build=True, rerank=RerankConfig(retriever=args.retriever, neighbours=args.neighbours,
                                                          bleu_weight=args.bleu_weight,
                                                          logprob_weight=args.logprob_weight),
                          default=args.default, candidates=args.candidates, temperature=args.temperature,
                          seed=args.seed, name_concepts=args.name_concepts)
    lang = read_config(resolve_model(args.model)).get("lang", "en")
    data = read_captions(args.data, split=args.split, fmt=args.format, lang=lang)
    if args.limit:
        data = data.subset(args.limit)
    memory = build_and_attach(args.model, data, config)
    print(f"{args.model}: memory of {len(memory)} captions ({len(data)} images, {args.split}) in the space of "
          f"{args.retriever}; {'rerank is now its decoding default' if args.default else 'decode with --rerank'}")
    return 0
