"""Real photos with a known source, for parity checks, demos and benchmarks.

They come from scikit-image's wheel (``skimage/data``), so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "motorcycle_right.png")


def sample_photo_paths(names: tuple[str, ...] = SAMPLE_PHOTOS) -> list[Path]:
    import skimage

    root = Path(skimage.data_dir)
    paths = [root / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample photos missing from scikit-image's data folder: {missing}")
    return paths


def sample_photos(names: tuple[str, ...] = SAMPLE_PHOTOS) -> list[bytes]:
    """Encoded bytes of real photos (PNG/JPEG), in a fixed order."""
    return [p.read_bytes() for p in sample_photo_paths(names)]
