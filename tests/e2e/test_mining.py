"""``mofserve mine`` against a real gRPC front-end on the session's Triton (tiny profile): drawn
images with an identical copy, a copy with one pixel changed, unrelated drawings and a corrupt
file; a rerun with other thresholds is served from the embedding cache (no Embed call)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mofserve.cli import main

pytestmark = pytest.mark.integration


def drawing(kind: int) -> Image.Image:
    image = Image.new("RGB", (96, 64), [(255, 255, 255), (250, 240, 200), (20, 30, 40), (90, 160, 90)][kind])
    draw = ImageDraw.Draw(image)
    if kind == 0:
        draw.ellipse((10, 16, 40, 46), fill=(220, 20, 20))
        draw.rectangle((0, 56, 95, 63), fill=(20, 20, 200))
    elif kind == 1:
        draw.polygon([(48, 4), (90, 60), (6, 60)], fill=(30, 120, 30))
    elif kind == 2:
        for x in range(0, 96, 12):
            draw.line((x, 0, 95 - x, 63), fill=(240, 240, 0), width=3)
    else:
        draw.rectangle((30, 10, 70, 50), outline=(250, 250, 250), width=4)
    return image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mine") / "images"
    (folder / "more").mkdir(parents=True)
    drawing(0).save(folder / "disc.png")
    drawing(0).save(folder / "disc_copy.png")  # identical pixels
    near = drawing(0)
    near.putpixel((50, 5), (0, 0, 0))  # one pixel changed
    near.save(folder / "disc_1px.png")
    drawing(1).save(folder / "more" / "triangle.jpg", quality=95)
    drawing(2).save(folder / "more" / "lines.webp")
    drawing(3).save(folder / "square.bmp")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return folder


def embed_requests(metrics) -> float:
    text = metrics.exposition().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mofserve_requests_total{") and 'method="Embed"' in line)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_names(pairs: list[dict[str, str]]) -> dict[frozenset[str], dict[str, str]]:
    return {frozenset((Path(p["path_a"]).name, Path(p["path_b"]).name)): p for p in pairs}


def test_mine_finds_identical_copies_only_when_dinov2_may_agree_and_reruns_from_the_cache(
        served, metrics, images, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["mine", "--images", str(images), "--server", served.target, "--out", str(out), "--batch", "4",
              "--quiet"]
    before = embed_requests(metrics)
    assert main(common) == 0
    first_calls = embed_requests(metrics) - before
    assert first_calls == 2  # 6 decodable images, 4 per call: the corrupt one never reaches the server

    failed = rows(out / "failed.csv")
    assert [(Path(f["path"]).name, f["stage"]) for f in failed] == [("corrupt.png", "decode")]
    assert failed[0]["reason"].startswith("image:")
    paper = by_names(rows(out / "pairs.csv"))
    assert frozenset(("disc.png", "disc_copy.png")) not in paper  # DINOv2 agrees too: not CLIP-blind
    assert frozenset(("disc.png", "disc_1px.png")) not in paper
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"]["usable"] == 6 and summary["images"]["embedded_now"] == 6
    assert summary["server"]["random_weights"] and summary["random_weights_note"]
    assert summary["search"]["clip_dim"] > 0 and summary["search"]["dino_dim"] > 0
    assert (out / "contact_sheet.png").is_file()

    before = embed_requests(metrics)
    assert main([*common, "--dino-threshold", "1.01"]) == 0
    assert embed_requests(metrics) == before  # thresholds changed, embeddings did not: no Embed call
    everything = by_names(rows(out / "pairs.csv"))
    same = everything[frozenset(("disc.png", "disc_copy.png"))]
    assert float(same["clip_cosine"]) == pytest.approx(1.0, abs=1e-5)
    assert float(same["dino_cosine"]) == pytest.approx(1.0, abs=1e-5)
    near = everything[frozenset(("disc.png", "disc_1px.png"))]
    assert float(near["clip_cosine"]) > 0.99 and float(near["dino_cosine"]) > 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"]["from_cache"] == 6 and summary["images"]["embedded_now"] == 0
    assert summary["rates"]["embed_calls"] == 0 and summary["contact_sheet"]["tiles"] == min(24, len(everything))

    listing = tmp_path / "list.txt"  # the same images by a list file, plus one that does not exist
    listing.write_text("\n".join([str(images / "disc.png"), str(images / "disc_copy.png"), "nowhere.png"]) + "\n")
    before = embed_requests(metrics)
    assert main(["mine", "--images", str(listing), "--server", served.target, "--out", str(out),
                 "--dino-threshold", "1.01", "--quiet"]) == 0
    assert embed_requests(metrics) == before
    assert [(f["path"], f["stage"]) for f in rows(out / "failed.csv")] == [("nowhere.png", "list")]
    assert len(rows(out / "pairs.csv")) == 1
    assert "failed" in capsys.readouterr().err
