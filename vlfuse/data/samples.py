"""Real sample photos that come with an installed package (scikit-image), for demos without any dataset."""
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
