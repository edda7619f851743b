"""Retrieval evaluation, the standard 1k-image protocol: every image of a split against all of its captions
(Flickr8k val: 1,000 images x 5,000 captions). Reports R@1/5/10 and median rank, both directions. With
``lang`` another language's captions of the same photos (Flickr8k-CN: ``captions_zh.txt``) are the queries and
targets, read by the model's text tower in that language against the same image vectors."""
from __future__ import annotations

import time
from typing import Dict

import numpy as np
from tqdm.auto import tqdm

from ..data.captions import read_captions
from ..errors import ConfigError, DataError
from ..metrics.retrieval import recall_metrics
from ..tasks.retrieval import Retriever
from . import EvaluationRequest


def evaluate(request: EvaluationRequest) -> Dict:
    """``vlfuse evaluate --task retrieval [--lang zh]``: embed the split's images and its captions in the language
    with the model, score them."""
    retriever = Retriever.from_pretrained(request.model, device=request.device, runtime=request.runtime)
    lang = request.lang or "en"
    if lang not in retriever.languages:
        raise ConfigError(f"retrieval model '{request.model}' reads {', '.join(retriever.languages)}, not '{lang}'")
    data = read_captions(request.data, split=request.split, fmt=request.fmt, lang=lang)
    if request.limit:
        data = data.subset(request.limit)
    t0 = time.time()
    vectors, kept, failed = [], [], []
    for i, (path, vec, error) in enumerate(tqdm(retriever.embed_files(data.images, batch_size=request.batch_size),
                                                total=len(data), desc=f"embedding {request.split} images",
                                                unit="img", dynamic_ncols=True)):
        if error:
            failed.append(error)
            continue
        vectors.append(vec)
        kept.append(i)
    if not kept:
        raise DataError(f"none of the {len(data)} images of split '{request.split}' could be read")
    image_seconds = time.time() - t0
    captions = [c for i in kept for c in data.captions[i]]
    owner = [j for j, i in enumerate(kept) for _ in data.captions[i]]
    t1 = time.time()
    text_vectors = retriever.embed_texts(captions, lang=lang)
    text_seconds = time.time() - t1
    metrics = recall_metrics(np.stack(vectors) @ text_vectors.T, owner)
    metrics.update({"model": str(request.model), "model_id": retriever.model_id, "split": request.split,
                    "lang": lang,
                    "images": len(kept), "captions": len(captions), "failed_images": len(failed),
                    "seconds_per_image": image_seconds / len(kept), "seconds_per_caption": text_seconds / len(captions)})
    return metrics
