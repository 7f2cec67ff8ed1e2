"""Image decoding and preprocessing: the one home of "encoded bytes -> pixel tensor".

Untrusted encoded bytes (JPEG, PNG, WebP, GIF, BMP, TIFF) become the float32 ``[3, S, S]``
tensor both vision encoders read (``core.tensors.PIXEL_VALUES``). Everything here is numpy +
Pillow: it runs inside the Triton python-backend ``preprocess`` model and in benchmarks, and
never needs torch.

Two aspect policies:

* ``"crop"`` reproduces ``transformers.CLIPImageProcessorPil`` (what ``CLIPImageProcessor()``
  resolves to without torchvision) with ``size={"shortest_edge": S}`` and
  ``crop_size={"height": S, "width": S}`` bit for bit: RGB conversion (transparency composited
  onto white), the shortest side resized to ``S`` with Pillow's bicubic filter and the other side
  *truncated* (``int(S * long / short)``), a centre crop whose offsets round down
  (``(H - S) // 2``), ``x * (1/255)`` in float64 cast to float32, then ``(x - mean) / std`` in
  float32.
* ``"pad"`` is LLaVA-1.5's ``expand2square`` (the shorter side padded to a square with the
  background ``tuple(int(m * 255) for m in mean)``, the image pasted at offset
  ``(long - short) // 2``) followed by the same steps, so the crop is a no-op.

Failures on bad input are always :class:`ImageError` (``ValueError``) whose message starts with
``image:`` and names the limit or the problem; ``code`` tells a server which status to answer
("invalid": gRPC INVALID_ARGUMENT / HTTP 400, "too_large": RESOURCE_EXHAUSTED / HTTP 413).
Programming errors in the arguments (``aspect``, ``image_size``, ``mean``/``std``) are plain
``ValueError`` naming the argument.

Speed, measured for ``preprocess_bytes(..., image_size=336)`` on the dev machine (2-core AMD
EPYC VM, Pillow 13.0, numpy 1.26; median of 15-40 runs; quality-90 JPEGs of a mosaic of
scikit-image photos, so they hold real detail):

* 640x480 JPEG: 5.8 ms (decode ~1 ms, bicubic resize to 448x336 ~4 ms, crop + normalise
  <1 ms). ``open + CLIPImageProcessorPil`` takes 8 ms. ``draft()`` cannot apply: 1/2 scale
  would leave the short side under 336.
* 4000x3000 JPEG: 150 ms (decode ~60 ms, resize ~75 ms); the processor takes 300 ms. With
  ``Image.draft("RGB", (448, 336))`` libjpeg decodes at 1/8 scale (500x375) in the DCT domain
  and the whole call takes 25 ms, but the tensor differs from the processor's by up to 0.725
  in normalised units (~48/255), mean 0.016, with 17% of the values off by more than one grey
  level: DCT downscaling is not Pillow's antialiased bicubic. That breaks parity, so
  :func:`decode_image` never calls ``draft()``. Resizing only the crop window
  (``resize(box=...)``) was also measured and rejected: Pillow takes the box as C floats and
  290 of 300 random sizes differed, by up to 23 grey levels.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .profiles import CLIP_MEAN, CLIP_STD

__all__ = [
    "ASPECTS",
    "DEFAULT_LIMITS",
    "SUPPORTED_FORMATS",
    "ImageDecodeError",
    "ImageError",
    "ImageLimits",
    "ImageTooLargeError",
    "decode_image",
    "image_error_code",
    "preprocess",
    "preprocess_batch",
    "preprocess_bytes",
    "to_rgb",
]

FIELD = "image"

# Pillow format ids tried by ``Image.open``, in order. JPEGs with a Multi-Picture index (many
# phone photos) come back from the JPEG factory as format "MPO"; that is still a JPEG.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_NAMES = "JPEG/PNG/WebP/GIF/BMP/TIFF"

ASPECTS = ("crop", "pad")


# --------------------------------------------------------------------------------------------
# Limits and errors


@dataclass(frozen=True)
class ImageLimits:
    """What an untrusted image may cost before it is refused.

    ``max_pixels`` (width * height) is checked from the header, before any pixel is decoded, so
    a small file claiming a huge size (a decompression bomb) costs nothing. ``max_aspect_ratio``
    refuses strips such as 1x10000, which would be upscaled into absurd tensors.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 50.0
    min_side: int = 1

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "min_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        ratio = self.max_aspect_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio >= 1.0:
            raise ValueError(f"max_aspect_ratio: must be a number >= 1, got {ratio!r}")


DEFAULT_LIMITS = ImageLimits()


class ImageError(ValueError):
    """An image that cannot be turned into pixels. ``str(err)`` starts with ``image:``.

    ``field`` is the request field at fault; ``code`` is ``"invalid"`` (bad request: gRPC
    INVALID_ARGUMENT, HTTP 400) or ``"too_large"`` (gRPC RESOURCE_EXHAUSTED, HTTP 413).
    """

    code = "invalid"

    def __init__(self, message: str, field: str = FIELD) -> None:
        super().__init__(message)
        self.field = field


class ImageDecodeError(ImageError):
    """Empty, truncated, corrupt, non-image or unsupported bytes; an unusable size or shape."""

    code = "invalid"


class ImageTooLargeError(ImageError):
    """Over ``max_bytes`` or ``max_pixels`` (or Pillow's own decompression-bomb limit)."""

    code = "too_large"


# --------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes | bytearray | memoryview, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode untrusted encoded bytes into an RGB ``PIL.Image`` (mode ``"RGB"``, loaded).

    Accepts JPEG, PNG, WebP, GIF (first frame), BMP and TIFF (first page). The EXIF orientation
    is applied, so the model sees the photo upright as people do; neither CLIPImageProcessor
    nor LLaVA's ``Image.open`` does this, so for a rotated photo (orientation 2-8) the result
    differs from ``processor(Image.open(data))`` by exactly that transposition. Any colour
    mode becomes RGB through :func:`to_rgb`. Truncated files are refused
    (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone, i.e. False). Every failure raises an
    :class:`ImageError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageDecodeError(f"{FIELD}: expected encoded image bytes, got {type(data).__name__}")
    num_bytes = memoryview(data).nbytes
    if num_bytes == 0:
        raise ImageDecodeError(f"{FIELD}: empty (0 bytes); expected a {_FORMAT_NAMES} image")
    if num_bytes > limits.max_bytes:
        raise ImageTooLargeError(
            f"{FIELD}: {num_bytes} bytes exceeds the limit of {limits.max_bytes} bytes (max_bytes)"
        )

    sniffed = _sniff_format(bytes(memoryview(data)[:16]))
    fmt = sniffed or "image"
    try:
        # Image.open reads the header only; nothing the size of the pixels is allocated yet.
        im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        fmt = im.format or fmt
        _check_size(im.size, limits)
        # No im.draft() for JPEGs: 6x faster on big photos but breaks parity (module docstring).
        im.load()  # decodes the first frame / page only
        _apply_exif_orientation(im)
        return to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if sniffed is None:
            raise ImageDecodeError(f"{FIELD}: cannot decode (not a {_FORMAT_NAMES} image)") from None
        raise ImageDecodeError(
            f"{FIELD}: cannot decode {sniffed} data (corrupt header or unsupported {sniffed} variant)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check runs inside Image.open, before ours, and has no size attribute.
        # The warning is an exception here only under ``-W error``; without it, Pillow prints
        # the warning and _check_size refuses the image anyway (see _check_size).
        raise ImageTooLargeError(_bomb_message(str(exc), limits)) from None
    except MemoryError:
        raise ImageTooLargeError(f"{FIELD}: out of memory while decoding {fmt} data") from None
    except Exception as exc:
        # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        # on malformed data. Bad input must never escape as anything but an ImageError.
        detail = str(exc) or type(exc).__name__
        raise ImageDecodeError(f"{FIELD}: cannot decode {fmt} data (truncated or corrupt: {detail})") from exc


def _apply_exif_orientation(im: Image.Image) -> None:
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except MemoryError:
        raise
    except Exception:
        # A malformed EXIF block must not cost the user their image: decode it unrotated, as
        # browsers do. (The transposition itself cannot fail half-way: Pillow swaps im and
        # size together after reading the tag.)
        pass


def _sniff_format(prefix: bytes) -> str | None:
    """Which supported format the magic bytes claim, to word errors; Pillow decides the rest."""
    if prefix.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if prefix.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":
        return "WebP"
    if prefix[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if prefix.startswith(b"BM"):
        return "BMP"
    if prefix[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageTooLargeError(
            f"{FIELD}: {width}x{height} = {pixels} pixels exceeds the limit of {limits.max_pixels} pixels (max_pixels)"
        )
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None and pixels > pillow_limit:
        # Only reachable when max_pixels is configured above Pillow's limit: Pillow has then
        # already warned (DecompressionBombWarning); refuse rather than let it through.
        raise ImageTooLargeError(
            f"{FIELD}: {width}x{height} = {pixels} pixels exceeds Pillow's decompression-bomb limit "
            f"of {pillow_limit} pixels (PIL.Image.MAX_IMAGE_PIXELS; max_pixels is {limits.max_pixels})"
        )
    if min(width, height) < limits.min_side:
        raise ImageDecodeError(f"{FIELD}: {width}x{height} has a side shorter than {limits.min_side} pixels (min_side)")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageDecodeError(
            f"{FIELD}: {width}x{height} has an aspect ratio of {ratio:.1f}:1, which exceeds the limit "
            f"of {limits.max_aspect_ratio:g}:1 (max_aspect_ratio)"
        )


# What every ImageTooLargeError message says, and no other: the limit it exceeds (see the raises).
_TOO_LARGE_MARKERS = ("(max_bytes)", "(max_pixels)", "; max_pixels is ", f"{FIELD}: out of memory while ")


def image_error_code(message: str) -> str:
    """The ``code`` ("invalid" or "too_large") of the :class:`ImageError` whose text is ``message``.

    Only an error's text crosses Triton (the ``preprocess`` model answers INVALID_ARG for both
    kinds), so the front-end recovers the status from it here, next to the messages it reads:
    the too-large ones name ``max_bytes`` or ``max_pixels`` as the limit exceeded or say the
    decoder ran out of memory. A refusal for any other limit (``max_aspect_ratio``,
    ``min_side``) or a corrupt file is "invalid", whatever Pillow's detail says.
    """
    if message.startswith(f"{FIELD}: cannot decode"):
        return ImageDecodeError.code
    if any(marker in message for marker in _TOO_LARGE_MARKERS):
        return ImageTooLargeError.code
    return ImageDecodeError.code


def _bomb_message(detail: str, limits: ImageLimits) -> str:
    match = re.search(r"\((\d+) pixels\)", detail)
    if match is None:
        return f"{FIELD}: refused by Pillow's decompression-bomb check ({detail}) (max_pixels)"
    pixels = int(match.group(1))
    if pixels > limits.max_pixels:
        return (
            f"{FIELD}: {pixels} pixels exceeds the limit of {limits.max_pixels} pixels (max_pixels); "
            "refused from the header"
        )
    return (
        f"{FIELD}: {pixels} pixels exceeds Pillow's decompression-bomb limit "
        f"(PIL.Image.MAX_IMAGE_PIXELS; max_pixels is {limits.max_pixels})"
    )


# Modes whose samples do not fit 8 bits. ``convert("RGB")`` clips them at 255, which turns a
# mid-grey 16-bit image white; they are rescaled to 8 bits instead.
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to ``"RGB"`` the way CLIPImageProcessor's ``do_convert_rgb`` does.

    * An image with an alpha band (``RGBA``, ``LA``, ``PA``) or a ``transparency`` entry (``P``
      or ``L``/``RGB`` with a tRNS colour key, transparent GIFs) is composited onto a white
      background. This is what transformers 5.x's ``convert_to_rgb`` does (older releases, and
      LLaVA's own ``Image.open(...).convert("RGB")``, dropped alpha and showed whatever colour
      sat under transparent pixels, often black).
    * 16-bit and 32-bit integer modes (``I;16*``, ``I``) are scaled from 0..65535 to 0..255
      (rounded; ``I`` values outside 0..65535 are clipped) instead of Pillow's clip at 255.
      ``F`` (float) is taken as 0..1 when all values lie in [0, 1], else as 0..255 (clipped),
      the rule transformers uses for float arrays; NaN becomes 0. Transparency on these modes
      is ignored. CLIPImageProcessor itself clips these modes, so they are the one documented
      difference from it.
    * Every other mode (``L``, ``P``, ``1``, ``CMYK``, ``YCbCr``, ...) uses ``convert("RGB")``.
      ICC profiles are not applied (neither does CLIPImageProcessor).
    """
    mode = image.mode
    try:
        if mode in _HIGH_BIT_MODES:
            return _high_bit_to_l(image).convert("RGB")
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        if mode == "RGB":
            return image
        return image.convert("RGB")
    except ValueError as exc:  # e.g. HSV: Pillow has no direct conversion
        raise ImageDecodeError(f"{FIELD}: unsupported colour mode {mode!r} ({exc})") from None


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        eight_bit = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        wide = np.clip(values.astype(np.int64), 0, 65535)
        eight_bit = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    return Image.fromarray(np.ascontiguousarray(eight_bit))


# --------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(
    image: Image.Image,
    image_size: int,
    aspect: str = "crop",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """A decoded image as the float32 ``[3, image_size, image_size]`` tensor the encoders read.

    ``image`` is any loaded ``PIL.Image`` (non-RGB modes go through :func:`to_rgb`);
    ``aspect`` is ``"crop"`` (CLIPImageProcessor) or ``"pad"`` (LLaVA-1.5 ``expand2square``).
    """
    size, aspect, norm = _checked(image_size, aspect, mean, std)
    return _preprocess_rgb(to_rgb(image), size, aspect, norm)


def preprocess_bytes(
    data: bytes | bytearray | memoryview,
    image_size: int,
    aspect: str = "crop",
    limits: ImageLimits = DEFAULT_LIMITS,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """:func:`decode_image` then :func:`preprocess`; bad bytes raise :class:`ImageError`."""
    size, aspect, norm = _checked(image_size, aspect, mean, std)
    return _preprocess_rgb(decode_image(data, limits), size, aspect, norm)


def preprocess_batch(
    items: Sequence[bytes | bytearray | memoryview],
    image_size: int,
    aspect: str = "crop",
    limits: ImageLimits = DEFAULT_LIMITS,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> list[np.ndarray | ImageError]:
    """:func:`preprocess_bytes` over a dynamic batch, one outcome per item, in order.

    Each entry is either the ``[3, S, S]`` array or the :class:`ImageError` that item raised,
    so one bad image fails only its own request. Invalid arguments (``aspect``, ``image_size``,
    ``mean``/``std``) are the caller's bug and raise ``ValueError`` before any item is read.
    """
    size, aspect, norm = _checked(image_size, aspect, mean, std)
    results: list[np.ndarray | ImageError] = []
    for data in items:
        try:
            results.append(_preprocess_rgb(decode_image(data, limits), size, aspect, norm))
        except ImageError as exc:
            results.append(exc)
    return results


def _preprocess_rgb(image: Image.Image, size: int, aspect: str, norm: _Normaliser) -> np.ndarray:
    if aspect == "pad":
        image = _expand_to_square(image, norm.background)
    width, height = image.size
    # transformers.image_transforms.get_resize_output_image_size(default_to_square=False): the
    # short side becomes `size`, the long side int(size * long / short) (truncated, not rounded).
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    try:
        # PilBackend.resize -> image_transforms.resize: PIL bicubic, reducing_gap=None.
        resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        pixels = np.asarray(resized)
    except MemoryError:
        raise ImageTooLargeError(f"{FIELD}: out of memory while resizing {width}x{height}") from None
    # image_transforms.center_crop: offsets round down.
    top = (new_height - size) // 2
    left = (new_width - size) // 2
    crop = pixels[top : top + size, left : left + size]
    out = np.empty((3, size, size), dtype=np.float32)
    for channel in range(3):
        np.take(norm.lut[channel], crop[:, :, channel], out=out[channel])
    return out


def _expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``expand2square`` (llava/mm_utils.py), verbatim in behaviour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    if width > height:
        result.paste(image, (0, (width - height) // 2))
    else:
        result.paste(image, ((height - width) // 2, 0))
    return result


@dataclass(frozen=True, eq=False)
class _Normaliser:
    """Per-(mean, std) constants: the uint8 -> float32 table and the ``pad`` background."""

    lut: np.ndarray  # [3, 256] float32
    background: tuple[int, int, int]


@lru_cache(maxsize=16)
def _normaliser(mean: tuple[float, float, float], std: tuple[float, float, float]) -> _Normaliser:
    """The ``[3, 256]`` table maps a uint8 value to its normalised value, per channel.

    It is bit-identical to transformers' ``rescale`` (uint8 -> float64, ``* (1/255)``,
    -> float32) followed by ``normalize`` (``(x - mean) / std`` in float32), because it applies
    the same elementwise operations to each of the 256 possible inputs. The background is
    expand2square's ``tuple(int(x * 255) for x in image_processor.image_mean)``.
    """
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    lut = (scaled[None, :] - mean32) / std32
    lut.flags.writeable = False
    background = (int(mean[0] * 255), int(mean[1] * 255), int(mean[2] * 255))
    return _Normaliser(lut=lut, background=background)


def _checked(image_size: int, aspect: str, mean: Sequence[float], std: Sequence[float]) -> tuple[int, str, _Normaliser]:
    size = _check_image_size(image_size)
    aspect = _check_aspect(aspect)
    return size, aspect, _normaliser(_check_stats("mean", mean), _check_stats("std", std))


def _check_stats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    try:
        stats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected 3 numbers, got {values!r}") from None
    if len(stats) != 3 or not all(math.isfinite(v) for v in stats):
        raise ValueError(f"{name}: expected 3 finite numbers, got {values!r}")
    if name == "std" and any(v == 0.0 for v in stats):
        raise ValueError(f"std: must not contain 0, got {values!r}")
    return stats  # type: ignore[return-value]


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ValueError(f"image_size: expected a positive integer, got {image_size!r}")
    return int(image_size)


def _check_aspect(aspect: str) -> str:
    if aspect not in ASPECTS:
        raise ValueError(f"aspect: unknown aspect policy {aspect!r}; expected one of {', '.join(ASPECTS)}")
    return aspect
