"""Coverage-guided fuzzing (atheris / libFuzzer) of the image decoding path.

    python tests/fuzz/fuzz_decode.py [libFuzzer flags] [corpus dir]     # make fuzz: a longer run

Each input goes through ``core.preprocessing.preprocess_bytes`` (decode with the limits checked
from the header, EXIF, colour conversion, resize, normalise), the path every image a client sends
takes inside Triton's ``preprocess`` model. The harness fails on anything but pixels or an
:class:`ImageError` naming ``image:``, and on any pixel decode larger than the pixel limit (the
limit must hold before memory is spent, not only in the result). Pillow's Python plugins are
instrumented, so libFuzzer's mutations are guided by the parser branches they reach.

Without a corpus directory, the seeds of ``seeds.py`` (real photos in every format) are written
to ``$MOFSERVE_HOME/fuzz/decode`` (git-ignored) and that directory is the corpus, growing from
run to run. ``tests/fuzz/test_fuzz_decode.py`` runs a bounded, seeded run of this file in
``make test``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import atheris
import numpy  # noqa: F401 - imported uninstrumented: its start-up is slow instrumented, and not under test

with atheris.instrument_imports(include=["PIL", "mofserve.core.preprocessing"]):
    # Pillow imports its format plugins lazily, on the first open(): import the ones mofserve
    # accepts here, so that their parsers are instrumented too.
    import PIL.BmpImagePlugin
    import PIL.GifImagePlugin
    import PIL.Image
    import PIL.ImageFile
    import PIL.ImageOps
    import PIL.JpegImagePlugin
    import PIL.MpoImagePlugin
    import PIL.PngImagePlugin
    import PIL.TiffImagePlugin
    import PIL.WebPImagePlugin

    from mofserve.core.preprocessing import ImageError, ImageLimits, preprocess_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` as a package, for the seeds
from tests.fuzz.seeds import write_corpus

#: Small enough that a header lying about its size is refused quickly, large enough for real crops.
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1_000_000, max_aspect_ratio=50.0)
IMAGE_SIZE = 16
_decoded_sizes: list[tuple[int, int]] = []
_load = PIL.ImageFile.ImageFile.load


def _recording_load(self):
    """Pillow's own ``load``, noting the size of every pixel decode (the memory it is about to use)."""
    _decoded_sizes.append(self.size)
    return _load(self)


PIL.ImageFile.ImageFile.load = _recording_load


def test_one_input(data: bytes) -> None:
    _decoded_sizes.clear()
    try:
        pixels = preprocess_bytes(data, IMAGE_SIZE, limits=LIMITS)
    except ImageError as error:
        message = str(error)
        if not message.startswith("image: ") or error.code not in ("invalid", "too_large"):
            raise AssertionError(f"ImageError without the field or a known code: {error.code} {message!r}") from None
    else:
        if pixels.shape != (3, IMAGE_SIZE, IMAGE_SIZE) or pixels.dtype.name != "float32":
            raise AssertionError(f"unexpected pixels {pixels.shape} {pixels.dtype}")
    for width, height in _decoded_sizes:
        if width * height > LIMITS.max_pixels:
            raise AssertionError(f"decoded {width}x{height} pixels, over max_pixels={LIMITS.max_pixels}")


def main(argv: list[str]) -> None:
    # Pillow warns about odd files (bad EXIF tags, huge claimed sizes); the module decides on its own.
    warnings.simplefilter("ignore")
    flags = [a for a in argv[1:] if a.startswith("-")]
    corpora = [a for a in argv[1:] if not a.startswith("-")]
    if not corpora:
        home = Path(os.environ.get("MOFSERVE_HOME", Path.home() / ".mofserve"))
        corpus = home / "fuzz" / "decode"
        write_corpus(corpus)
        corpora = [str(corpus)]
    atheris.Setup([argv[0], *flags, *corpora], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
