"""What the load benchmark (``benchmarks/load.py``) shares with the modules below it (the baselines,
perf_analyzer): the pool of encoded sample-photo variants the requests send and the progress line."""

from __future__ import annotations

import sys
import time

from mofserve.core.samples import sample_photos

from .frontend import VARIANT_SEED, make_variant, variant_params


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
