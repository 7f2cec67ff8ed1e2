"""The playground's server side without Triton: the similarity protocol and maths, the info body,
the static routes (CSP, public paths under auth, nothing fetched from outside) and packaging.
The page itself is driven in a real browser by tests/e2e/test_playground.py."""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mofserve.server import openai_protocol as P
from mofserve.server.admission import Admission
from mofserve.server.config import ServeConfig
from mofserve.server.engine import Limits, ServingInfo
from mofserve.server.info_api.protocol import ServerFacts, info_body
from mofserve.server.metrics import FrontendMetrics
from mofserve.server.playground.router import CSP, STATIC, public_paths, static_files
from mofserve.server.security import BearerToken, http_bearer_auth
from mofserve.server.similarity_api import protocol as S
from mofserve.server.similarity_api.serving import Similarity, patch_cosines
from mofserve.server.web_routes import add_web_routes, open_http_paths

ROOT = Path(__file__).resolve().parents[2]
PNG = P.data_url(b"\x89PNG fake bytes")
TOKEN = "playground-test-token-0123456789"


# ---- similarity: protocol -----------------------------------------------------------------------------


def test_parse_request_takes_two_data_urls_and_the_paper_thresholds_by_default():
    request = S.parse_request({"images": [PNG, PNG]}, Limits())
    assert request.images == (b"\x89PNG fake bytes",) * 2
    assert (request.clip_threshold, request.dinov2_threshold, request.patch_maps) == (0.95, 0.6, True)
    custom = S.parse_request({"images": [PNG, PNG], "clip_threshold": 0.9, "dinov2_threshold": 0.5,
                              "patch_maps": False}, Limits())
    assert (custom.clip_threshold, custom.dinov2_threshold, custom.patch_maps) == (0.9, 0.5, False)


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"images": [PNG]}, 400, "images", "exactly two"),
    ({"images": PNG}, 400, "images", "exactly two"),
    ({"images": [PNG, "https://example.com/a.png"]}, 400, "images[1]", "never reaches the network"),
    ({"images": [PNG, "data:text/plain;base64,aGk="]}, 400, "images[1]", "image/*"),
    ({"images": [PNG, PNG], "clip_threshold": 2}, 400, "clip_threshold", "[-1, 1]"),
    ({"images": [PNG, PNG], "patch_maps": "yes"}, 400, "patch_maps", "boolean"),
    ({"images": [PNG, PNG], "aplha": 1}, 400, "aplha", "unrecognized"),
    ([PNG, PNG], 400, None, "JSON object"),
])
def test_parse_request_names_the_bad_field(body, status, param, words):
    with pytest.raises(P.ProtocolError) as caught:
        S.parse_request(body, Limits())
    assert (caught.value.status, caught.value.param) == (status, param)
    assert words in caught.value.message


def test_an_image_over_max_image_bytes_is_413_before_decoding():
    with pytest.raises(P.ProtocolError) as caught:
        S.parse_request({"images": [PNG, P.data_url(b"x" * 2000)]}, Limits(max_image_bytes=1000))
    assert (caught.value.status, caught.value.code, caught.value.param) == (413, "too_large", "images[1]")


@pytest.mark.parametrize(("clip", "dino", "blind", "words"), [
    (0.97, 0.41, True, "CLIP-blind pair"),
    (0.97, 0.90, False, "both encoders see the two alike"),
    (0.80, 0.40, False, "CLIP tells them apart too"),
    (0.80, 0.90, False, "DINOv2 sees them alike"),
    (0.95, 0.59, False, "CLIP 0.950 <= 0.95"),  # the paper's thresholds are strict
])
def test_verdict_at_the_papers_thresholds(clip, dino, blind, words):
    verdict, text = S.verdict(clip, dino, 0.95, 0.6)
    assert verdict is blind and words in text


def test_patch_cosines_compare_the_same_position_on_the_square_grid():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 8))
    b = a.copy()
    b[5] = -a[5]  # one patch opposite
    b[6] = rng.normal(size=8)
    grid = patch_cosines(a, b)
    assert grid.shape == (4, 4)
    assert grid[1, 1] == pytest.approx(-1.0) and grid[0, 0] == pytest.approx(1.0)
    assert -1 <= grid[1, 2] <= 1
    assert patch_cosines(a[:6], b[:6]).shape == (1, 6)  # not a square: one row


def test_similarity_response_reports_both_encoders_and_the_view():
    result = Similarity(0.97, 0.41, np.full((2, 2), 0.5), np.array([[0.1, 0.2], [0.3, 0.4]]),
                        {"images": [], "total_ms": 1.0})
    request = S.SimilarityRequest(images=(b"a", b"b"))
    body = S.similarity_response(request, result, ServingInfo("tiny", True), image_size=224, aspect="crop")
    assert body["object"] == "mofserve.similarity" and body["clip_blind"] is True
    assert body["clip"]["passes"] and body["dinov2"]["passes"]
    assert body["dinov2"]["patch_cosines"] == [[0.1, 0.2], [0.3, 0.4]]
    assert body["dinov2"]["patch_grid"] == [2, 2] and body["dinov2"]["patch_mean"] == pytest.approx(0.25)
    assert body["view"] == {"image_size": 224, "aspect": "crop"}
    assert body["random_weights"] and "random" in body["notice"]
    lean = S.similarity_response(S.SimilarityRequest(images=(b"a", b"b"), patch_maps=False), result,
                                 ServingInfo("paper", False), image_size=336, aspect="crop")
    assert "patch_cosines" not in lean["clip"] and lean["notice"] is None


# ---- info ----------------------------------------------------------------------------------------------


def test_info_body_says_what_the_server_is():
    info = ServingInfo("tiny", True, {"clip_vision": "abc", "llava": "tiny"})
    body = info_body(info, Limits(), ServerFacts(target="gpu-trt", auth=True, playground=True), ready=True)
    assert body["object"] == "mofserve.info" and body["profile"] == "tiny" and body["random_weights"]
    assert body["versions"] == {"clip_vision": "abc", "llava": "tiny"}
    assert [m["id"] for m in body["models"]] == ["mofserve-clip", "mofserve-dinov2", "mofserve-additive",
                                                 "mofserve-interleaved"]
    assert [m["encoders"] for m in body["models"]] == [["clip"], ["dinov2"], ["clip", "dinov2"], ["clip", "dinov2"]]
    assert body["image"] == {"size": 224, "patch_size": 14, "aspect": "crop", "patch_grid": 16}
    assert body["clip_blind_thresholds"] == {"clip_cosine_gt": 0.95, "dinov2_cosine_lt": 0.6}
    assert body["encoder_timings"] is False  # native encoders on gpu-trt
    assert body["limits"]["max_image_bytes"] == Limits().max_image_bytes
    assert body["routes"]["playground"] == "/" and body["routes"]["triton_metrics"] is None


# ---- routes --------------------------------------------------------------------------------------------


class FakeEngine:
    def __init__(self) -> None:
        self.info = ServingInfo("tiny", True)
        self.limits = Limits()

    async def ready(self) -> bool:
        return True


def _app(playground: bool, token: str | None = None) -> web.Application:
    metrics = FrontendMetrics()
    middlewares = [http_bearer_auth(BearerToken(token), metrics, open_http_paths(playground))] if token else []
    app = web.Application(middlewares=middlewares)
    add_web_routes(app, FakeEngine(), metrics, Admission(metrics=metrics), ServeConfig(playground=playground),
                   auth=bool(token))
    return app


def _run(app: web.Application, requests):
    async def go():
        async with TestClient(TestServer(app)) as client:
            return await requests(client)

    return asyncio.run(go())


def test_the_page_is_served_with_a_same_origin_csp():
    async def requests(client):
        page = await client.get("/")
        script = await client.get("/playground/js/main.js")
        missing = await client.get("/playground/../router.py")
        return (page.status, page.headers.get("Content-Security-Policy"), page.content_type, await page.text(),
                script.status, script.content_type, script.headers.get("X-Content-Type-Options"), missing.status)

    status, csp, page_type, html, script_status, script_type, nosniff, missing = _run(_app(True), requests)
    assert status == 200 and page_type == "text/html" and "mofserve playground" in html
    assert csp == CSP and "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "http" not in csp and "*" not in csp  # same origin only (plus the page's own data:/blob: images)
    assert (script_status, script_type, nosniff) == (200, "text/javascript", "nosniff")
    assert missing == 404


def test_no_playground_serves_no_page_but_keeps_the_api():
    async def requests(client):
        return (await client.get("/")).status, (await client.get("/v1/mofserve/info")).status

    assert _run(_app(False), requests) == (404, 200)


def test_with_auth_the_page_is_public_and_every_api_call_needs_the_token():
    async def requests(client):
        page = await client.get("/")
        asset = await client.get("/playground/style.css")
        info = await client.get("/v1/mofserve/info")
        similarity = await client.post("/v1/mofserve/similarity", json={"images": [PNG, PNG]})
        with_token = await client.get("/v1/mofserve/info", headers={"Authorization": f"Bearer {TOKEN}"})
        return page.status, asset.status, info.status, similarity.status, with_token.status, await with_token.json()

    page, asset, info, similarity, ok, body = _run(_app(True, TOKEN), requests)
    assert (page, asset, info, similarity, ok) == (200, 200, 401, 401, 200)
    assert body["auth"] is True and body["profile"] == "tiny"
    assert "/v1/mofserve/info" not in public_paths() and "/" in public_paths()


def test_similarity_errors_keep_openai_shape():
    async def requests(client):
        wrong_type = await client.post("/v1/mofserve/similarity", data=b"{}", headers={"Content-Type": "text/plain"})
        one = await client.post("/v1/mofserve/similarity", json={"images": [PNG]})
        return wrong_type.status, (await one.json()), one.status

    wrong_type, body, status = _run(_app(False), requests)
    assert wrong_type == 415 and status == 400
    assert body["error"]["param"] == "images" and body["error"]["type"] == "invalid_request_error"


# ---- the shipped files ---------------------------------------------------------------------------------


def _texts() -> dict[str, str]:
    return {path: file.read_text(encoding="utf-8") for path, file in static_files().items() if path != "/"}


def test_the_page_fetches_nothing_from_outside():
    for path, text in _texts().items():
        for url in re.findall(r"""(?:src|href|from|import|url)\s*[=(]?\s*["']([^"']+)["']""", text):
            assert not re.match(r"^(https?:)?//", url), f"{path} loads {url} from outside"
        assert "fetch(\"http" not in text and "fetch('http" not in text, path


def test_every_module_and_asset_the_page_names_is_shipped():
    served = set(static_files())
    for path, text in _texts().items():
        base = path.rsplit("/", 1)[0]
        for name in re.findall(r"""from\s+["'](\./[^"']+)["']""", text):
            assert f"{base}/{name[2:]}" in served, f"{path} imports {name}, not shipped"
    html = (STATIC / "index.html").read_text()
    for ref in re.findall(r"""(?:src|href)="(/playground/[^"]+)""", html):
        assert ref in served, ref


def test_the_static_files_ship_inside_the_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(config["packages"])
    assert {"mofserve.server.playground", "mofserve.server.similarity_api", "mofserve.server.info_api"} <= packages
    globs = config["package-data"]["mofserve.server.playground"]
    shipped = {f.relative_to(STATIC.parent).as_posix() for f in STATIC.rglob("*") if f.is_file()}
    for name in shipped:
        assert any(Path(name).match(g) for g in globs), f"{name} is not in the playground's package-data"


def test_serve_flag_turns_the_playground_off():
    from mofserve.cli import build_parser
    from mofserve.server.config import load_config

    assert ServeConfig().playground is True
    args = build_parser().parse_args(["serve", "--no-playground"])
    assert args.playground is False
    assert load_config(flags={"playground": args.playground}, environ={}).playground is False
    assert load_config(environ={"MOFSERVE_PLAYGROUND": "false"}).playground is False
    assert load_config(environ={"MOFSERVE_PLAYGROUND": "1"}).playground is True
    assert build_parser().parse_args(["serve"]).playground is None  # the file / environment decide

