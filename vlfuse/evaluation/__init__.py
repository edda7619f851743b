"""Scoring trained models on data: one ``evaluate_*`` per task, each taking a typed ``EvaluationRequest``."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

from ..runtime import RuntimeOptions


@dataclasses.dataclass
class EvaluationRequest:
    """What ``vlfuse evaluate`` (or a caller in Python) asks of a task's evaluation."""

    model: str                            # built-in model name or checkpoint directory
    data: str                             # dataset directory or file
    split: str = "val"
    fmt: str = "auto"                     # dataset format (auto-detected by default)
    limit: int = 0                        # the first N images (VQA: questions) only; 0 = all
    out: Optional[str] = None             # where the metrics JSON goes (outputs default next to it)
    results: Optional[str] = None         # where the generated outputs go
    batch_size: int = 32
    device: Optional[str] = None
    runtime: RuntimeOptions = RuntimeOptions()  # how the model runs inference (ONNX Runtime, int8, graph cache)
    decode: Dict[str, Any] = dataclasses.field(default_factory=dict)  # captioning: decoding options over the model's
    wordnet: Optional[str] = None         # VQA: the WordNet folder WUPS reads (None: Debian's /usr/share/wordnet)
    lang: Optional[str] = None            # the captions' language: retrieval's queries and targets (default en);
                                          # a caption model scores in its own, and refuses another

    def results_path(self, suffix: str) -> Optional[str]:
        """``results``, or next to ``out`` with ``suffix`` (e.g. ".captions.json"), or None."""
        if self.results:
            return self.results
        return str(Path(self.out).with_suffix("")) + suffix if self.out else None
