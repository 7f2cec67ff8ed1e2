"""The encoders' feature cache: an LRU of whole per-row outputs keyed by the content of the input
row (an image's pixel tensor, a text's token ids), and the one home of the lookup / run the
misses as one batch / fill logic that every encoder model shares (:func:`lookup_or_run`: the cpu
target's ``vision_encoder`` on numpy arrays, gpu-torch's ``torch_encoder`` on device tensors).

Why not Triton's response cache: in Triton 2.51 it keys on the request's inputs only, so a
response cached for a request that asked for one output is replayed, incomplete, to a request
that needs another; and it stores a python-backend error response as an EMPTY response that
is then replayed as a success (both seen here, see docs/architecture.md). This cache stores
every output of a successful run per row, so a hit is always whole, errors are never stored,
and a second fusion mode on an image already seen skips the encoder.

Keys: :func:`content_key` (blake2b of a numpy row's bytes) where the row is in host memory;
:class:`TensorKeys` where it is on a device (a secret-weighted exact integer hash computed there,
so that only a few bytes per row come back to the host, not the image).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# the Triton custom metric both encoder models count into (labels: model, result = hit | miss)
CACHE_METRIC = "mofserve_encoder_cache_total"
CACHE_METRIC_HELP = "encoder feature-cache lookups by result"


class CacheCounter:
    """The hit / miss counters of one model's feature cache, as Triton custom metrics
    (``mofserve_encoder_cache_total{model, result}`` on Triton's /metrics); call it with the counts
    of a batch (``lookup_or_run``'s ``counted``). ``pb_utils`` is passed in because it exists only
    inside a Triton Python stub; the family is kept on the counter because it must outlive its
    metrics."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        self.family = pb_utils.MetricFamily(name=CACHE_METRIC, description=CACHE_METRIC_HELP,
                                            kind=pb_utils.MetricFamily.COUNTER)
        self.hits = self.family.Metric(labels={"model": model, "result": "hit"})
        self.misses = self.family.Metric(labels={"model": model, "result": "miss"})

    def __call__(self, hits: int, misses: int) -> None:
        self.hits.increment(hits)
        self.misses.increment(misses)


def content_key(row: np.ndarray) -> bytes:
    """Digest of one input row: dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{row.dtype.str}{row.shape}".encode())
    h.update(np.ascontiguousarray(row).data)
    return h.digest()


class TensorKeys:
    """Content keys of a batch's rows, computed on the device that holds the batch.

    Each row is read as 16-bit words ``v_j`` (an exact, injective view of its bytes) and hashed into
    ``L`` lanes ``h_l = sum_j w_lj * v_j`` with secret random integer weights ``0 <= w < 2^b``, as
    one fp64 matrix product. ``b`` is chosen so that every partial sum is an integer below 2^53:
    the product is exact whatever the summation order (so keys are deterministic on any device
    and library), and two different rows collide in one lane only if ``sum_j w_j (v_j - v'_j) = 0``,
    which for a fixed pair holds for at most one value of any weight whose word differs: probability
    <= 2^-b per lane, <= 2^-(b L) <= 2^-128 over the lanes (the weights come from the OS's random
    source per process and never leave it). Only the ``L`` lanes per row (64 bytes) are copied to
    the host; the weights (``words x L`` fp64, 43 MB for a 336 px fp32 image) stay on the device.
    """

    BITS = 128  # lanes x bits per lane, at least

    def __init__(self, seed: int | None = None) -> None:
        self._seed = secrets.randbits(63) if seed is None else seed
        self._weights: dict[tuple[str, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    @staticmethod
    def lanes(words: int) -> tuple[int, int]:
        """``(bits per weight, lanes)`` for rows of ``words`` 16-bit words: ``|v| <= 2^16``,
        ``w < 2^b`` and ``words`` terms keep every sum below 2^52."""
        bits = min(24, 52 - 16 - max(1, math.ceil(math.log2(words))))
        if bits < 8:
            raise ValueError(f"feature cache: rows of {words} 16-bit words are too long to hash exactly")
        return bits, math.ceil(TensorKeys.BITS / bits)

    def _weights_for(self, device: torch.device, words: int) -> torch.Tensor:
        import torch

        key = (str(device), words)
        with self._lock:
            weights = self._weights.get(key)
            if weights is None:
                bits, lanes = self.lanes(words)
                generator = torch.Generator().manual_seed(self._seed + words)
                weights = torch.randint(0, 1 << bits, (words, lanes), generator=generator, dtype=torch.float64)
                self._weights[key] = weights = weights.to(device)
            return weights

    def __call__(self, batch: torch.Tensor) -> list[bytes]:
        import torch

        rows = int(batch.shape[0])
        flat = batch.contiguous().reshape(rows, -1)
        words = flat.view(torch.int16) if flat.element_size() % 2 == 0 else flat.view(torch.uint8)
        weights = self._weights_for(batch.device, words.shape[1])
        lanes = (words.to(torch.float64) @ weights).to(torch.int64).cpu().numpy()  # the one copy back: [rows, L]
        prefix = f"{batch.dtype}{tuple(batch.shape[1:])}".encode()
        return [prefix + row.tobytes() for row in lanes]


def _nbytes(value: Any) -> int:
    return int(value.nbytes)


def _copy(value: Any) -> Any:
    """A compact copy where the value lives: ``clone`` for a torch tensor (device memory stays on
    the device), ``np.array`` for numpy."""
    clone = getattr(value, "clone", None)
    return clone() if clone is not None else np.array(value, copy=True)


class FeatureCache:
    """Bounded by bytes; ``max_bytes == 0`` disables it. Values are numpy arrays or torch tensors
    (kept where they are: a device tensor's bytes count against the bound in device memory)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: Hashable, outputs: Mapping[str, Any]) -> None:
        size = sum(_nbytes(a) for a in outputs.values())
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = {k: _copy(v) for k, v in outputs.items()}
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= sum(_nbytes(a) for a in old.values())
                self.evictions += 1


@dataclass(frozen=True)
class CachedRows:
    """What :func:`lookup_or_run` hands back for one batch of rows."""

    outputs: list[dict[str, Any]]  # every output of each row, in row order (cached entries: do not modify)
    elapsed_ms: list[float]  # per row: the batch's lookup, plus for a row that was run the run's wall time
    runs: int  # rows given to ``run`` (the misses, a repeated row once): the metric's misses

    @property
    def hits(self) -> int:
        """Rows answered without running them: cached, or a repeat of a row in the same batch."""
        return len(self.outputs) - self.runs


def lookup_or_run(cache: FeatureCache, count: int, keys: Callable[[], Sequence[Hashable]],
                  run: Callable[[list[int]], Mapping[str, Any]],
                  counted: Callable[[int, int], None] | None = None) -> CachedRows:
    """Answer ``count`` rows from the cache where it can, and run the others as ONE batch.

    ``keys()`` gives one content key per row (called only when the cache is on); ``run(rows)``
    computes the outputs of those row indices as one batch and returns each output batched along
    axis 0 in that order (``numpy`` or ``torch``). The same key twice in one batch (the modes of a
    Compare) runs once. ``counted(hits, runs)`` is told the lookup's result before the run (so a
    batch whose run fails still counts its misses). An exception from ``keys`` or ``run`` propagates
    and nothing is stored: failures are never cached. A row's outputs are views of the run's batch
    or of the cached entry.
    """
    started = time.perf_counter()
    row_keys: list[Hashable | None] = list(keys()) if cache.max_bytes else [None] * count
    if len(row_keys) != count:
        raise ValueError(f"feature cache: {len(row_keys)} keys for {count} rows")
    found: list[dict[str, Any] | None] = [cache.get(k) if k is not None else None for k in row_keys]
    lookup_ms = (time.perf_counter() - started) * 1e3
    elapsed = [lookup_ms] * count
    slots: dict[Hashable, int] = {}
    representatives: list[int] = []
    for i, entry in enumerate(found):
        if entry is None:
            key = row_keys[i] if row_keys[i] is not None else ("row", i)
            if key not in slots:
                slots[key] = len(representatives)
                representatives.append(i)
    if counted is not None:
        counted(count - len(representatives), len(representatives))
    if representatives:
        started = time.perf_counter()
        outputs = run(representatives)
        run_ms = (time.perf_counter() - started) * 1e3
        for i, entry in enumerate(found):
            if entry is not None:
                continue
            key = row_keys[i]
            slot = slots[key if key is not None else ("row", i)]
            found[i] = {name: batch[slot] for name, batch in outputs.items()}
            elapsed[i] += run_ms
            if key is not None:
                cache.put(key, found[i])
    return CachedRows([f for f in found if f is not None], elapsed, len(representatives))
