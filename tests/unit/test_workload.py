"""The benchmarks' workload: deterministic image variants of the sample photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mofserve.benchmarks import workload as bench


def _photo(width: int = 96, height: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_variant_params_are_deterministic_and_in_range():
    a = [bench.variant_params(i, 6) for i in range(40)]
    assert a == [bench.variant_params(i, 6) for i in range(40)]
    assert a != [bench.variant_params(i, 6, seed=1) for i in range(40)]
    for i, p in enumerate(a):
        assert p.photo == i % 6
        assert p.flip == bool((i // 6) % 2)
        assert p.left >= 0 and p.left + p.width <= 1 and p.top >= 0 and p.top + p.height <= 1
        assert 0.55 <= p.width <= 0.95 and 0.55 <= p.height <= 0.95
        assert all(0.8 <= f <= 1.2 for f in (p.brightness, p.contrast, p.saturation))
    with pytest.raises(ValueError):
        bench.variant_params(-1, 6)


def test_make_variant_crops_flips_and_is_deterministic():
    photo = _photo()
    params = bench.VariantParams(0, 0.0, 0.0, 0.5, 0.5, True, 1.0, 1.0, 1.0)
    png = bench.make_variant(photo, params, fmt="PNG")
    assert png == bench.make_variant(photo, params, fmt="PNG")
    with Image.open(io.BytesIO(png)) as out:
        got = np.asarray(out.convert("RGB"))
    with Image.open(io.BytesIO(photo)) as src:
        expected = np.asarray(src.convert("RGB"))[:32, :48][:, ::-1]
    assert got.shape == (32, 48, 3)
    np.testing.assert_array_equal(got, expected)  # jitter factors of 1.0 leave the pixels alone
    jpeg = bench.make_variant(photo, bench.variant_params(3, 1))
    assert jpeg[:2] == b"\xff\xd8"


def test_distinct_variants_are_distinct_and_reproducible():
    photos = [_photo(), _photo(80, 80)]
    images = bench.distinct_variants(photos, 30)
    assert len(images) == 30 and len(set(images)) == 30
    assert images == bench.distinct_variants(photos, 30)


def test_distinct_variants_skip_collisions_of_the_key():
    calls = []

    def key(data: bytes) -> bytes:  # every other variant collides with the one before it
        calls.append(data)
        return str(len(calls) // 2).encode()

    images = bench.distinct_variants([_photo()], 5, key=key)
    assert len(images) == 5 and len(calls) == 8


def test_distinct_variants_give_up_when_nothing_is_distinct():
    with pytest.raises(RuntimeError, match="distinct"):
        bench.distinct_variants([_photo()], 3, key=lambda data: b"same")
