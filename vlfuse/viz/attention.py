"""Pictures: per-word attention maps over an image (PIL only, no plotting library needed)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.images import ImageInput, load_image


def _heat(att: np.ndarray, size: int) -> Image.Image:
    a = att - att.min()
    a = a / max(a.max(), 1e-9)
    small = Image.fromarray((a * 255).astype(np.uint8))
    big = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    rgb = np.stack([big, 0.3 * big, 1.0 - big], -1)  # blue (low) -> red (high)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def save_attention_figure(image: ImageInput, words: List[str], attention: torch.Tensor, path: str | Path,
                          tile: int = 160, per_row: int = 5) -> Path:
    """Write a sheet: the photo, then one tile per generated word with its attention (h, w) overlaid."""
    base = load_image(image).resize((tile, tile), Image.Resampling.BICUBIC)
    tiles = [(base, "(image)")]
    for word, att in zip(words, attention.float().numpy()):
        tiles.append((Image.blend(base, _heat(att, tile), 0.5), word))
    rows = (len(tiles) + per_row - 1) // per_row
    sheet = Image.new("RGB", (per_row * tile, rows * (tile + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(tiles):
        x, y = (i % per_row) * tile, (i // per_row) * (tile + 18)
        sheet.paste(img, (x, y))
        draw.text((x + 4, y + tile + 3), label, fill="black")
    path = Path(path)
    sheet.save(path)
    return path
