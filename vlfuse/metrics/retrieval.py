"""Retrieval metrics: recall@K and ranks, both directions."""
from __future__ import annotations

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
