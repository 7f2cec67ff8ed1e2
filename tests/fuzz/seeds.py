"""Seed inputs for fuzzing image decoding: small crops of scikit-image's real photos in every
format and colour mode ``core.preprocessing`` accepts (and a few it refuses), so that mutations
start from real file structure (headers, EXIF, palettes, compression) rather than noise.

Shared by the atheris harness (``fuzz_decode.py``) and the hypothesis properties
(``tests/unit/test_request_properties.py``). Built in memory, never committed.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
import skimage
from PIL import Image

DATA = Path(skimage.data_dir)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _crop(name: str, size: tuple[int, int] = (40, 28)) -> Image.Image:
    with Image.open(DATA / name) as photo:
        return photo.convert("RGB").resize(size, Image.Resampling.BICUBIC)


@cache
def seed_images() -> dict[str, bytes]:
    """Name -> encoded bytes, each a few hundred bytes to a few kB (fast to decode, many mutations/s)."""
    cat, rocket = _crop("chelsea.png"), _crop("rocket.jpg", (28, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    wide = (np.asarray(cat.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    with Image.open(DATA / "no_time_for_that_tiny.gif") as gif:
        frames = []
        for index in range(min(3, gif.n_frames)):
            gif.seek(index)
            frames.append(gif.convert("RGB").resize((32, 24)).convert("P", palette=Image.Palette.ADAPTIVE))
    return {
        "jpeg": encode(cat, "JPEG", quality=85),
        "jpeg-progressive": encode(rocket, "JPEG", quality=85, progressive=True),
        "jpeg-exif-rotated": encode(cat, "JPEG", quality=85, exif=exif.tobytes()),
        "jpeg-cmyk": encode(cat.convert("CMYK"), "JPEG", quality=85),
        "jpeg-grey": encode(cat.convert("L"), "JPEG", quality=85),
        "png": encode(cat, "PNG"),
        "png-rgba": encode(rocket.convert("RGBA"), "PNG"),
        "png-16bit": encode(Image.fromarray(wide), "PNG"),
        "png-palette-transparency": encode(palette, "PNG", transparency=3),
        "png-1bit": encode(cat.convert("1"), "PNG"),
        "gif-animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "webp": encode(cat, "WEBP", quality=80),
        "webp-lossless": encode(rocket, "WEBP", lossless=True),
        "bmp": encode(cat, "BMP"),
        "bmp-palette": encode(palette, "BMP"),
        "tiff": encode(cat, "TIFF"),
        "tiff-lzw": encode(rocket, "TIFF", compression="tiff_lzw"),
        "tiff-16bit": encode(Image.fromarray(wide), "TIFF"),
        "ico-refused": encode(cat, "ICO"),
    }


def write_corpus(directory: Path) -> int:
    """Writes the seeds into ``directory`` (a libFuzzer corpus); returns how many it wrote."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seed_images().items():
        (directory / f"seed-{name}").write_bytes(data)
    return len(seed_images())
