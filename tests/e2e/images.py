"""Images the e2e tests send: a drawn card the MMVP-style questions ask about, and fresh noise
that no earlier request can have put in the encoders' feature cache."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def drawing(side: str = "left") -> bytes:
    """A white card with a red disc on one side and a blue bar (PNG)."""
    image = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(image)
    x = 10 if side == "left" else 56
    draw.ellipse((x, 16, x + 30, 46), fill=(220, 20, 20))
    draw.rectangle((0, 56, 95, 63), fill=(20, 20, 200))
    return png(image)


def fresh_image() -> bytes:
    """Random pixels drawn now: no earlier request (in this session or any) has cached them."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    return png(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)))
