"""``vlfuse train --config CFG [key.sub=value ...] [--resume]``; works under torchrun for data parallelism."""
from __future__ import annotations

import argparse
import importlib
import json
import os

from ..config import apply_overrides, read_config_file
from ..errors import ConfigError

TASK_MODULES = {"caption": "vlfuse.training.caption"}
TASK_MODULES["vqa"] = "vlfuse.training.vqa"
TASK_MODULES["retrieval"] = "vlfuse.training.retrieval"
# a text tower in another language for an existing retrieval model (vlfuse.tasks.retrieval.languages)
TASK_MODULES["retrieval-language"] = "vlfuse.training.retrieval_languages"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model from a YAML/JSON config")
    p.add_argument("--config", required=True, help="config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 model.fusion.dim=256")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt if it exists")
    return p


def _init_distributed() -> None:
    """Join the process group when started by torchrun (which sets WORLD_SIZE)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def run(args) -> int:
    raw = apply_overrides(read_config_file(args.config), args.overrides)
    task = raw.get("task", "caption")
    if task not in TASK_MODULES:
        raise ConfigError(f"config key 'task' is '{task}'; choose one of {', '.join(TASK_MODULES)}")
    _init_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        raw.setdefault("train", {})
        if str(raw["train"].get("device", "auto")) in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                raw["train"]["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
    summary = importlib.import_module(TASK_MODULES[task]).train(raw, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
