"""``contact_sheet.png`` of ``mofserve mine``: the top CLIP-blind pairs as tiles of two thumbnails
with their rank, gap, both cosines and file names, for a person to look at.

Drawing is apart from the mining because it only needs the pairs (and Pillow, imported when a
sheet is drawn); its layout is a pure function so the unit tests check it without pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mofserve.core.preprocessing import ImageError, decode_image

from .pair_search import PairRow


@dataclass(frozen=True)
class SheetLayout:
    tiles: int
    columns: int
    rows: int
    tile_size: tuple[int, int]
    size: tuple[int, int]


_PAD = 8
_LINE = 16
_CAPTION_LINES = 3
_HEADER = 2 * _LINE + 2 * _PAD


def sheet_layout(tiles: int, thumb: int = 192, columns: int = 3) -> SheetLayout:
    """Where the contact sheet puts ``tiles`` pair tiles (two thumbnails and three caption lines)."""
    tile_w = 2 * thumb + 3 * _PAD
    tile_h = thumb + 3 * _PAD + _CAPTION_LINES * _LINE
    cols = max(1, min(columns, tiles))
    rows = -(-tiles // cols) if tiles else 0
    width = max(cols * tile_w, 640)
    height = _HEADER + (rows * tile_h if tiles else 2 * _LINE + _PAD)
    return SheetLayout(tiles, cols, rows, (tile_w, tile_h), (width, height))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _thumbnail(file: Path | None, thumb: int):
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (thumb, thumb), (235, 235, 235))
    try:
        if file is None:
            raise OSError("no file")
        image = decode_image(file.read_bytes())
    except (OSError, ImageError):
        ImageDraw.Draw(canvas).text((8, thumb // 2 - 8), "unreadable", fill=(160, 0, 0), font=_font(12))
        return canvas
    image.thumbnail((thumb, thumb))
    canvas.paste(image, ((thumb - image.width) // 2, (thumb - image.height) // 2))
    return canvas


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def write_contact_sheet(path: Path, pairs: Sequence[PairRow], title: str, note: str = "", thumb: int = 192,
                        columns: int = 3) -> SheetLayout:
    """A PNG of ``pairs`` (in order) as tiles: image A | image B, then rank and gap, both cosines and
    the two names. Returns the layout (``tiles == len(pairs)``)."""
    from PIL import Image, ImageDraw

    layout = sheet_layout(len(pairs), thumb, columns)
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((_PAD, _PAD), title, fill="black", font=_font(14))
    if note:
        draw.text((_PAD, _PAD + _LINE), note, fill=(170, 0, 0), font=_font(11))
    if not pairs:
        draw.text((_PAD, _HEADER), "no CLIP-blind pairs at these thresholds", fill=(90, 90, 90), font=_font(13))
    tile_w, tile_h = layout.tile_size
    font = _font(12)
    chars = max(12, thumb // 7)
    for k, pair in enumerate(pairs):
        x0 = (k % layout.columns) * tile_w
        y0 = _HEADER + (k // layout.columns) * tile_h
        draw.rectangle((x0 + 2, y0 + 2, x0 + tile_w - 3, y0 + tile_h - 3), outline=(200, 200, 200))
        sheet.paste(_thumbnail(pair.file_a, thumb), (x0 + _PAD, y0 + _PAD))
        sheet.paste(_thumbnail(pair.file_b, thumb), (x0 + 2 * _PAD + thumb, y0 + _PAD))
        ty = y0 + 2 * _PAD + thumb
        draw.text((x0 + _PAD, ty), f"#{k + 1}  gap {pair.gap:.3f}", fill="black", font=font)
        draw.text((x0 + _PAD, ty + _LINE), f"CLIP {pair.clip_cosine:.4f}   DINOv2 {pair.dino_cosine:.4f}",
                  fill=(0, 70, 160), font=font)
        draw.text((x0 + _PAD, ty + 2 * _LINE), _fit(Path(pair.path_a).name, chars), fill=(80, 80, 80), font=font)
        draw.text((x0 + 2 * _PAD + thumb, ty + 2 * _LINE), _fit(Path(pair.path_b).name, chars), fill=(80, 80, 80),
                  font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return layout
