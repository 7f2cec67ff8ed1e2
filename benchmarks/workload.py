"""The workload every benchmark sends: one MMVP-style question and options, a fixed answer length,
and deterministic image variants (crops, flips, colour jitter of the scikit-image sample photos).

Every timed request sends an image never seen before, because the encoders cache features per
image: a repeated image would skip them and measure the cache, not the model (the load benchmark,
perf_analyzer and the baselines all draw from ``ImagePool``; the front-end benchmark checks that its
variants differ after preprocessing, which is what the cache keys on). Variants are the same for
the same index and seed on any machine, so two runs send the same images. ``Progress`` is the one
status line of a long benchmark.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mofserve.core.samples import sample_photos

QUESTION = "Is the dog facing left or right?"
OPTIONS = "(a) Left (b) Right"
MAX_NEW_TOKENS = 8
VARIANT_SEED = 20261126


@dataclass(frozen=True)
class VariantParams:
    """One deterministic variant of a sample photo: a crop (fractions of the photo), an optional
    horizontal flip and a colour jitter (PIL ImageEnhance factors; 1.0 leaves the photo as it is)."""

    photo: int  # index into the photos
    left: float
    top: float
    width: float  # fraction of the photo's width
    height: float
    flip: bool
    brightness: float
    contrast: float
    saturation: float


def variant_params(index: int, photos: int, seed: int = VARIANT_SEED) -> VariantParams:
    """Parameters of variant ``index`` (the same for the same index and seed, on any machine)."""
    if photos < 1 or index < 0:
        raise ValueError(f"variant_params: need photos >= 1 and index >= 0, got {photos}, {index}")
    rng = np.random.default_rng([seed, index])
    width, height = (float(v) for v in rng.uniform(0.55, 0.95, size=2))
    left = float(rng.uniform(0.0, 1.0 - width))
    top = float(rng.uniform(0.0, 1.0 - height))
    brightness, contrast, saturation = (float(v) for v in rng.uniform(0.8, 1.2, size=3))
    return VariantParams(index % photos, left, top, width, height, bool((index // photos) % 2), brightness,
                         contrast, saturation)


def make_variant(photo: bytes, params: VariantParams, fmt: str = "JPEG") -> bytes:
    """The encoded bytes of ``photo`` cropped, flipped and colour-jittered as ``params`` says."""
    from PIL import Image, ImageEnhance

    with Image.open(io.BytesIO(photo)) as opened:
        image = opened.convert("RGB")
    w, h = image.size
    box = (round(params.left * w), round(params.top * h), round((params.left + params.width) * w),
           round((params.top + params.height) * h))
    image = image.crop(box)
    if params.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(params.brightness)
    image = ImageEnhance.Contrast(image).enhance(params.contrast)
    image = ImageEnhance.Color(image).enhance(params.saturation)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def distinct_variants(photos: Sequence[bytes], count: int, key: Callable[[bytes], bytes] | None = None,
                      seed: int = VARIANT_SEED) -> list[bytes]:
    """``count`` variants whose ``key`` (default: the bytes themselves; the benchmark uses the digest
    of the preprocessed pixels, which is what the encoders' feature cache keys on) all differ."""
    key = key or (lambda data: data)
    out: list[bytes] = []
    seen: set[bytes] = set()
    index = 0
    while len(out) < count:
        if index > 4 * count + 100:
            raise RuntimeError(f"distinct_variants: only {len(out)} distinct variants in {index} tries")
        data = make_variant(photos[index % len(photos)], variant_params(index, len(photos), seed))
        index += 1
        k = key(data)
        if k not in seen:
            seen.add(k)
            out.append(data)
    return out


class ImagePool:
    """Encoded JPEG variants of the sample photos, made on demand (never during a timed phase)."""

    def __init__(self, seed: int | None = None) -> None:
        self.photos = sample_photos()
        self.seed = VARIANT_SEED if seed is None else seed
        self.images: list[bytes] = []

    def ensure(self, count: int) -> None:
        while len(self.images) < count:
            i = len(self.images)
            self.images.append(make_variant(self.photos[i % len(self.photos)],
                                            variant_params(i, len(self.photos), self.seed)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> bytes:
        return self.images[index]


class Progress:
    """One status line on stderr: rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self, enabled: bool, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0

    def show(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self.stream.flush()
        elif final or now - self._last >= 5.0:
            self._last = now
            print(text, file=self.stream, flush=True)
