"""vlfuse: vision–language fusion — captioning, VQA, image–text retrieval, tagging and video subtitles on a plain
CPU.

The public names are imported on first use, so ``import vlfuse.errors`` (say) stays light.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "Captioner": "vlfuse.tasks.caption", "CaptionModel": "vlfuse.tasks.caption",
    "CaptionModelConfig": "vlfuse.tasks.caption",
    "QuestionAnswerer": "vlfuse.tasks.vqa", "VQAModel": "vlfuse.tasks.vqa",
    "Retriever": "vlfuse.tasks.retrieval", "RetrievalModel": "vlfuse.tasks.retrieval",
    "ImageIndex": "vlfuse.tasks.retrieval",
    "Tagger": "vlfuse.tasks.tagging",
    "Subtitler": "vlfuse.tasks.subtitle",
    "load": "vlfuse.tasks.base",  # any model, as the pipeline its checkpoint's task calls for
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vlfuse' has no attribute '{name}'")
