"""Evaluate a caption model on a dataset split: COCO-format results + pycocoevalcap metrics."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict

from tqdm.auto import tqdm

from ..config import save_json
from ..data.captions import read_captions
from ..data.languages import language
from ..errors import ConfigError
from ..generation import DecodeConfig
from ..metrics.caption import score_captions
from ..tasks.caption import Captioner
from . import EvaluationRequest


def evaluate_captioner(captioner, data_path: str, split: str, decode: DecodeConfig, fmt: str = "auto",
                       limit: int = 0, batch_size: int = 32, results_path: str | None = None,
                       progress: bool = True, **reader_kwargs) -> Dict:
    """Caption the split's images and score them against the references in the captioner's language (a Chinese
    model: the Flickr layout's captions_zh.txt, scored on jieba words, see ``vlfuse.metrics.caption``)."""
    data = read_captions(data_path, split=split, fmt=fmt, lang=captioner.lang, **reader_kwargs)
    if limit:
        data = data.subset(limit)
    refs, hyps, failed = {}, {}, []
    t0 = time.time()
    bar = tqdm(total=len(data), desc=f"captioning {split}", unit="img", disable=not progress, dynamic_ncols=True)
    by_path = {str(p): caps for p, caps in zip(data.images, data.captions)}
    for path, result, error in captioner.caption_files(data.images, decode, batch_size=batch_size):
        bar.update(1)
        if error:
            failed.append(error)
            continue
        key = Path(path).name
        refs[key], hyps[key] = by_path[path], result.caption
    bar.close()
    seconds = time.time() - t0
    metrics = score_captions(refs, hyps, lang=captioner.lang)
    metrics.update({"lang": captioner.lang, "words": language(captioner.lang).segmenter, "split": split, "failed_images": len(failed), "decode": decode.__dict__,
                    "seconds_per_image": seconds / max(1, len(data))})
    if results_path:
        save_json([{"image_id": k, "caption": v} for k, v in hyps.items()], results_path)
    return metrics


def evaluate(request: EvaluationRequest) -> Dict:
    """``vlfuse evaluate --task caption``: caption the split's images with the model's decoding default
    overridden by ``request.decode``, score them against the references."""
    captioner = Captioner.from_pretrained(request.model, device=request.device, runtime=request.runtime)
    if request.lang and request.lang != captioner.lang:
        raise ConfigError(f"caption model '{request.model}' writes '{captioner.lang}' captions and is scored in that "
                          f"language, not '{request.lang}' (Chinese: --model flickr8k-caption-zh)")
    decode = captioner.decode_config(**request.decode)
    metrics = evaluate_captioner(captioner, request.data, request.split, decode, fmt=request.fmt,
                                 limit=request.limit, batch_size=request.batch_size,
                                 results_path=request.results_path(".captions.json"))
    metrics["model"] = str(request.model)
    return metrics
