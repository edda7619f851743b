"""Contact sheets of search results: the query (optional) and the hits as thumbnails with rank and score."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from ..data.images import ImageInput, load_image
from ..errors import ImageError


def _thumbnail(image: Image.Image, size: int) -> Image.Image:
    image = image.copy()
    image.thumbnail((size, size))
    tile = Image.new("RGB", (size, size), (235, 235, 235))
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def save_contact_sheet(hits: Sequence, path: str | Path, query_image: Optional[ImageInput] = None,
                       query_text: str = "", columns: int = 5, thumb: int = 160) -> Path:
    """Draw ``hits`` (objects with ``.path`` and ``.score``) in a grid under a header with the query; save as PNG.
    A hit whose file can no longer be read is drawn as a grey tile saying so."""
    label_h = 18
    header_h = (thumb + label_h + 8) if query_image is not None else (28 if query_text else 0)
    rows = max(1, -(-len(hits) // columns))
    sheet = Image.new("RGB", (columns * (thumb + 8) + 8, header_h + rows * (thumb + label_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    if query_image is not None:
        sheet.paste(_thumbnail(load_image(query_image), thumb), (8, 8))
        draw.text((16 + thumb, 12), "query image", fill="black")
    elif query_text:
        draw.text((8, 8), f"query: {query_text}"[:150], fill="black")
    for n, hit in enumerate(hits):
        x = 8 + (n % columns) * (thumb + 8)
        y = header_h + 8 + (n // columns) * (thumb + label_h + 8)
        try:
            tile = _thumbnail(load_image(hit.path), thumb)
        except ImageError:
            tile = Image.new("RGB", (thumb, thumb), (200, 200, 200))
            ImageDraw.Draw(tile).text((8, thumb // 2), "unreadable", fill="black")
        sheet.paste(tile, (x, y))
        draw.text((x, y + thumb + 2), f"#{n + 1}  {hit.score:.3f}  {Path(hit.path).name}"[:28], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
