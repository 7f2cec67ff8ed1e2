"""CLIP-blind pair mining without a server: the blockwise search on embeddings whose cosines are
known by construction, FAISS vs numpy, block-size invariance, the embedding cache's rules, the
input listing, the contact sheet, and the whole run against a fake async client."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw

from mofserve.cli import build_parser
from mofserve.clients import MofServeError, Provenance, ServerInfo
from mofserve.evaluation import mining, pair_search
from mofserve.evaluation.contact_sheet import sheet_layout, write_contact_sheet
from mofserve.evaluation.embedding_cache import (
    INDEX,
    META,
    CacheLockedError,
    EmbeddingCache,
    FileStamp,
    model_key,
    sha256,
)
from mofserve.evaluation.image_embedding import collect_images
from mofserve.evaluation.pair_search import PairRow, find_pairs

BACKENDS = ["faiss", "numpy"]
KEY = model_key("tiny", {"clip_vision": "c1", "dinov2_vision": "d1", "llava": "l1"}, True)

# ---- embeddings with exact cosines ----------------------------------------------------------------
# 16-dim vectors with entries +-0.25 have norm exactly 1 and pairwise cosines 1 - k/8 exactly
# (k = entries whose sign differs), all representable in float32: thresholds can be hit exactly.


def signed(flips: int, dim: int = 16) -> np.ndarray:
    v = np.full(dim, 0.25, np.float32)
    v[:flips] = -0.25
    return v


def axis(k: int, dim: int = 16) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[k] = 1.0
    return v


def pairs_of(result) -> set[tuple[int, int]]:
    return set(zip(result.i.tolist(), result.j.tolist(), strict=True))


def brute_force(clip, dino, t_clip, t_dino) -> set[tuple[int, int]]:
    c = clip.astype(np.float64) @ clip.astype(np.float64).T
    d = dino.astype(np.float64) @ dino.astype(np.float64).T
    i, j = np.nonzero(np.triu((c > t_clip) & (d < t_dino), k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_images_are_clip_candidates_but_not_clip_blind_at_the_paper_thresholds(backend):
    clip = np.stack([signed(0), signed(0), axis(0)])
    dino = np.stack([signed(0), signed(0), axis(1)])
    paper = find_pairs(clip, dino, 0.95, 0.6, backend=backend)
    assert paper.candidates == 1 and paper.found == 0 and not pairs_of(paper)
    everything = find_pairs(clip, dino, 0.95, 1.01, backend=backend)
    assert pairs_of(everything) == {(0, 1)}
    assert everything.clip[0] == pytest.approx(1.0, abs=1e-12) and everything.dino[0] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_identical_in_clip_and_different_in_dinov2_is_a_clip_blind_pair(backend):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(64).astype(np.float32)
    near = base + 1e-3 * rng.standard_normal(64).astype(np.float32)
    unrelated = rng.standard_normal((4, 64)).astype(np.float32)
    clip = np.stack([base, near, *unrelated])
    clip /= np.linalg.norm(clip, axis=1, keepdims=True)
    dino = np.eye(6, 32, dtype=np.float32)  # every DINOv2 pair orthogonal: cosine 0
    result = find_pairs(clip, dino, backend=backend)
    assert pairs_of(result) == {(0, 1)}
    assert result.clip[0] > 0.999 and result.dino[0] == 0.0 and result.candidates == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_orthogonal_and_unrelated_vectors_give_no_pairs(backend):
    clip = np.eye(8, 16, dtype=np.float32)
    dino = np.eye(8, 16, dtype=np.float32)
    result = find_pairs(clip, dino, 0.0, 1.0, backend=backend)  # cosine 0 is not > 0
    assert result.candidates == 0 and not pairs_of(result)
    assert pairs_of(find_pairs(clip, dino, -0.001, 1.0, backend=backend)) == {(i, j) for i in range(8)
                                                                             for j in range(i + 1, 8)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_thresholds_are_strict_clip_greater_and_dinov2_less(backend):
    clip = np.stack([signed(0), signed(2)])  # CLIP cosine exactly 0.75
    dino = np.stack([signed(0), signed(4)])  # DINOv2 cosine exactly 0.5
    at_clip = find_pairs(clip, dino, 0.75, 0.9, backend=backend)
    assert at_clip.candidates == 0 and not pairs_of(at_clip)  # 0.75 is not > 0.75
    below = find_pairs(clip, dino, np.nextafter(0.75, 0), 0.9, backend=backend)
    assert pairs_of(below) == {(0, 1)} and below.clip[0] == 0.75 and below.dino[0] == 0.5
    at_dino = find_pairs(clip, dino, 0.7, 0.5, backend=backend)
    assert at_dino.candidates == 1 and at_dino.found == 0  # 0.5 is not < 0.5
    assert pairs_of(find_pairs(clip, dino, 0.7, np.nextafter(0.5, 1), backend=backend)) == {(0, 1)}


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    """Clusters in CLIP (many pairs above 0.9) with other clusters in DINOv2 (some below 0.6)."""
    return clustered(500, 24, 12, 0.25, 1), clustered(500, 32, 40, 0.6, 2)


def test_faiss_and_numpy_find_the_same_pairs_as_brute_force(corpus):
    clip, dino = corpus
    want = brute_force(clip, dino, 0.9, 0.6)
    assert len(want) > 100  # the construction gives plenty of pairs
    faiss_result = find_pairs(clip, dino, 0.9, 0.6, backend="faiss")
    numpy_result = find_pairs(clip, dino, 0.9, 0.6, backend="numpy")
    assert pairs_of(faiss_result) == pairs_of(numpy_result) == want
    for name in ("i", "j", "clip", "dino"):
        np.testing.assert_array_equal(getattr(faiss_result, name), getattr(numpy_result, name))
    assert faiss_result.candidates == numpy_result.candidates and faiss_result.backend == "faiss"


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_size_does_not_change_the_result(corpus, backend):
    clip, dino = corpus
    reference = find_pairs(clip, dino, 0.9, 0.6, block=4096, backend=backend)
    for block in (7, 64, 499, 500):
        result = find_pairs(clip, dino, 0.9, 0.6, block=block, backend=backend)
        assert result.tiles == sum(range(1, -(-500 // block) + 1))
        for name in ("i", "j", "clip", "dino"):
            np.testing.assert_array_equal(getattr(result, name), getattr(reference, name))
        assert result.candidates == reference.candidates and result.found == reference.found


def test_pairs_are_sorted_by_gap_and_a_cap_keeps_the_largest_gaps(corpus):
    clip, dino = corpus
    full = find_pairs(clip, dino, 0.9, 0.6)
    gaps = full.gap
    assert np.all(np.diff(gaps) <= 0) and np.all(full.i < full.j)
    capped = find_pairs(clip, dino, 0.9, 0.6, block=50, max_pairs=10)
    assert capped.truncated and capped.found == full.found and len(capped.i) == 10
    np.testing.assert_array_equal(capped.i, full.i[:10])
    np.testing.assert_array_equal(capped.j, full.j[:10])


@pytest.mark.parametrize("k", [0, 1, 7, 50])
def test_a_cap_applied_while_searching_keeps_exactly_the_top_pairs_ties_included(monkeypatch, k):
    # 40 copies of one CLIP vector; DINOv2 vectors with 0, 4 or 8 flipped signs give cosines
    # 1, 0.5 and 0 exactly, so the gaps take few values and many pairs tie
    clip = np.stack([signed(0)] * 40)
    dino = np.stack([signed((4 * k) % 12) for k in range(40)])
    full = find_pairs(clip, dino, 0.9, 0.75, block=40)
    assert full.found > 300 and len(set(full.gap.tolist())) == 2
    monkeypatch.setattr(pair_search, "_PRUNE_SLACK", 0)  # cut back the buffer as often as possible
    capped = find_pairs(clip, dino, 0.9, 0.75, block=3, max_pairs=k)
    assert capped.found == full.found and capped.truncated and len(capped.i) == k
    for name in ("i", "j", "clip", "dino"):
        np.testing.assert_array_equal(getattr(capped, name), getattr(full, name)[:k])


def test_fewer_than_two_images_and_bad_arguments():
    assert find_pairs(np.zeros((0, 4), np.float32), np.zeros((0, 5), np.float32)).found == 0
    assert find_pairs(signed(0)[None], signed(0)[None]).found == 0
    with pytest.raises(ValueError, match="block"):
        find_pairs(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), block=0)
    with pytest.raises(ValueError, match="rows"):
        find_pairs(np.eye(2, dtype=np.float32), np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="backend"):
        find_pairs(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), backend="gpu")


# ---- the embedding cache --------------------------------------------------------------------------


def image_file(folder: Path, name: str, colour=(200, 30, 30), size=(40, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", size, colour).save(path)
    return path


def never_read() -> bytes:
    raise AssertionError("the cache read a file it should have trusted by size and mtime")


def store(cache: EmbeddingCache, paths: list[Path], seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    items = [(p, FileStamp.of(p), sha256(p.read_bytes())) for p in paths]
    return cache.put(items, rng.standard_normal((len(paths), 6)), rng.standard_normal((len(paths), 5)))


def test_cache_hits_by_size_and_mtime_across_reopen_and_stores_unit_rows(tmp_path):
    a, b = image_file(tmp_path / "img", "a.png"), image_file(tmp_path / "img", "b.png", (1, 2, 3))
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        assert store(cache, [a, b]) == [0, 1]
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        assert cache.invalidated is None
        assert cache.lookup(a, FileStamp.of(a), never_read) == 0
        assert cache.lookup(b, FileStamp.of(b), never_read) == 1
        clip, dino = cache.gather(np.array([0, 1]))
        np.testing.assert_allclose(np.linalg.norm(clip, axis=1), 1, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(dino, axis=1), 1, atol=1e-6)
        assert cache.lookup(tmp_path / "img" / "c.png", FileStamp(1, 1), never_read) is None


@pytest.mark.parametrize("change", ["clip_vision", "dinov2_vision", "profile", "random_weights"])
def test_cache_is_emptied_when_the_encoders_change(tmp_path, change):
    a = image_file(tmp_path / "img", "a.png")
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        store(cache, [a])
    versions = {"clip_vision": "c1", "dinov2_vision": "d1", "llava": "l1"}
    profile, random_weights = "tiny", True
    if change == "profile":
        profile = "paper"
    elif change == "random_weights":
        random_weights = False
    else:
        versions[change] = "other"
    with EmbeddingCache(tmp_path / "cache", model_key(profile, versions, random_weights)) as cache:
        assert cache.invalidated and "model changed" in cache.invalidated
        assert cache.lookup(a, FileStamp.of(a), never_read) is None and cache.count == 0
        assert not (tmp_path / "cache" / INDEX).exists()


def test_cache_survives_a_new_language_model_or_text_tower(tmp_path):
    a = image_file(tmp_path / "img", "a.png")
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        store(cache, [a])
    key = model_key("tiny", {"clip_vision": "c1", "dinov2_vision": "d1", "llava": "l2", "clip_text": "t9"}, True)
    assert key == KEY
    with EmbeddingCache(tmp_path / "cache", key) as cache:
        assert cache.invalidated is None and cache.lookup(a, FileStamp.of(a), never_read) == 0


def test_cache_format_change_or_corrupt_meta_empties_it(tmp_path):
    a = image_file(tmp_path / "img", "a.png")
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        store(cache, [a])
    meta = json.loads((tmp_path / "cache" / META).read_text())
    (tmp_path / "cache" / META).write_text(json.dumps({**meta, "format": 0}))
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        assert "format" in cache.invalidated and cache.lookup(a, FileStamp.of(a), never_read) is None
        store(cache, [a])
    (tmp_path / "cache" / META).write_text("{not json")
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        assert "meta.json" in cache.invalidated and cache.count == 0


def test_cache_touched_file_with_same_content_hits_after_a_hash_check(tmp_path):
    a = image_file(tmp_path / "img", "a.png")
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        store(cache, [a])
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    reads = []
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        assert cache.lookup(a, FileStamp.of(a), lambda: reads.append(1) or a.read_bytes()) == 0
        assert reads == [1]
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:  # the new mtime was recorded
        assert cache.lookup(a, FileStamp.of(a), never_read) == 0


def test_cache_changed_content_is_a_miss(tmp_path):
    a = image_file(tmp_path / "img", "a.png", (10, 10, 10))
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        store(cache, [a])
    before = a.stat()
    image_file(tmp_path / "img", "a.png", (10, 10, 11))  # same size, other pixels
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    assert a.stat().st_size == before.st_size
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        assert cache.lookup(a, FileStamp.of(a), a.read_bytes) is None
        assert cache.lookup(a, FileStamp(before.st_size + 1, before.st_mtime_ns), never_read) is None  # size: no read
        assert store(cache, [a]) == [1]  # a new row; the old one stays unused
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        assert cache.lookup(a, FileStamp.of(a), never_read) == 1


def test_cache_of_an_interrupted_run_keeps_complete_rows_and_ignores_a_torn_line(tmp_path):
    paths = [image_file(tmp_path / "img", f"{k}.png", (k, k, k)) for k in range(3)]
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        cache.reserve(10)
        store(cache, paths[:2])
        assert cache.capacity >= 10
    with open(tmp_path / "cache" / INDEX, "a") as f:
        f.write('{"path": "' + str(paths[2]) + '", "size": 1')  # the process died mid-line
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        assert cache.invalidated is None and cache.count == 2
        assert [cache.lookup(p, FileStamp.of(p), never_read) for p in paths] == [0, 1, None]


def test_cache_grows_keeping_its_rows(tmp_path):
    paths = [image_file(tmp_path / "img", f"{k}.png", (k, 0, 0)) for k in range(5)]
    with EmbeddingCache(tmp_path / "cache", KEY) as cache:
        store(cache, paths[:2], seed=1)
        first = [np.array(a) for a in cache.gather(np.array([0, 1]))]
        cache.reserve(3)
        assert cache.capacity >= 5
        store(cache, paths[2:], seed=2)
        again = cache.gather(np.array([0, 1]))
        for x, y in zip(first, again, strict=True):
            np.testing.assert_array_equal(x, y)


def test_cache_is_held_by_one_run_at_a_time(tmp_path):
    with EmbeddingCache(tmp_path / "cache", KEY), pytest.raises(CacheLockedError, match="in use"):
        EmbeddingCache(tmp_path / "cache", KEY)
    with EmbeddingCache(tmp_path / "cache", KEY):  # released on close
        pass


# ---- input ----------------------------------------------------------------------------------------


def test_a_folder_is_searched_recursively_by_image_suffix(tmp_path):
    image_file(tmp_path / "imgs", "b.png")
    image_file(tmp_path / "imgs" / "sub", "a.JPG")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    refs, failures = collect_images(tmp_path / "imgs")
    assert [Path(r.display).name for r in refs] == ["b.png", "a.JPG"]  # sorted by path: imgs/b < imgs/sub/a
    assert not failures and all(r.path.is_absolute() and r.path.is_file() for r in refs)


def test_missing_and_empty_inputs_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        collect_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        collect_images(tmp_path / "empty")
    (tmp_path / "list.txt").write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="names no image"):
        collect_images(tmp_path / "list.txt")


def test_a_list_file_reports_missing_duplicate_and_non_file_entries(tmp_path):
    a = image_file(tmp_path / "imgs", "a.png")
    (tmp_path / "imgs" / "dir.png").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text(f"imgs/a.png\n{a}\n# a comment\nimgs/missing.png\nimgs/dir.png\n")
    refs, failures = collect_images(listing)
    assert [r.path for r in refs] == [a] and refs[0].display == "imgs/a.png"
    reasons = {f.path: (f.stage, f.reason) for f in failures}
    assert reasons[str(a)][0] == "list" and "duplicate of line 1" in reasons[str(a)][1]
    assert reasons["imgs/missing.png"][0] == "list" and reasons["imgs/missing.png"][1].startswith("missing")
    assert "not a file" in reasons["imgs/dir.png"][1]


# ---- contact sheet ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 6])
def test_contact_sheet_has_one_tile_per_pair(tmp_path, n):
    files = [image_file(tmp_path / "img", f"{k}.png", (40 * k % 256, 90, 200)) for k in range(n + 1)]
    pairs = [PairRow(str(files[k]), str(files[k + 1]), 0.97, 0.3 - k / 100, files[k], files[k + 1]) for k in range(n)]
    if n:
        pairs[0] = PairRow("gone.png", str(files[1]), 0.99, 0.1, tmp_path / "gone.png", files[1])  # unreadable
    layout = write_contact_sheet(tmp_path / "sheet.png", pairs, "title", note="seeded random weights", thumb=64,
                                 columns=3)
    assert layout == sheet_layout(n, 64, 3) and layout.tiles == n
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == layout.size and sheet.format == "PNG"
    tile_w, tile_h = layout.tile_size
    header = layout.size[1] - layout.rows * tile_h
    for slot in range(layout.rows * layout.columns):  # a drawn border where a tile is, white elsewhere
        x, y = (slot % layout.columns) * tile_w + tile_w // 2, header + (slot // layout.columns) * tile_h + 2
        assert sheet.getpixel((x, y)) == ((200, 200, 200) if slot < n else (255, 255, 255))


# ---- the whole run against a fake server ------------------------------------------------------------------


class FakeResult:
    def __init__(self, clip, dino):
        self.clip, self.dinov2 = clip, dino


class FakeClient:
    """Embeds an image as (mean colour, 1) for CLIP and its 2x2 thumbnail for DINOv2; refuses
    images whose bytes contain b"REFUSE"; fails with UNAVAILABLE after ``fail_after`` calls."""

    calls = 0
    fail_after: int | None = None
    max_embed_images = 4

    def __init__(self, target, timeout):
        self.target = target

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def server_info(self, timeout=None):
        return ServerInfo("0.1.0", ["clip"], "interleaved", None,
                          {"max_image_bytes": 1 << 20, "max_embed_images": self.max_embed_images,
                           "max_message_bytes": 2 << 20},
                          Provenance("fake", True, "fake notice", {"clip_vision": "1", "dinov2_vision": "1"}))

    async def embed(self, images, timeout=None):
        type(self).calls += 1
        if self.fail_after is not None and type(self).calls > self.fail_after:
            raise MofServeError(grpc.StatusCode.UNAVAILABLE, "triton: down")
        assert len(images) <= self.max_embed_images
        if any(b"REFUSE" in image for image in images):
            raise MofServeError(grpc.StatusCode.INVALID_ARGUMENT, "images[0]: refused")
        clip, dino = [], []
        for data in images:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            pixels = np.asarray(image, np.float64) / 255
            clip.append([*pixels.mean(axis=(0, 1)), 1.0])
            dino.append(np.asarray(image.resize((2, 2)), np.float64).reshape(-1) - 127.5)
        return FakeResult(np.array(clip, np.float32), np.array(dino, np.float32))


def fake(fail_after=None):
    FakeClient.calls = 0
    FakeClient.fail_after = fail_after
    return FakeClient


def drawn(folder: Path, name: str, colour, dot=None) -> Path:
    image = Image.new("RGB", (32, 32), colour)
    if dot:
        ImageDraw.Draw(image).rectangle(dot, fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    return folder / name


@pytest.fixture
def folder(tmp_path):
    imgs = tmp_path / "imgs"
    drawn(imgs, "red.png", (200, 20, 20))
    drawn(imgs, "red_copy.png", (200, 20, 20))
    # same mean colour as "split" below, but a different layout: CLIP (mean) same, DINOv2 (layout) not
    left = Image.new("RGB", (32, 32), (0, 0, 0))
    ImageDraw.Draw(left).rectangle((0, 0, 15, 31), fill=(255, 255, 255))
    left.save(imgs / "left.png")
    left.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(imgs / "right.png")
    drawn(imgs / "sub", "blue.png", (20, 20, 200))
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (imgs / "refused.bmp").write_bytes(_bmp_with_marker())
    return imgs


def _bmp_with_marker() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="BMP")
    return buffer.getvalue() + b"REFUSE"  # trailing bytes: Pillow still decodes it


def run(folder: Path, out: Path, client, **kw) -> mining.MineReport:
    options = mining.MineOptions(images=folder, out=out, progress=False, **kw)
    return mining.mine(options, client_factory=client)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mine_writes_pairs_failures_summary_and_sheet(folder, tmp_path):
    report = run(folder, tmp_path / "out", fake(), batch=3, dino_threshold=0.6, clip_threshold=0.95)
    out = tmp_path / "out"
    pairs = read_csv(out / "pairs.csv")
    assert [(Path(p["path_a"]).name, Path(p["path_b"]).name) for p in pairs] == [("left.png", "right.png")]
    assert float(pairs[0]["clip_cosine"]) > 0.999 and float(pairs[0]["dino_cosine"]) < 0
    failed = {Path(r["path"]).name: r for r in read_csv(out / "failed.csv")}
    assert failed["broken.png"]["stage"] == "decode" and "cannot decode" in failed["broken.png"]["reason"]
    assert failed["refused.bmp"]["stage"] == "server" and failed["refused.bmp"]["reason"].startswith(
        "INVALID_ARGUMENT: images[0]: refused")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == {"source": str(folder), "usable": 5, "from_cache": 0, "embedded_now": 5,
                                 "failed": 2, "failed_by_stage": {"decode": 1, "server": 1}}
    assert summary["pairs"]["clip_blind"] == 1 and summary["thresholds"]["clip_cosine_gt"] == 0.95
    assert summary["server"]["random_weights"] and "not meaningful" in summary["random_weights_note"]
    assert summary["contact_sheet"]["tiles"] == 1 and Image.open(out / "contact_sheet.png").size == tuple(
        summary["contact_sheet"]["size"])
    assert report.exit_code == 0


def test_mine_rerun_with_other_thresholds_embeds_nothing_and_finds_identical_copies(folder, tmp_path):
    run(folder, tmp_path / "out", fake(), batch=4)
    client = fake()
    report = run(folder, tmp_path / "out", client, dino_threshold=1.01)
    embed_calls_for_the_refused_image = 1  # refusals are not cached: the refused one is asked again
    assert client.calls == embed_calls_for_the_refused_image
    assert report.summary["images"]["from_cache"] == 5 and report.summary["images"]["embedded_now"] == 0
    names = {(Path(p.path_a).name, Path(p.path_b).name) for p in report.pairs}
    assert ("red.png", "red_copy.png") in names and ("left.png", "right.png") in names


def test_mine_interrupted_by_the_server_resumes_where_it_stopped(folder, tmp_path):
    with pytest.raises(MofServeError) as error:
        run(folder, tmp_path / "out", fake(fail_after=2), batch=2, concurrency=1)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    # calls 1 and 2 ([left], [red, red_copy]) were stored before the server went away
    report = run(folder, tmp_path / "out", fake(), batch=2, concurrency=1)
    assert report.summary["images"]["from_cache"] == 3 and report.summary["images"]["embedded_now"] == 2


def test_mine_with_nothing_usable_writes_failures_and_exits_1(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"nope")
    report = run(tmp_path / "imgs", tmp_path / "out", fake())
    assert report.exit_code == 1 and [f.stage for f in report.failures] == ["decode"]
    assert read_csv(tmp_path / "out" / "pairs.csv") == []
    listing = tmp_path / "list.txt"
    listing.write_text("gone.png\n")
    report = run(listing, tmp_path / "out2", fake())
    assert report.exit_code == 1 and [(f.path, f.stage) for f in report.failures] == [("gone.png", "list")]
    assert FakeClient.calls == 0


def test_mine_cli_parses_every_flag_and_reports_bad_input_as_exit_2(tmp_path, capsys):
    args = build_parser().parse_args(["mine", "--images", "x", "--server", "h:1", "--clip-threshold", "0.9",
                                      "--dino-threshold", "0.5", "--out", "o", "--batch", "8", "--concurrency", "3",
                                      "--top", "5", "--block", "128", "--backend", "numpy", "--quiet"])
    options = mining.options_from_args(args)
    assert (options.server, options.clip_threshold, options.dino_threshold, options.batch, options.concurrency,
            options.top, options.block, options.backend, options.progress) == \
        ("h:1", 0.9, 0.5, 8, 3, 5, 128, "numpy", False)
    from mofserve.cli import main

    assert main(["mine", "--images", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["mine", "--images", str(tmp_path), "--batch", "0", "--quiet"]) == 2
