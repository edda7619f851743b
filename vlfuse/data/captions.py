"""Caption dataset readers. Every reader returns a ``CaptionSet``: image paths with their captions.

Supported layouts (``--data`` is a directory or a file; ``fmt`` = 'auto' detects it):
- ``flickr``: a directory with ``images/``, ``captions.txt`` (``name<TAB>caption``) and ``<split>.txt``;
- ``karpathy``: a ``dataset_*.json`` file (``images[].filename/filepath/split/sentences[].raw``);
- ``coco``: a COCO captions JSON (``images`` + ``annotations``);
- ``csv`` / ``jsonl``: rows with ``image`` and ``caption`` columns/keys (paths relative to the file).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..errors import DataError


@dataclasses.dataclass
class CaptionSet:
    """Images (absolute paths) and their reference captions, in a fixed order."""

    images: List[Path]
    captions: List[List[str]]  # captions[i] belong to images[i]
    name: str = ""

    def __post_init__(self):
        if len(self.images) != len(self.captions):
            raise DataError("CaptionSet needs one caption list per image")

    def __len__(self) -> int:
        return len(self.images)

    def pairs(self) -> List[tuple]:
        """(image index, caption) for every caption."""
        return [(i, c) for i, caps in enumerate(self.captions) for c in caps]

    def subset(self, n: int) -> "CaptionSet":
        return CaptionSet(self.images[:n], self.captions[:n], self.name)


def _group(rows, image_root: Path) -> CaptionSet:
    order: Dict[str, List[str]] = {}
    for name, caption in rows:
        order.setdefault(name, []).append(caption)
    return CaptionSet([image_root / n for n in order], list(order.values()))


def read_flickr(root: Path, split: Optional[str] = "train", captions_file: str = "captions.txt") -> CaptionSet:
    """The Flickr8k/30k layout of ../shared/data/flickr8k (``captions_file`` may be captions_zh.txt)."""
    cap_path = root / captions_file
    if not cap_path.is_file():
        raise DataError(f"{root}: no {captions_file} (expected the Flickr layout: images/, {captions_file}, <split>.txt)")
    wanted = None
    if split:
        split_path = root / f"{split}.txt"
        if not split_path.is_file():
            have = sorted(p.stem for p in root.glob("*.txt") if p.name not in (captions_file,) and not p.name.startswith("captions"))
            raise DataError(f"{root}: no split file {split}.txt (available splits: {', '.join(have) or 'none'})")
        wanted = {ln.strip() for ln in split_path.read_text(encoding="utf-8").splitlines() if ln.strip()}
    rows = []
    for lineno, line in enumerate(cap_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{cap_path}:{lineno}: expected 'image_name<TAB>caption'")
        name, caption = line.split("\t", 1)
        name = name.split("#")[0]  # the original Flickr8k.token.txt writes name.jpg#0
        if wanted is None or name in wanted:
            rows.append((name, caption.strip()))
    if wanted is not None:
        missing = wanted - {n for n, _ in rows}
        if missing:
            raise DataError(f"{cap_path}: {len(missing)} images of split '{split}' have no captions, e.g. {sorted(missing)[0]}")
    out = _group(rows, root / "images")
    out.name = f"{root.name}:{split or 'all'}"
    return out


READERS: Dict[str, Callable[..., CaptionSet]] = {"flickr": read_flickr}


def detect_format(path: Path) -> str:
    """Guess the layout of ``path`` (see module docstring)."""
    if path.is_dir():
        if (path / "captions.txt").is_file() or (path / "captions_zh.txt").is_file():
            return "flickr"
        raise DataError(f"{path}: directory is not in a known caption layout (expected images/ + captions.txt)")
    raise DataError(f"{path}: cannot detect the caption format; pass fmt explicitly ({', '.join(READERS)})")


def read_captions(path: str | Path, split: Optional[str] = "train", fmt: str = "auto", **kwargs) -> CaptionSet:
    """Read a caption dataset from a directory or file in any supported format."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"caption data '{path}' does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise DataError(f"unknown caption format '{fmt}'; choose one of {', '.join(READERS)}")
    return READERS[fmt](path, split=split, **kwargs)
