"""``make demo``: the whole product end to end on one drawn image, then everything stops.

Exports the profile (cached after the first run), starts ``mofserve serve`` in-process on free
loopback ports (Triton + the gRPC and HTTP front-ends), asks one MMVP-style question in every
fusion mode through the gRPC client, then one ``Compare`` over all modes, an ``Encode`` and an
``Embed`` of the image and its mirror image (a CLIP-blind-pair check), prints answers and
per-stage timings, and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import threading
import time

from mofserve.core.profiles import Profile, add_profile_arguments, get_profile, profile_from_args
from mofserve.core.tensors import FusionMode

QUESTION = "Is the dog facing left or right from the camera's perspective?"
OPTIONS = "(a) Left (b) Right"
MODES = tuple(mode.value for mode in FusionMode)  # every mode, in the order the demo prints them


def draw_mmvp_image(mirror: bool = False) -> bytes:
    """A small scene with a clear orientation: a dog facing right (or, mirrored, left)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 170, 320, 240), fill=(90, 160, 70))
    draw.ellipse((90, 110, 210, 170), fill=(150, 100, 60))  # body
    draw.ellipse((190, 85, 245, 135), fill=(150, 100, 60))  # head, on the right
    draw.polygon([(235, 100), (265, 110), (235, 120)], fill=(60, 40, 30))  # snout pointing right
    draw.rectangle((105, 160, 120, 195), fill=(120, 80, 50))
    draw.rectangle((180, 160, 195, 195), fill=(120, 80, 50))
    draw.ellipse((30, 20, 80, 70), fill=(250, 220, 60))  # sun, top left
    if mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _row(result) -> str:
    t = result.timings
    alpha = f"{result.alpha:.2f}" if result.alpha is not None else "-"
    # random weights decode to arbitrary bytes: keep the table readable
    answer = "".join(ch if ch.isprintable() else "·" for ch in result.answer)
    answer = answer if len(answer) <= 24 else answer[:23] + "…"
    return (f"   {result.mode:<12} {alpha:>5}  ({result.chosen_option or '-'})  {answer:<26} "
            f"{t.preprocess_ms:7.1f} {t.encoders_ms:8.1f} {t.fusion_ms:7.1f} {t.llm_ms:7.1f} {t.total_ms:8.1f}")


HEADER = (f"   {'mode':<12} {'alpha':>5}  opt  {'answer':<26} {'prep ms':>7} {'enc ms':>8} {'fuse ms':>7} "
          f"{'llm ms':>7} {'total ms':>8}")


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve demo``: which profile, and its checkpoint overrides."""
    add_profile_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``mofserve demo``: the whole product once, on the profile the flags name."""
    return run_demo(profile_from_args(args))


def run_demo(profile: Profile) -> int:
    # the server and client pull grpc, Triton's client and torch, which `mofserve demo --help` must not wait for
    from mofserve.clients.client import MofServeClient  # lazy: grpc (see above)
    from mofserve.server.app import MofServeApp  # lazy: the server and, through export, torch
    from mofserve.server.config import ServeConfig  # lazy: Triton's client (the engine's limits)

    say = lambda text="": print(text, flush=True)  # noqa: E731
    say(f"== mofserve demo: profile {profile.name} ({profile.description})")
    config = ServeConfig(profile=profile.name, grpc_port=0, http_port=0, clip=profile.sources.clip,
                         dinov2=profile.sources.dinov2, llava=profile.sources.llava)
    app = MofServeApp(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mofserve-demo", daemon=True)
    thread.start()
    started = time.perf_counter()
    try:
        endpoints = asyncio.run_coroutine_threadsafe(app.start(), loop).result(timeout=900)
        say(f"== serving in {time.perf_counter() - started:.1f} s: gRPC {endpoints.grpc}, HTTP {endpoints.http} "
            f"(OpenAI-compatible), Triton {endpoints.triton_grpc}")
        image, mirrored = draw_mmvp_image(), draw_mmvp_image(mirror=True)
        with MofServeClient(endpoints.grpc, timeout=120) as client:
            say(f"== Ask, one request per mode: {QUESTION} {OPTIONS}")
            say(HEADER)
            for mode in MODES:
                say(_row(client.ask(image, QUESTION, OPTIONS, mode=mode)))
            say("   (the first mode pays for the encoders it needs; later modes reuse cached features)")
            say("== Compare, all modes in one call on the mirrored image (encoders run once for it)")
            say(HEADER)
            answers = client.compare(mirrored, QUESTION, OPTIONS, modes=MODES)
            for result in answers:
                say(_row(result))
            tokens = client.encode(image, mode="interleaved")
            say(f"== Encode (interleaved): visual tokens {tokens.shape[0]}x{tokens.shape[1]} float32 "
                "(CLIP and DINOv2 tokens alternate)")
            pair = client.embed([image, mirrored])
            say(f"== Embed, image vs its mirror: CLIP cosine {pair.clip_cosine:.4f}, DINOv2 cosine "
                f"{pair.dinov2_cosine:.4f} (a CLIP-blind pair has CLIP > 0.95 and DINOv2 < 0.6)")
            notice = answers[0].notice
        if profile.random_weights:
            say(f"== NOTE: {notice or 'random weights'}. These answers show the pipeline works, "
                "not what the paper's models see.")
            say("   For real models: mofserve demo --profile paper --clip PATH --dinov2 PATH --llava PATH "
                "(local folders or HF ids already in the HF cache; nothing is downloaded).")
    finally:
        asyncio.run_coroutine_threadsafe(app.stop(), loop).result(timeout=120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    say("== stopped the front-end and Triton; demo done")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(get_profile("tiny")))
