"""core.preprocessing: parity with CLIPImageProcessor / LLaVA, every input format and mode, and
the refusals of untrusted bytes.

Parity tolerance is **exact** (``assert_array_equal``): the module applies the processor's
operations in the same order and the same dtypes (PIL bicubic on uint8, ``int()``-truncated
long side, floor-rounded crop offsets, float64 rescale cast to float32, float32 normalise), so
there is nothing to tolerate. The one documented difference is 16-bit/32-bit/float modes, which
the processor clips at 255 (``convert("RGB")``) and the module rescales.
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import skimage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from transformers import CLIPImageProcessorPil

from mofserve.core import preprocessing
from mofserve.core.preprocessing import (
    DEFAULT_LIMITS,
    ImageDecodeError,
    ImageError,
    ImageLimits,
    ImageTooLargeError,
    decode_image,
    preprocess,
    preprocess_batch,
    preprocess_bytes,
    to_rgb,
)
from mofserve.core.profiles import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

DATA = Path(skimage.data_dir)
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "motorcycle_left.png"]
SIZES = [224, 336]


# --------------------------------------------------------------------------------------------
# References


@cache
def _processor(size: int, mean=CLIP_MEAN, std=CLIP_STD) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


def _clip_reference(image: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    return _processor(size, tuple(mean), tuple(std))(image, return_tensors="np")["pixel_values"][0]


def _expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """LLaVA-1.5 ``llava/mm_utils.py::expand2square``, verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _llava_reference(image: Image.Image, size: int) -> np.ndarray:
    """LLaVA-1.5's ``image_aspect_ratio == "pad"`` path: convert, expand2square, processor."""
    processor = _processor(size)
    background = tuple(int(x * 255) for x in processor.image_mean)
    return _clip_reference(_expand2square(image.convert("RGB"), background), size)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _random_rgba(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))


def _photo(name: str) -> Image.Image:
    return _open((DATA / name).read_bytes())


def _assert_pixels(array: np.ndarray, size: int) -> None:
    assert array.dtype == np.float32
    assert array.shape == (3, size, size)
    assert np.isfinite(array).all()


# --------------------------------------------------------------------------------------------
# Parity: "crop" is CLIPImageProcessor, "pad" is LLaVA-1.5


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", PHOTOS)
def test_crop_matches_clip_image_processor_on_real_photos(name, size):
    data = (DATA / name).read_bytes()
    expected = _clip_reference(_open(data), size)
    np.testing.assert_array_equal(preprocess(_open(data), size), expected)
    np.testing.assert_array_equal(preprocess_bytes(data, size), expected)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "width,height",
    [(1, 1), (3, 500), (500, 3), (501, 333), (333, 501), (224, 224), (336, 336), (225, 224), (335, 337), (7, 3)],
)
def test_crop_matches_clip_image_processor_on_odd_sizes(width, height, size):
    image = _random_rgb(width, height, seed=width * 1000 + height)
    np.testing.assert_array_equal(preprocess(image, size), _clip_reference(image, size))


def _modes() -> dict[str, Image.Image]:
    rgb = _random_rgb(61, 37, seed=1)
    rgba = _random_rgba(61, 37, seed=2)
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 7
    rgb_colour_key = rgb.copy()
    rgb_colour_key.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])
    return {
        "L": rgb.convert("L"),
        "LA": rgba.convert("LA"),
        "P": rgb.convert("P"),
        "P+transparency": palette_transparent,
        "PA": rgba.convert("PA"),
        "RGBA": rgba,
        "RGB+colour-key": rgb_colour_key,
        "1": rgb.convert("1"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_crop_matches_clip_image_processor_in_every_8bit_mode(mode):
    """Transparency is composited onto white, as transformers 5.x's ``convert_to_rgb`` does."""
    image = _modes()[mode]
    np.testing.assert_array_equal(preprocess(image, 224), _clip_reference(image, 224))


def test_crop_matches_clip_image_processor_with_imagenet_statistics():
    image = _photo("coffee.png")
    expected = _clip_reference(image, 224, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_array_equal(preprocess(image, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD), expected)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["chelsea.png", "rocket.jpg", "camera.png", "motorcycle_left.png"])
def test_pad_matches_llava_expand2square_on_real_photos(name, size):
    data = (DATA / name).read_bytes()
    expected = _llava_reference(_open(data), size)
    np.testing.assert_array_equal(preprocess(_open(data), size, aspect="pad"), expected)
    np.testing.assert_array_equal(preprocess_bytes(data, size, aspect="pad"), expected)


@pytest.mark.parametrize("width,height", [(1, 1), (3, 500), (500, 3), (501, 333), (333, 501), (8, 5)])
def test_pad_matches_llava_expand2square_on_odd_sizes(width, height):
    image = _random_rgb(width, height, seed=width + height)
    np.testing.assert_array_equal(preprocess(image, 224, aspect="pad"), _llava_reference(image, 224))


def test_pad_fills_the_short_side_with_the_mean_colour():
    out = preprocess(_random_rgb(400, 100), 224, aspect="pad")
    background = [int(m * 255) for m in CLIP_MEAN]  # (122, 116, 104): one grey level below the mean
    expected = [
        (np.float32(b / 255) - np.float32(m)) / np.float32(s)
        for b, m, s in zip(background, CLIP_MEAN, CLIP_STD, strict=True)
    ]
    for channel in range(3):
        np.testing.assert_allclose(out[channel, :40], expected[channel], rtol=0, atol=1e-6)
        np.testing.assert_allclose(out[channel, -40:], expected[channel], rtol=0, atol=1e-6)
    assert np.abs(out[:, 100:124]).max() > 1.0  # the image itself is in the middle band


def test_large_jpeg_matches_the_processor_so_jpeg_draft_stays_off():
    """Pillow's JPEG ``draft()`` (DCT-domain downscale) would decode this at 1/4 scale and miss
    parity by up to ~50/255; the module must decode in full."""
    big = _photo("chelsea.png").resize((2048, 1536), Image.Resampling.BICUBIC)
    data = _encode(big, "JPEG", quality=90)
    np.testing.assert_array_equal(preprocess_bytes(data, 224), _clip_reference(_open(data), 224))


# --------------------------------------------------------------------------------------------
# Formats and modes from bytes


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P+transparency", "RGBA", "1"])
def test_png_in_every_mode_decodes_like_the_processor(mode):
    data = _encode(_modes()[mode], "PNG")
    assert _open(data).mode == mode.split("+")[0]
    np.testing.assert_array_equal(preprocess_bytes(data, 224), _clip_reference(_open(data), 224))


def test_transparent_pixels_become_white():
    clear_red = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    for data in (
        _encode(clear_red, "PNG"),
        _encode(palette, "PNG", transparency=0),
        _encode(palette, "GIF", transparency=0),
    ):
        np.testing.assert_array_equal(np.asarray(decode_image(data)), np.full((20, 20, 3), 255, np.uint8))


def test_cmyk_jpeg_is_converted_to_rgb():
    data = _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)
    assert _open(data).mode == "CMYK"
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    red, green, blue = np.asarray(decoded)[15, 20].astype(int)
    assert red > 240 and green < 15 and blue < 15
    np.testing.assert_array_equal(preprocess_bytes(data, 224), _clip_reference(_open(data), 224))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_mid_grey_maps_to_mid_grey_not_white(fmt):
    data = _encode(Image.fromarray(np.full((30, 40), 32768, np.uint16)), fmt)
    assert _open(data).mode == "I;16"
    decoded = np.asarray(decode_image(data))
    assert (decoded == 128).all()  # Pillow's convert("RGB") would give 255 here
    np.testing.assert_array_equal(preprocess_bytes(data, 224), preprocess(Image.new("L", (40, 30), 128), 224))


def test_16bit_full_range_keeps_its_contrast():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None, :].repeat(8, axis=0)  # 32:1, inside max_aspect_ratio
    decoded = np.asarray(decode_image(_encode(Image.fromarray(ramp), "PNG")))[0, :, 0]
    assert decoded[0] == 0 and decoded[-1] == 255
    assert (np.diff(decoded.astype(int)) >= 0).all()
    assert len(np.unique(decoded)) > 200


def test_other_wide_modes_are_scaled_to_8_bits():
    big_endian = Image.frombytes("I;16B", (4, 4), np.full((4, 4), 32768, ">u2").tobytes())
    int32 = Image.fromarray(np.array([[-5, 0, 32768, 65535, 10**6]], np.int32))
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32))
    byte_float = Image.fromarray(np.array([[0.0, 127.6, 255.0, 300.0]], np.float32))
    assert (np.asarray(to_rgb(big_endian)) == 128).all()
    np.testing.assert_array_equal(np.asarray(to_rgb(int32))[0, :, 0], [0, 0, 128, 255, 255])
    np.testing.assert_array_equal(np.asarray(to_rgb(unit_float))[0, :, 0], [0, 128, 255, 0])
    np.testing.assert_array_equal(np.asarray(to_rgb(byte_float))[0, :, 0], [0, 128, 255, 255])


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_one_bit_images_decode_to_black_and_white(fmt):
    bits = Image.fromarray(np.indices((10, 12)).sum(axis=0) % 2 == 0)
    data = _encode(bits, fmt)
    assert _open(data).mode == "1"
    decoded = np.asarray(decode_image(data))
    np.testing.assert_array_equal(decoded[..., 0], np.where(np.asarray(bits), 255, 0))


@pytest.mark.parametrize("fmt,kwargs", [("BMP", {}), ("TIFF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_decode_to_the_source_pixels(fmt, kwargs):
    source = _random_rgb(53, 41, seed=3)
    data = _encode(source, fmt, **kwargs)
    np.testing.assert_array_equal(np.asarray(decode_image(data)), np.asarray(source))
    np.testing.assert_array_equal(preprocess_bytes(data, 224), preprocess(source, 224))


def test_lossy_webp_decodes_like_the_processor():
    data = _encode(_photo("coffee.png"), "WEBP", quality=80)
    np.testing.assert_array_equal(preprocess_bytes(data, 336), _clip_reference(_open(data), 336))


def test_multipage_tiff_decodes_the_first_page():
    data = (DATA / "multipage.tif").read_bytes()
    tiff = Image.open(io.BytesIO(data))
    first = np.asarray(tiff.convert("RGB"))
    tiff.seek(1)
    assert (np.asarray(tiff.convert("RGB")) != first).any()
    np.testing.assert_array_equal(np.asarray(decode_image(data)), first)


def test_animated_gif_decodes_the_first_frame():
    data = (DATA / "no_time_for_that_tiny.gif").read_bytes()
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames > 1
    first = np.asarray(gif.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_image(data)), first)

    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    made = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(made)).n_frames == 2
    assert (np.asarray(decode_image(made)) == (255, 0, 0)).all()


def test_animated_webp_decodes_the_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    made = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50)
    assert Image.open(io.BytesIO(made)).n_frames == 2
    assert (np.asarray(decode_image(made)) == (255, 0, 0)).all()


@pytest.mark.parametrize(
    "orientation,transpose",
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ],
)
def test_exif_orientation_is_applied(orientation, transpose):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_random_rgb(60, 30, seed=4), "JPEG", exif=exif, quality=95)
    manual = _open(data).transpose(transpose)  # the same decoded pixels, rotated by hand
    decoded = decode_image(data)
    assert decoded.size == manual.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(manual))
    np.testing.assert_array_equal(preprocess_bytes(data, 224), preprocess(manual, 224))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_corrupt_exif_does_not_cost_the_image(monkeypatch):
    data = _encode(_random_rgb(20, 10), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\xff\xff")
    assert decode_image(data).size == (20, 10)

    def broken_exif(image, *, in_place=False):
        raise SyntaxError("not a TIFF file")  # what Pillow's EXIF parser could raise

    monkeypatch.setattr(preprocessing.ImageOps, "exif_transpose", broken_exif)
    np.testing.assert_array_equal(np.asarray(decode_image(data)), np.asarray(_open(data)))


def test_mode_pillow_cannot_convert_is_an_image_error():
    with pytest.raises(ImageDecodeError, match="image: unsupported colour mode 'La'"):
        preprocess(Image.new("La", (4, 4)), 224)


def test_decode_accepts_bytearray_and_memoryview():
    data = _encode(_random_rgb(9, 7), "PNG")
    expected = np.asarray(decode_image(data))
    np.testing.assert_array_equal(np.asarray(decode_image(bytearray(data))), expected)
    np.testing.assert_array_equal(np.asarray(decode_image(memoryview(data))), expected)


# --------------------------------------------------------------------------------------------
# Refusals


def _assert_image_error(excinfo, cls, *fragments):
    err = excinfo.value
    assert type(err) is cls
    message = str(err)
    assert message.startswith("image: ")
    assert err.field == "image"
    for fragment in fragments:
        assert fragment in message, message


def test_empty_bytes_are_a_decode_error():
    with pytest.raises(ImageError) as excinfo:
        preprocess_bytes(b"", 224)
    _assert_image_error(excinfo, ImageDecodeError, "empty")


def test_random_bytes_are_a_decode_error():
    noise = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError) as excinfo:
        preprocess_bytes(noise, 224)
    _assert_image_error(excinfo, ImageDecodeError, "cannot decode (not a JPEG/PNG/WebP/GIF/BMP/TIFF image)")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_files_are_refused(fmt, keep):
    data = _encode(_random_rgb(64, 48, seed=6), fmt)
    with pytest.raises(ImageError) as excinfo:
        decode_image(data[: int(len(data) * keep)])
    _assert_image_error(excinfo, ImageDecodeError, "cannot decode", fmt)


def _png_claiming(width: int, height: int) -> bytes:
    """A 64x48 PNG whose IHDR (with a valid CRC) claims ``width`` x ``height``."""
    data = bytearray(_encode(_random_rgb(64, 48), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture
def pixel_decodes(monkeypatch):
    """Counts pixel decodes, to prove a refusal happened from the header."""
    calls = []
    original = ImageFile.ImageFile.load

    def counting_load(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return calls


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "width,height",
    [
        (20000, 20000),  # past 2x Pillow's limit: Pillow raises DecompressionBombError in open()
        (12000, 12000),  # past Pillow's limit: Pillow warns in open(), the module refuses
        (7000, 6000),  # under Pillow's limit, over max_pixels: the module's own check
    ],
)
def test_header_claiming_a_huge_size_is_refused_before_decoding(width, height, pixel_decodes):
    with pytest.raises(ImageError) as excinfo:
        preprocess_bytes(_png_claiming(width, height), 224)
    _assert_image_error(excinfo, ImageTooLargeError, f"{width * height} pixels", "40000000", "max_pixels")
    assert excinfo.value.code == "too_large"
    assert pixel_decodes == []


def test_pillow_decompression_bomb_warning_as_error_is_our_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError) as excinfo:
            decode_image(_png_claiming(12000, 12000))
    _assert_image_error(excinfo, ImageTooLargeError, "144000000 pixels", "max_pixels")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_limit_still_applies_when_max_pixels_is_raised_above_it():
    limits = ImageLimits(max_pixels=10**9)
    with pytest.raises(ImageTooLargeError) as excinfo:
        decode_image(_png_claiming(12000, 12000), limits)
    _assert_image_error(excinfo, ImageTooLargeError, "MAX_IMAGE_PIXELS")


def test_max_pixels_is_checked_exactly():
    data = _encode(_random_rgb(64, 48), "PNG")
    assert decode_image(data, ImageLimits(max_pixels=64 * 48)).size == (64, 48)
    with pytest.raises(ImageError) as excinfo:
        decode_image(data, ImageLimits(max_pixels=64 * 48 - 1))
    _assert_image_error(
        excinfo, ImageTooLargeError, "image: 64x48 = 3072 pixels exceeds the limit of 3071 pixels (max_pixels)"
    )


def test_bytes_over_max_bytes_are_refused_before_parsing(pixel_decodes):
    data = b"\x89PNG\r\n\x1a\n" + bytes(DEFAULT_LIMITS.max_bytes)
    with pytest.raises(ImageError) as excinfo:
        preprocess_bytes(data, 224)
    _assert_image_error(
        excinfo, ImageTooLargeError, f"image: {len(data)} bytes exceeds the limit of 20971520 bytes (max_bytes)"
    )
    png = _encode(_random_rgb(64, 48), "PNG")
    with pytest.raises(ImageTooLargeError, match="max_bytes"):
        decode_image(png, ImageLimits(max_bytes=len(png) - 1))
    assert pixel_decodes == []
    assert decode_image(png, ImageLimits(max_bytes=len(png))).size == (64, 48)


@pytest.mark.parametrize("width,height", [(1, 10000), (10000, 1), (2, 101)])
def test_thin_strips_are_refused_naming_max_aspect_ratio(width, height):
    with pytest.raises(ImageError) as excinfo:
        preprocess_bytes(_encode(Image.new("L", (width, height)), "PNG"), 224)
    _assert_image_error(excinfo, ImageDecodeError, f"{width}x{height}", "max_aspect_ratio")
    assert excinfo.value.code == "invalid"


def test_aspect_ratio_at_the_limit_is_accepted():
    _assert_pixels(preprocess_bytes(_encode(Image.new("L", (1, 50)), "PNG"), 336), 336)


def test_min_side_is_enforced():
    data = _encode(_random_rgb(8, 5), "PNG")
    with pytest.raises(ImageDecodeError, match=r"image: 8x5 .*min_side"):
        decode_image(data, ImageLimits(min_side=6))


@pytest.mark.parametrize("fmt", ["ICO", "PDF", "TGA", "PPM"])
def test_unsupported_formats_are_refused(fmt):
    with pytest.raises(ImageError) as excinfo:
        preprocess_bytes(_encode(_random_rgb(32, 32), fmt), 224)
    _assert_image_error(excinfo, ImageDecodeError, "not a JPEG/PNG/WebP/GIF/BMP/TIFF image")


def test_unreadable_variant_of_a_supported_format_names_the_format():
    """skimage's planar multipage_rgb.tif is a TIFF Pillow cannot read ("unknown pixel mode")."""
    with pytest.raises(ImageError) as excinfo:
        decode_image((DATA / "multipage_rgb.tif").read_bytes())
    _assert_image_error(excinfo, ImageDecodeError, "cannot decode TIFF data")


@pytest.mark.parametrize("value", ["image.png", None, 42, np.zeros(4, np.uint8)])
def test_non_bytes_input_is_a_decode_error(value):
    with pytest.raises(ImageDecodeError, match="image: expected encoded image bytes"):
        decode_image(value)


def test_error_classes_carry_status_codes_and_pickle():
    assert issubclass(ImageError, ValueError)
    assert ImageDecodeError("image: x").code == "invalid"
    assert ImageTooLargeError("image: x").code == "too_large"
    err = pickle.loads(pickle.dumps(ImageTooLargeError("image: 9 bytes exceeds the limit")))
    assert (type(err), str(err), err.field, err.code) == (
        ImageTooLargeError,
        "image: 9 bytes exceeds the limit",
        "image",
        "too_large",
    )


# --------------------------------------------------------------------------------------------
# Arguments and batches


@pytest.mark.parametrize("call", [preprocess_bytes, preprocess, preprocess_batch])
def test_unknown_aspect_is_a_value_error_naming_aspect(call):
    arg = {preprocess_bytes: b"", preprocess: Image.new("RGB", (4, 4)), preprocess_batch: [b""]}[call]
    with pytest.raises(ValueError, match="aspect") as excinfo:
        call(arg, 224, aspect="squash")
    assert not isinstance(excinfo.value, ImageError)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 22.4}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"std": (0.5, float("nan"), 0.5)}, "std"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(kwargs, name):
    call = {"image_size": 224, **kwargs}
    with pytest.raises(ValueError, match=name):
        preprocess(Image.new("RGB", (4, 4)), **call)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_pixels": -1}, "max_pixels"),
        ({"min_side": 0}, "min_side"),
        ({"max_aspect_ratio": 0.5}, "max_aspect_ratio"),
    ],
)
def test_image_limits_refuse_nonsense(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ImageLimits(**kwargs)


def test_batch_fails_only_the_bad_items():
    good = (DATA / "rocket.jpg").read_bytes()
    items = [good, b"", _png_claiming(20000, 20000), _encode(Image.new("L", (1, 900)), "PNG"), good]
    results = preprocess_batch(items, 224, aspect="pad")
    assert [type(r) for r in results] == [
        np.ndarray,
        ImageDecodeError,
        ImageTooLargeError,
        ImageDecodeError,
        np.ndarray,
    ]
    expected = preprocess_bytes(good, 224, aspect="pad")
    np.testing.assert_array_equal(results[0], expected)
    np.testing.assert_array_equal(results[4], expected)
    assert preprocess_batch([], 224) == []


# --------------------------------------------------------------------------------------------
# Properties: bad bytes never escape as anything but ImageError


def _outcome(data: bytes, size: int, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    try:
        out = preprocess_bytes(data, size, limits=limits)
    except ImageError as err:
        assert str(err).startswith("image: ")
        assert err.code in ("invalid", "too_large")
    else:
        _assert_pixels(out, size)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_give_pixels_or_an_image_error(data):
    _outcome(data, 32)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=4096),
    magic=st.sampled_from(
        [
            b"\xff\xd8\xff\xe0",
            b"\x89PNG\r\n\x1a\n",
            b"GIF89a",
            b"BM",
            b"II*\x00",
            b"MM\x00*",
            b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        ]
    ),
)
def test_arbitrary_bytes_behind_a_valid_magic_give_pixels_or_an_image_error(data, magic):
    _outcome(magic + data, 32)


def _seed_files() -> list[bytes]:
    image = _random_rgb(24, 16, seed=7)
    return [
        _encode(image, "JPEG", quality=80),
        _encode(image, "JPEG", quality=80, progressive=True),
        _encode(image, "PNG"),
        _encode(image.convert("P"), "GIF"),
        _encode(image, "BMP"),
        _encode(image, "TIFF"),
        _encode(image, "TIFF", compression="tiff_lzw"),
        _encode(image, "WEBP", quality=80),
        _encode(image, "WEBP", lossless=True),
        _encode(Image.fromarray(np.full((16, 24), 1000, np.uint16)), "PNG"),
    ]


SEED_FILES = _seed_files()


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEED_FILES),
    cut=st.floats(0.0, 1.0),
    edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=8),
)
def test_corrupted_real_files_give_pixels_or_an_image_error(seed, cut, edits):
    data = bytearray(seed)
    for where, value in edits:
        data[int(where * len(data))] = value
    data = data[: max(1, int(len(data) * cut))] if cut < 1.0 else data
    # A small pixel budget keeps a corrupted header claiming e.g. 30000x1000 fast to refuse.
    _outcome(bytes(data), 32, ImageLimits(max_pixels=4_000_000))


_EIGHT_BIT_MODES = ["1", "L", "LA", "P", "P+transparency", "PA", "RGB", "RGBA", "CMYK", "YCbCr"]
_WIDE_MODES = ["I;16", "I", "F"]


def _random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-1000, 70000, (height, width), dtype=np.int32))
    if mode == "F":
        values = rng.normal(0.5, 100.0, (height, width)).astype(np.float32)
        values.flat[0] = np.nan
        return Image.fromarray(values)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8)).convert(mode.split("+")[0])
    if mode == "P+transparency":
        image.info["transparency"] = int(rng.integers(0, 256))
    return image


@settings(max_examples=200, deadline=None)
@given(
    mode=st.sampled_from(_EIGHT_BIT_MODES + _WIDE_MODES),
    width=st.integers(1, 64),
    height=st.integers(1, 64),
    size=st.sampled_from([1, 14, 33, 224]),
    aspect=st.sampled_from(["crop", "pad"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_small_images_in_any_mode_give_normalised_pixels(mode, width, height, size, aspect, seed):
    image = _random_image(mode, width, height, seed)
    out = preprocess(image, size, aspect=aspect)
    _assert_pixels(out, size)
    if mode in _EIGHT_BIT_MODES:
        reference = _clip_reference(image, size) if aspect == "crop" else _llava_reference(to_rgb(image), size)
        np.testing.assert_array_equal(out, reference)
    if mode != "P+transparency":  # TIFF keeps every other mode losslessly
        limits = ImageLimits(max_aspect_ratio=64.0)
        np.testing.assert_array_equal(preprocess_bytes(_encode(image, "TIFF"), size, aspect, limits), out)


def test_module_exports_its_api():
    for name in preprocessing.__all__:
        assert hasattr(preprocessing, name)
