"""Retrieval evaluation, the standard 1k-image protocol: every image of a split against all of its captions
(Flickr8k val: 1,000 images x 5,000 captions). Reports R@1/5/10 and median rank, both directions."""
from __future__ import annotations

import time
from typing import Dict, Sequence

import numpy as np


def recall_metrics(sim: np.ndarray, caption_image: Sequence[int]) -> Dict[str, float]:
    """``sim`` (I, C) image–caption similarities; ``caption_image[c]`` = the image of caption c.

    image→text: rank of the best-ranked correct caption for each image; text→image: rank of the
    correct image for each caption. Recalls in percent, ranks 1-based.
    """
    sim = np.asarray(sim, dtype=np.float32)
    owner = np.asarray(caption_image)
    n_img, n_cap = sim.shape
    # text→image: how many images score higher than the right one (+1)
    right = sim[owner, np.arange(n_cap)]  # (C,)
    t2i_rank = (sim > right[None, :]).sum(0) + 1
    # image→text: for each image, rank of its best correct caption among all captions
    i2t_rank = np.empty(n_img, dtype=np.int64)
    for i in range(n_img):
        best = sim[i, owner == i].max()
        i2t_rank[i] = (sim[i] > best).sum() + 1
    out: Dict[str, float] = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float(100.0 * (ranks <= k).mean())
        out[f"{name}_median_rank"] = float(np.median(ranks))
        out[f"{name}_mean_rank"] = float(ranks.mean())
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def evaluate(args) -> Dict:
    """``vlfuse evaluate --task retrieval``: embed the split's images and captions with the model, score them."""
    from ..data.captions import read_captions
    from ..errors import DataError
    from ..models.retrieval import Retriever

    retriever = Retriever.from_pretrained(args.model, device=args.device)
    data = read_captions(args.data, split=args.split, fmt=args.format)
    if args.limit:
        data = data.subset(args.limit)
    t0 = time.time()
    vectors, kept, failed = [], [], []
    from tqdm.auto import tqdm

    for i, (path, vec, error) in enumerate(tqdm(retriever.embed_files(data.images, batch_size=args.batch_size),
                                                total=len(data), desc=f"embedding {args.split} images",
                                                unit="img", dynamic_ncols=True)):
        if error:
            failed.append(error)
            continue
        vectors.append(vec)
        kept.append(i)
    if not kept:
        raise DataError(f"none of the {len(data)} images of split '{args.split}' could be read")
    image_seconds = time.time() - t0
    captions = [c for i in kept for c in data.captions[i]]
    owner = [j for j, i in enumerate(kept) for _ in data.captions[i]]
    t1 = time.time()
    text_vectors = retriever.embed_texts(captions)
    text_seconds = time.time() - t1
    metrics = recall_metrics(np.stack(vectors) @ text_vectors.T, owner)
    metrics.update({"model": str(args.model), "model_id": retriever.model_id, "split": args.split,
                    "images": len(kept), "captions": len(captions), "failed_images": len(failed),
                    "seconds_per_image": image_seconds / len(kept), "seconds_per_caption": text_seconds / len(captions)})
    return metrics
