"""Caption dataset readers. Every reader returns a ``CaptionSet``: image paths with their captions.

Supported layouts (``--data`` is a directory or a file; ``fmt`` = 'auto' detects it):
- ``flickr``: a directory with ``images/``, ``captions.txt`` (``name<TAB>caption``) and ``<split>.txt``;
- ``karpathy``: a ``dataset_*.json`` file (``images[].filename/filepath/split/sentences[].raw``);
- ``coco``: a COCO captions JSON (``images`` + ``annotations``);
- ``csv`` / ``jsonl``: rows with ``image`` and ``caption`` columns/keys (paths relative to the file),
  optionally ``split``; a directory holding ``<split>.csv`` / ``<split>.jsonl`` works too.

A malformed entry raises DataError naming the file and line (or JSON entry).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..errors import DataError
from ..registry import check_kwargs
from .languages import language


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

    def without_repeats(self) -> "CaptionSet":
        """The same images, each caption that repeats an earlier one of the same image dropped."""
        return CaptionSet(self.images, [list(dict.fromkeys(caps)) for caps in self.captions], self.name)


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


# Karpathy split names -> the split each one belongs to when asked for ('restval' is extra training data)
KARPATHY_SPLITS = {"train": {"train", "restval"}, "restval": {"restval"}, "val": {"val"}, "test": {"test"}}


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def _field(entry, key: str, where: str, kind=str):
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where}: missing '{key}'")
    value = entry[key]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise DataError(f"{where}: '{key}' must be a non-empty {kind.__name__}, got {value!r}")
    return value


def _split_filter(split: Optional[str], present: set, path: Path, mapping: Dict[str, set]) -> Optional[set]:
    """Split names of the file to keep for ``split`` (None = everything); unknown splits name the ones there."""
    if split is None:
        return None
    wanted = mapping.get(split, {split})
    if not wanted & present:
        raise DataError(f"{path}: no images in split '{split}' (splits in this file: {', '.join(sorted(present))})")
    return wanted


def _whole_file_split(split: Optional[str], path: Path) -> None:
    """A file without split information is one split: accept ``split`` only if the file is named after it."""
    if split is not None and split not in path.stem:
        raise DataError(f"{path}: the file has no split information, so it cannot provide split '{split}'; "
                        f"name the file after the split (e.g. {split}{path.suffix}) or use split 'all'")


def _finish(rows, path: Path, image_root: Path, split: Optional[str]) -> CaptionSet:
    if not rows:
        raise DataError(f"{path}: no captions found" + (f" for split '{split}'" if split else ""))
    out = _group(rows, image_root)
    out.name = f"{path.stem}:{split or 'all'}"
    return out


def read_karpathy(path: Path, split: Optional[str] = "train", image_root: Optional[str] = None) -> CaptionSet:
    """Karpathy's ``dataset_{coco,flickr8k,flickr30k}.json``. ``split='train'`` includes 'restval'.

    Image paths are ``image_root/filepath/filename`` (``filepath`` only in the COCO file); ``image_root``
    defaults to the JSON file's folder.
    """
    data = _load_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: expected a Karpathy split file with an 'images' list")
    present = {str(im.get("split")) for im in images if isinstance(im, dict)}
    keep = _split_filter(split, present, path, KARPATHY_SPLITS)
    rows = []
    for i, im in enumerate(images):
        where = f"{path}: images[{i}]"
        name = _field(im, "filename", where)
        if keep is not None and _field(im, "split", where) not in keep:
            continue
        rel = Path(im["filepath"]) / name if im.get("filepath") else Path(name)
        for j, sent in enumerate(_field(im, "sentences", where, list)):
            rows.append((str(rel), _field(sent, "raw", f"{where}.sentences[{j}]").strip()))
    return _finish(rows, path, Path(image_root) if image_root else path.parent, split)


def read_coco(path: Path, split: Optional[str] = "train", image_root: Optional[str] = None) -> CaptionSet:
    """A COCO captions JSON (``images[].id/file_name`` + ``annotations[].image_id/caption``).

    COCO ships one file per split (captions_train2014.json, ...): the file must be named after the split
    asked for, unless its images carry a ``split`` field. Image files are looked up under ``image_root``
    (default: the folder of the JSON file).
    """
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: expected a COCO captions file with 'images' and 'annotations' lists")
    present = {str(im["split"]) for im in data["images"] if isinstance(im, dict) and "split" in im}
    keep = _split_filter(split, present, path, KARPATHY_SPLITS) if present else None
    if not present:
        _whole_file_split(split, path)
    names: Dict[object, str] = {}
    for i, im in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if "id" not in im:
            raise DataError(f"{where}: missing 'id'")
        if keep is None or im.get("split") in keep:
            names[im["id"]] = _field(im, "file_name", where)
    rows = []
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DataError(f"{where}: missing 'image_id'")
        caption = _field(ann, "caption", where).strip()
        if ann["image_id"] in names:
            rows.append((names[ann["image_id"]], caption))
        elif keep is None:
            raise DataError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
    return _finish(rows, path, Path(image_root) if image_root else path.parent, split)


def _table_rows(path: Path, rows, split: Optional[str]) -> List[tuple]:
    """(line number, record) pairs -> (image, caption) pairs, checking each row and filtering by split."""
    out, has_split = [], None
    for lineno, rec in rows:
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with 'image' and 'caption'")
        image, caption = rec.get("image"), rec.get("caption")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: missing or empty 'image'")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{where}: missing or empty 'caption'")
        row_split = rec.get("split")
        if has_split is None:
            has_split = row_split is not None
            if not has_split:
                _whole_file_split(split, path)
        if split is not None and has_split and row_split not in KARPATHY_SPLITS.get(split, {split}):
            continue
        out.append((image.strip(), caption.strip()))
    return out


def read_csv(path: Path, split: Optional[str] = "train") -> CaptionSet:
    """A CSV with a header row holding ``image`` and ``caption`` (optionally ``split``); one caption per row,
    image paths relative to the CSV's folder."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}:1: header must name the columns 'image' and 'caption' "
                                f"(missing {', '.join(sorted(missing))}; got {reader.fieldnames})")
            records = []
            for rec in reader:
                if None in rec or None in rec.values():  # too many / too few fields on this line
                    raise DataError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} fields "
                                    f"({', '.join(reader.fieldnames)})")
                records.append((reader.line_num, rec))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    return _finish(_table_rows(path, records, split), path, path.parent, split)


def read_jsonl(path: Path, split: Optional[str] = "train") -> CaptionSet:
    """JSON Lines, one ``{"image": ..., "caption": ...}`` (optionally ``"split"``) per line,
    image paths relative to the file's folder."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return _finish(_table_rows(path, records, split), path, path.parent, split)


READERS: Dict[str, Callable[..., CaptionSet]] = {
    "flickr": read_flickr,
    "karpathy": read_karpathy,
    "coco": read_coco,
    "csv": read_csv,
    "jsonl": read_jsonl,
}


def _detect_json(path: Path) -> str:
    head = path.read_text(encoding="utf-8", errors="replace")[:200_000]
    if '"annotations"' in head:
        return "coco"
    if '"sentences"' in head or path.name.startswith("dataset_"):
        return "karpathy"
    raise DataError(f"{path}: JSON file is neither a Karpathy split file ('images' with 'sentences') nor a COCO "
                    f"captions file ('images' + 'annotations'); pass the format explicitly")


def detect_format(path: Path, split: Optional[str] = None) -> str:
    """Guess the layout of ``path`` (see module docstring)."""
    if path.is_dir():
        if (path / "captions.txt").is_file() or (path / "captions_zh.txt").is_file():
            return "flickr"
        if sorted(path.glob("dataset_*.json")):
            return "karpathy"
        raise DataError(f"{path}: directory is not in a known caption layout (expected images/ + captions.txt, "
                        f"a Karpathy dataset_*.json, or {split or '<split>'}.csv / {split or '<split>'}.jsonl)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return _detect_json(path)
    raise DataError(f"{path}: cannot detect the caption format; pass fmt explicitly ({', '.join(READERS)})")


def _resolve_directory(path: Path, split: Optional[str], fmt: str) -> Path:
    """A directory given for a file format -> the file inside it that holds ``split``."""
    if fmt == "karpathy":
        found = sorted(path.glob("dataset_*.json"))
        if len(found) != 1:
            raise DataError(f"{path}: expected exactly one dataset_*.json, found {len(found)}")
        return found[0]
    exts = {"csv": (".csv",), "jsonl": (".jsonl", ".ndjson")}.get(fmt, (f".{fmt}",))
    for ext in exts:
        for name in ([split] if split else []) + ["captions"]:
            if (path / f"{name}{ext}").is_file():
                return path / f"{name}{ext}"
    want = " or ".join(f"{split or 'captions'}{e}" for e in exts)
    raise DataError(f"{path}: no {want} in this directory")


def read_captions(path: str | Path, split: Optional[str] = "train", fmt: str = "auto", lang: str = "en",
                  **kwargs) -> CaptionSet:
    """Read a caption dataset from a directory or file in any supported format.

    ``split`` None, '' or 'all' takes every image. ``lang`` is the captions' language (``vlfuse.data.languages``):
    in the Flickr layout it picks the captions file (zh: captions_zh.txt) unless ``captions_file`` is given, and
    a language with ``drop_repeated`` loses each caption that repeats another of its image. Extra ``kwargs`` go to
    the reader (e.g. ``image_root`` for Karpathy/COCO, ``captions_file`` for the Flickr layout); an option the
    format lacks is a ConfigError.
    """
    captions_language = language(lang)
    path = Path(path)
    if not path.exists():
        raise DataError(f"caption data '{path}' does not exist")
    split = None if split in (None, "", "all") else split
    if path.is_dir() and fmt == "auto":
        has_table = split and any((path / f"{split}{e}").is_file() for e in (".csv", ".jsonl", ".ndjson"))
        if has_table and not (path / "captions.txt").is_file():
            fmt = "csv" if (path / f"{split}.csv").is_file() else "jsonl"
    fmt = detect_format(path, split) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise DataError(f"unknown caption format '{fmt}'; choose one of {', '.join(READERS)}")
    if path.is_dir() and fmt != "flickr":
        path = _resolve_directory(path, split, fmt)
    reader = READERS[fmt]
    if fmt == "flickr":
        kwargs.setdefault("captions_file", captions_language.captions_file)
    check_kwargs(reader, kwargs, f"caption format '{fmt}'")
    data = reader(path, split=split, **kwargs)
    return data.without_repeats() if captions_language.drop_repeated else data
