import numpy as np

from mofserve.core.feature_cache import FeatureCache, content_key


def _outputs(value: float) -> dict[str, np.ndarray]:
    return {"A": np.full((4, 4), value, np.float32), "B": np.full(4, value, np.float32)}  # 80 bytes


def test_key_depends_on_content_shape_and_dtype():
    row = np.zeros((3, 2, 2), np.float32)
    assert content_key(row) == content_key(row.copy())
    assert content_key(row) != content_key(row + 1e-7)
    assert content_key(row) != content_key(row.reshape(3, 4))
    assert content_key(row) != content_key(row.astype(np.float64))


def test_hit_returns_every_stored_output_and_counts():
    cache = FeatureCache(1 << 20)
    cache.put(b"k", _outputs(1.0))
    got = cache.get(b"k")
    assert set(got) == {"A", "B"} and float(got["A"][0, 0]) == 1.0
    assert cache.get(b"other") is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_least_recently_used_entries_are_evicted_to_stay_within_the_byte_bound():
    cache = FeatureCache(200)
    cache.put(b"a", _outputs(1))
    cache.put(b"b", _outputs(2))
    cache.get(b"a")
    cache.put(b"c", _outputs(3))  # 240 bytes > 200: evicts b, the least recently used
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"c") is not None
    assert cache.size_bytes <= 200 and cache.evictions == 1


def test_stored_arrays_are_copies_so_callers_cannot_corrupt_the_cache():
    cache = FeatureCache(1 << 20)
    outputs = _outputs(1.0)
    cache.put(b"k", outputs)
    outputs["A"][:] = 9
    assert float(cache.get(b"k")["A"][0, 0]) == 1.0


def test_zero_bytes_disables_storage():
    cache = FeatureCache(0)
    cache.put(b"k", _outputs(1.0))
    assert cache.get(b"k") is None and len(cache) == 0
