"""One way to load a trained model: ``Pipeline.from_pretrained`` for a known task, ``load`` for any task.

A checkpoint's config.json names its ``task``; ``TASK_PIPELINES`` maps each task to its user-facing pipeline
class. ``Captioner``, ``QuestionAnswerer`` and ``Retriever`` derive from ``Pipeline``: its ``from_pretrained``
resolves the name, reads config.json, checks the task (one ``ModelNotFoundError`` for every mismatch) and hands
the directory and config to the class's ``_from_checkpoint``, which builds the pipeline with its own options.

>>> vlfuse.load("flickr8k-caption")                      # a Captioner: dispatched on the checkpoint's task
>>> vlfuse.load("easyvqa", device="cpu")                 # a QuestionAnswerer; options go to its loader
>>> Captioner.from_pretrained("easyvqa")                 # ModelNotFoundError: a vqa model, not a caption model
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple, TypeVar, Union

from ..checkpoint import CONFIG_NAME, read_config
from ..errors import ModelNotFoundError
from ..hub import resolve_model

# task (a checkpoint's "task") -> (module, class) of its pipeline; imported on use, so that loading one task
# never imports the others
TASK_PIPELINES: Dict[str, Tuple[str, str]] = {
    "caption": ("vlfuse.tasks.caption", "Captioner"),
    "vqa": ("vlfuse.tasks.vqa", "QuestionAnswerer"),
    "retrieval": ("vlfuse.tasks.retrieval", "Retriever"),
}

P = TypeVar("P", bound="Pipeline")


def read_checkpoint(name_or_path: Union[str, Path], task: Optional[str] = None) -> Tuple[Path, Dict[str, Any]]:
    """A built-in model name or checkpoint directory -> (its directory, its config.json). With ``task``, a
    checkpoint of another task raises ModelNotFoundError saying what it is and how to load it."""
    directory = resolve_model(name_or_path)
    config = read_config(directory)
    found = config.get("task")
    if found not in TASK_PIPELINES:
        what = f"task {found!r}" if found is not None else "no 'task'"
        raise ModelNotFoundError(f"'{name_or_path}' has {what} in its {CONFIG_NAME}; vlfuse loads "
                                 f"{', '.join(repr(t) for t in TASK_PIPELINES)} models")
    if task is not None and found != task:
        raise ModelNotFoundError(f"'{name_or_path}' is a {found} model, not a {task} model; load it with "
                                 f"{TASK_PIPELINES[found][1]}.from_pretrained or vlfuse.load")
    return directory, config


class Pipeline:
    """Base of the user-facing pipelines. Subclasses set ``task`` and implement ``_from_checkpoint``."""

    task: ClassVar[str]  # the "task" a checkpoint of this pipeline has in its config.json
    default_model: ClassVar[str]  # the built-in model ``from_pretrained()`` loads, and the CLI's and service's default

    @classmethod
    def from_pretrained(cls: type[P], name_or_path: Union[str, Path, None] = None, **options: Any) -> P:
        """Load a built-in model (e.g. "flickr8k-caption"; by default the task's ``default_model``) or a checkpoint
        directory of this pipeline's task.
        ``options`` (``device`` and the task's own, e.g. a Captioner's ``int8``/``onnx``) go to the class's
        ``_from_checkpoint``. Raises ModelNotFoundError for an unknown name or a checkpoint of another task."""
        directory, config = read_checkpoint(cls.default_model if name_or_path is None else name_or_path, cls.task)
        return cls._from_checkpoint(directory, config, **options)

    @classmethod
    def _from_checkpoint(cls: type[P], directory: Path, config: Dict[str, Any], **options: Any) -> P:
        """Build the pipeline from a checkpoint ``directory`` whose config.json (``config``) has this task."""
        raise NotImplementedError


def load(name_or_path: Union[str, Path], **options: Any) -> Pipeline:
    """Load any model — the pipeline its checkpoint's task calls for: a ``Captioner``, ``QuestionAnswerer`` or
    ``Retriever``. ``options`` go to that pipeline's ``from_pretrained`` (e.g. ``device="cpu"``)."""
    directory, config = read_checkpoint(name_or_path)
    module, name = TASK_PIPELINES[config["task"]]
    pipeline: type[Pipeline] = getattr(importlib.import_module(module), name)
    return pipeline._from_checkpoint(directory, config, **options)
