"""The web playground in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright) against a real ``mofserve serve`` on the tiny profile.

One ``serve`` without auth owns Triton; a second ``serve --triton-url`` front-end with a bearer
token shares it (auth on and off without a second Triton start). The page uploads a photo, asks in
four modes (streamed), runs the CLIP-blind pair view on the photo and its mirror, shows the server
panel and the reports of a real ``mofserve eval mmvp`` and ``mofserve mine`` run, asks for the token
when auth is on, and shows API errors in words. Screenshots land in ``results/playground/`` (or
``$MOFSERVE_PLAYGROUND_SCREENSHOTS``). Skips, saying why, when Playwright or Chromium is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mofserve.cli import main
from mofserve.core.samples import sample_photo_paths
from tests.e2e.processes import children, kill_process, start_mofserve
from tests.e2e.test_mining import drawing
from tests.unit.test_mmvp_eval import write_mmvp

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "playground-e2e-token-4f1c2a9b7d"
MAX_IMAGE_BYTES = 600_000  # astronaut.png (792 kB) is over it: the 413 case
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 90_000


def _chromium() -> str:
    path = os.environ.get("MOFSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("Debian's chromium is not installed: `make install` runs `make browser` (apt-get install "
                    "chromium, as root); install it to run the browser test")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[dev]')")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception as error:  # a chromium that cannot start here (libraries, sandbox)
            pytest.skip(f"chromium at {executable} did not start under Playwright: {error}")
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = Path(os.environ.get("MOFSERVE_PLAYGROUND_SCREENSHOTS", ROOT / "results" / "playground"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def served(browser, tiny_repository) -> Iterator[dict]:  # browser first: a skip costs no export
    """``mofserve serve`` without auth (it owns Triton) and a ``serve --triton-url`` front-end with a
    token on the same Triton, both with a small image limit (for the 413 case)."""
    env = {"MOFSERVE_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "MOFSERVE_AUTH_TOKEN": ""}
    owner = start_mofserve(["serve", "--grpc-port", "0", "--http-port", "0"], env=env)
    secured = None
    try:
        (triton,) = children(owner["process"].pid, "tritonserver")
        command = Path(f"/proc/{triton}/cmdline").read_bytes().decode().split("\0")
        port = {k: v for k, _, v in (a.partition("=") for a in command if a.startswith("--"))}
        secured = start_mofserve(["serve", "--grpc-port", "0", "--http-port", "0", "--triton-url",
                                  f"grpc://127.0.0.1:{port['--grpc-port']}", "--triton-metrics-url",
                                  f"http://127.0.0.1:{port['--metrics-port']}/metrics"],
                                 env={**env, "MOFSERVE_AUTH_TOKEN": TOKEN})
        yield {"open": owner["http"], "grpc": owner["grpc"], "auth": secured["http"]}
    finally:
        if secured is not None:
            kill_process(secured["process"])
        kill_process(owner["process"])


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A real photo (scikit-image's chelsea) with a few pixels drawn now: no cache has seen it."""
    image = Image.open(sample_photo_paths(("chelsea.png",))[0]).convert("RGB")
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    for _ in range(4):
        where = (int(rng.integers(0, 40)), int(rng.integers(0, 40)))
        image.putpixel(where, tuple(int(v) for v in rng.integers(0, 256, 3)))
    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    image.save(path)
    return path


def _page(browser, url: str, viewport=DESKTOP):
    page = browser.new_page(viewport=viewport)
    page.problems = []  # uncaught errors of the page's scripts
    page.on("pageerror", lambda error: page.problems.append(f"pageerror: {error}"))
    page.requests = []
    page.on("request", lambda r: page.requests.append((r.method, r.url, r.headers.get("authorization"), r.post_data)))
    page.goto(url)
    return page


def _ready(page) -> None:
    page.wait_for_selector("body[data-ready=true]", state="attached", timeout=30_000)


def _modes(page, form: str, keep: set[str]) -> None:
    for box in page.locator(f"{form} input[type=checkbox][value]").all():
        box.set_checked(box.get_attribute("value") in keep)


def _shot(page, path: Path, full: bool = True) -> None:
    page.evaluate("window.scrollTo(0, 0)")  # the sticky warning banner at the top of a full-page shot
    page.screenshot(path=str(path), full_page=full)


def _no_page_errors(page) -> None:
    assert not [p for p in page.problems if p.startswith("pageerror")], page.problems


# ---- Ask ---------------------------------------------------------------------------------------------


def test_ask_in_four_modes_streams_answers_side_by_side(served, browser, photo, shots):
    page = _page(browser, served["open"])
    _ready(page)
    assert "RANDOM WEIGHTS" in page.inner_text("#weights-warning")
    page.set_input_files("input[name=ask-image]", str(photo))
    page.wait_for_selector(".ask-form img.preview", state="visible")  # the preview
    page.fill("textarea[name=question]", "Is the cat looking at the camera?")
    page.fill("input[name=options]", "(a) Yes (b) No")
    _modes(page, ".ask-form", {"clip", "dinov2", "additive", "interleaved"})
    page.fill("input[name=ask-max-tokens]", "12")
    # count the answer texts' updates: streamed answers arrive in several pieces
    page.evaluate("""() => { window.__pieces = {}; new MutationObserver((records) => { for (const r of records) {
        const card = (r.target.nodeType === 1 ? r.target : r.target.parentElement).closest('.answer-card');
        const text = (r.target.nodeType === 1 ? r.target : r.target.parentElement).closest('.answer-text');
        if (card && text) window.__pieces[card.dataset.mode] = (window.__pieces[card.dataset.mode] || 0) + 1; } })
        .observe(document.querySelector('.answers'), {subtree: true, childList: true, characterData: true}); }""")
    page.click(".ask-form button[type=submit]")
    page.wait_for_selector(".answers[data-state=done]", state="attached", timeout=WAIT_MS)

    cards = page.locator(".answer-card")
    assert cards.count() == 4
    assert sorted(c.get_attribute("data-mode") for c in cards.all()) == ["additive", "clip", "dinov2", "interleaved"]
    for card in cards.all():
        text = card.inner_text()
        assert "done" in card.get_attribute("class"), text
        assert "Chosen option: (a) Yes" in text or "Chosen option: (b) No" in text, text
        assert card.locator(".option-bars li").count() == 2
        assert "total" in card.locator(".timing-bar").get_attribute("aria-label")
        assert re.search(r"prefill \d", text) and "prompt tokens" in text
    assert "alpha 0.75" in page.locator(".answer-card[data-mode=additive]").inner_text()
    pieces = page.evaluate("window.__pieces")
    assert max(pieces.values()) >= 2, pieces  # token by token
    # additive ran first (it reads both encoders); the others found the photo's features cached
    legends = " ".join(page.locator(".timing-legend").all_inner_texts())
    assert "(feature cache)" in legends, legends

    asks = [json.loads(body) for method, url, _, body in page.requests if url.endswith("/v1/chat/completions")]
    assert sorted(a["model"] for a in asks) == ["mofserve-additive", "mofserve-clip", "mofserve-dinov2",
                                                "mofserve-interleaved"]
    assert all(a["stream"] is True and a["options"] == "(a) Yes (b) No" and a["max_tokens"] == 12 for a in asks)
    assert [a.get("alpha") for a in asks if a["model"] == "mofserve-additive"] == [0.75]
    _no_page_errors(page)
    _shot(page, shots / "ask.png")
    page.close()


# ---- the CLIP-blind pair view ------------------------------------------------------------------------


def test_pair_view_on_a_photo_and_its_mirror(served, browser, photo, shots):
    page = _page(browser, served["open"])
    _ready(page)
    page.click("#tab-pair")
    page.set_input_files("input[name=pair-a]", str(photo))
    page.click("text=Mirror A into B")
    page.wait_for_selector(".pair-images .image-slot:nth-child(2) img.preview:visible")
    assert "mirrored" in page.inner_text(".pair-images")
    page.fill("textarea[name=pair-question]", "Is the cat facing left or right?")
    page.fill("input[name=pair-options]", "(a) Left (b) Right")
    page.select_option("select[name=pair-correct-a]", "a")
    page.select_option("select[name=pair-correct-b]", "b")
    _modes(page, ".pair-form", {"clip", "interleaved"})
    page.click(".pair-form button[type=submit]")
    page.wait_for_selector(".similarity[data-state=done]", state="attached", timeout=WAIT_MS)
    page.wait_for_selector(".pair-answers[data-state=done]", state="attached", timeout=WAIT_MS)

    verdict = page.inner_text(".verdict")
    assert re.search(r"CLIP \d\.\d{3} (>|<=) 0\.95", verdict) and re.search(r"DINOv2 -?\d\.\d{3} (<|>=) 0\.6", verdict)
    assert verdict.startswith(("CLIP-blind pair", "Not CLIP-blind"))
    assert page.locator(".meter").count() == 2
    assert page.locator("canvas.heat").count() == 4
    drawn = page.evaluate("""() => [...document.querySelectorAll('canvas.heat')].map((c) => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n / (d.length / 4); })""")
    assert all(share == 1.0 for share in drawn), drawn  # every pixel painted: image + patch map
    assert "256 patches" in page.inner_text(".heat-maps")  # the tiny profile's 16 x 16 grid
    rows = page.locator(".pair-row")
    assert rows.count() == 2
    for row in rows.all():
        assert re.search(r"pair (right|wrong): chose \([ab]\) on A", row.locator(".pair-score").inner_text())
    assert re.search(r"MMVP pair score: [0-2] of 2 modes", page.inner_text(".pair-summary"))
    sims = [json.loads(body) for method, url, _, body in page.requests if url.endswith("/v1/mofserve/similarity")]
    assert len(sims) == 1 and len(sims[0]["images"]) == 2 and sims[0]["images"][0] != sims[0]["images"][1]
    _no_page_errors(page)
    _shot(page, shots / "pair.png")
    page.close()


# ---- the server panel and the reports ------------------------------------------------------------------


def test_server_panel_and_reports_of_real_runs(served, browser, shots, tmp_path):
    data = write_mmvp(tmp_path / "MMVP")
    mmvp_out = tmp_path / "mmvp"
    images = tmp_path / "images"
    images.mkdir()
    for kind in range(4):
        drawing(kind).save(images / f"drawing{kind}.png")
    mine_out = tmp_path / "mine"
    with ThreadPoolExecutor(1) as pool:  # the CLIs run their own asyncio loops: not on Playwright's thread
        assert pool.submit(main, ["eval", "mmvp", "--data", str(data), "--mode", "clip", "--mode", "interleaved",
                                  "--server", served["grpc"], "--out", str(mmvp_out), "--max-new-tokens", "4",
                                  "--timeout", "60", "--no-progress"]).result() == 0
        assert pool.submit(main, ["mine", "--images", str(images), "--server", served["grpc"], "--out",
                                  str(mine_out), "--clip-threshold", "-1", "--dino-threshold", "2",
                                  "--quiet"]).result() == 0

    page = _page(browser, served["open"])
    _ready(page)
    page.click("#tab-server")
    page.wait_for_selector("table.figures", timeout=30_000)
    panel = page.inner_text("#panel-server")
    assert "WARNING: RANDOM WEIGHTS" in panel and "tiny" in panel and "cpu" in panel
    assert "llava" in page.inner_text("table.versions")  # the model versions of the exported repository
    figures = page.inner_text("table.figures")
    assert re.search(r"questions answered / failed\s+\d+ / \d+", figures), figures
    assert re.search(r"p50 latency, chat completions\s+\d+ ms", figures), figures
    assert re.search(r"feature-cache hit rate\s+\d+% \(\d+ of \d+ encoder lookups\)", figures), figures
    _shot(page, shots / "server.png")

    page.click("#tab-reports")
    pickers = page.locator(".report-picker input[type=file][multiple]:not([webkitdirectory])")
    mmvp_images = sorted((data / "MMVP Images").iterdir())
    pickers.nth(0).set_input_files([str(mmvp_out / "report.json"), str(mmvp_out / "answers.csv"),
                                    *map(str, mmvp_images)])
    page.wait_for_selector("table.questions", timeout=10_000)
    scores = page.inner_text("table.scores")
    assert "clip" in scores and "interleaved" in scores and "%" in scores
    assert page.locator("table.questions tbody tr").count() == 8
    assert page.locator("table.questions img.thumb").count() == 8
    assert "RANDOM WEIGHTS" in page.inner_text("[data-report=mmvp]")
    pickers.nth(1).set_input_files([str(mine_out / "pairs.csv"), str(mine_out / "summary.json"),
                                    *(str(p) for p in sorted(images.iterdir()))])
    page.wait_for_selector("table.pairs", timeout=10_000)
    assert page.locator("table.pairs tbody tr").count() == 6  # every pair of 4 images at these thresholds
    assert page.locator("table.pairs img.thumb").count() == 12
    thumbs_loaded = page.evaluate("[...document.querySelectorAll('img.thumb')].every((i) => i.complete && "
                                  "i.naturalWidth > 0)")
    assert thumbs_loaded
    posts = [url for method, url, _, _ in page.requests if method != "GET"]
    assert posts == []  # read-only: the reports never leave the page
    _no_page_errors(page)
    _shot(page, shots / "reports.png")
    page.close()


# ---- auth ----------------------------------------------------------------------------------------------


def test_with_auth_the_page_asks_for_the_token_and_keeps_it_out_of_urls(served, browser, shots):
    page = _page(browser, served["auth"])
    page.wait_for_selector("#auth-panel:not([hidden])", timeout=30_000)
    assert "token needed" in page.inner_text("#server-status")
    _shot(page, shots / "auth.png", full=False)
    page.fill("#token", "not-the-token-at-all")
    page.click("#auth-form button[type=submit]")
    page.locator("#auth-message", has_text="refused").wait_for()  # (wait_for_function would eval: the CSP forbids it)
    page.fill("#token", TOKEN)
    page.click("#auth-form button[type=submit]")
    _ready(page)
    assert page.locator("#auth-panel").is_hidden() and "auth on" in page.inner_text("#server-status")
    assert page.evaluate("sessionStorage.length") == 0  # "keep it for this tab" was not checked
    page.click("text=Use a drawn test card")
    _modes(page, ".ask-form", {"clip"})
    page.fill("input[name=ask-max-tokens]", "4")
    page.click(".ask-form button[type=submit]")
    page.wait_for_selector(".answers[data-state=done]", state="attached", timeout=WAIT_MS)
    assert "done" in page.locator(".answer-card").get_attribute("class")

    assert all(TOKEN not in url for _, url, _, _ in page.requests)  # never in a URL
    asks = [auth for _, url, auth, _ in page.requests if url.endswith("/v1/chat/completions")]
    assert asks == [f"Bearer {TOKEN}"]  # in the Authorization header
    page.click("#forget-token")
    page.wait_for_selector("#auth-panel:not([hidden])")
    _no_page_errors(page)
    page.close()


# ---- errors, keyboard, phone width ---------------------------------------------------------------------


def _ask_one(page, image: Path | None = None) -> str:
    if image is not None:
        page.set_input_files("input[name=ask-image]", str(image))
    _modes(page, ".ask-form", {"clip"})
    page.click(".ask-form button[type=submit]")
    page.wait_for_selector(".answers[data-state=done]", state="attached", timeout=WAIT_MS)
    return page.inner_text(".answer-card .error")


def _refusal(status: int, body: str):
    def fulfill(route, request=None) -> None:
        route.fulfill(status=status, body=body, content_type="application/json", headers={"Retry-After": "3"})

    return fulfill


def test_api_errors_are_shown_in_words(served, browser, shots, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    page = _page(browser, served["open"])
    _ready(page)
    words = _ask_one(page, broken)
    assert "The server refused the request (HTTP 400, invalid_argument)" in words and "decode" in words, words

    big = sample_photo_paths(("astronaut.png",))[0]
    assert big.stat().st_size > MAX_IMAGE_BYTES
    words = _ask_one(page, big)
    assert "Too large for the server (HTTP 413, too_large)" in words and "max_image_bytes" in words, words
    _shot(page, shots / "error-413.png", full=False)

    for status, code in ((429, "resource_exhausted"), (503, "unavailable")):  # the server's words, busy / restarting
        body = json.dumps({"error": {"message": f"{code}: try later", "type": "server_error", "param": None,
                                     "code": code}})
        page.route("**/v1/chat/completions", _refusal(status, body))
        words = _ask_one(page, sample_photo_paths(("rocket.jpg",))[0])
        assert f"(HTTP {status}, {code})" in words and "Try again in 3 s" in words, words
        page.unroute("**/v1/chat/completions")
    _no_page_errors(page)
    page.close()


def test_keyboard_labels_and_phone_width(served, browser, shots):
    page = _page(browser, served["open"], viewport=PHONE)
    _ready(page)
    page.focus("#tab-ask")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-pair"
    assert page.get_attribute("#tab-pair", "aria-selected") == "true" and page.locator("#panel-pair").is_visible()
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.id") == "tab-reports"
    page.keyboard.press("Home")
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('main input, main select, main textarea')]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map((e) => e.name || e.id)""")
    assert unlabelled == []
    # the file input is reachable by keyboard (visually hidden, not display:none)
    page.focus("input[name=ask-image]")
    assert page.evaluate("document.activeElement.name") == "ask-image"
    # paste an image into Ask, drop one onto the pair view's image A (files made in the page)
    page.click("#tab-ask")
    page.evaluate("""async () => {
        const canvas = document.createElement('canvas'); canvas.width = 64; canvas.height = 48;
        const ctx = canvas.getContext('2d'); ctx.fillStyle = '#c33'; ctx.fillRect(0, 0, 32, 48);
        const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
        const transfer = () => { const t = new DataTransfer(); t.items.add(new File([blob], 'made.png',
            {type: 'image/png'})); return t; };
        document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer(), bubbles: true}));
        document.querySelector('#tab-pair').click();
        document.querySelector('#panel-pair .drop-zone').dispatchEvent(new DragEvent('drop',
            {dataTransfer: transfer(), bubbles: true, cancelable: true}));
    }""")
    assert "made.png" in page.inner_text("#panel-pair .pair-images .image-slot:first-child")
    page.click("#tab-ask")
    assert "made.png" in page.inner_text("#panel-ask .image-slot")
    for tab in ("ask", "pair", "server", "reports"):
        page.click(f"#tab-{tab}")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{tab}: {overflow} px wider than a phone"
    page.click("#tab-ask")
    _shot(page, shots / "phone.png")
    _no_page_errors(page)
    page.close()
