"""``make demo``: the whole pipeline end to end on one drawn image, then everything stops.

Exports the profile (cached after the first run), starts the real tritonserver on loopback
ports, asks every ``tokens_<mode>`` ensemble for the visual tokens of an MMVP-style image
(and the ``embed`` ensemble for the CLIP/DINOv2 similarity of the image and its mirror image,
a CLIP-blind-pair check), prints shapes and timings, and stops Triton.
"""

from __future__ import annotations

import io
import sys
import time

import numpy as np

from mofserve.core import tensors as T
from mofserve.core.profiles import Profile


def draw_mmvp_image(mirror: bool = False) -> bytes:
    """A small scene with a clear orientation: an arrow-shaped "dog" facing right (or left)."""
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


def _image_input(client_module, data: bytes):
    tensor = client_module.InferInput(T.IMAGE, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data]], dtype=object))
    return tensor


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_demo(profile: Profile) -> int:
    import tritonclient.grpc as grpcclient

    from mofserve.export.pipeline import export_profile
    from mofserve.server.launcher import TritonServer

    say = lambda text="": print(text, flush=True)  # noqa: E731
    say(f"== mofserve demo: profile {profile.name} ({profile.description})")
    built = export_profile(profile)
    started = time.perf_counter()
    with TritonServer(built.path) as server:
        ready_s = time.perf_counter() - started
        say(f"== tritonserver (nvidia-pytriton {server.install.version}) ready in {ready_s:.1f} s "
            f"(gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url})")
        client = grpcclient.InferenceServerClient(server.grpc_url)
        image, mirrored = draw_mmvp_image(), draw_mmvp_image(mirror=True)
        say("== visual tokens per fusion mode (question: 'Is the dog facing left or right?')")
        say(f"   {'mode':<12} {'model':<20} {'tokens':>12} {'ms':>8}  first values")
        for mode in T.FusionMode:
            only = [grpcclient.InferRequestedOutput(T.VISUAL_TOKENS)]
            t0 = time.perf_counter()
            result = client.infer(T.tokens_model(mode), [_image_input(grpcclient, image)], outputs=only)
            ms = (time.perf_counter() - t0) * 1e3
            tokens = result.as_numpy(T.VISUAL_TOKENS)[0]
            shape = "x".join(map(str, tokens.shape))
            say(f"   {mode.value:<12} {T.tokens_model(mode):<20} {shape:>12} {ms:8.1f}  "
                f"{np.array2string(tokens[0, :3], precision=3)}")
        say("   (the first mode on an image pays for the encoders; the others reuse cached features)")
        a = client.infer(T.EMBED, [_image_input(grpcclient, image)])
        b = client.infer(T.EMBED, [_image_input(grpcclient, mirrored)])
        clip_cos = _cosine(a.as_numpy(T.CLIP_EMBEDS)[0], b.as_numpy(T.CLIP_EMBEDS)[0])
        dino_cos = _cosine(a.as_numpy(T.DINO_CLS)[0], b.as_numpy(T.DINO_CLS)[0])
        say(f"== image vs its mirror image: CLIP cosine {clip_cos:.4f}, DINOv2 cosine {dino_cos:.4f} "
            "(a CLIP-blind pair has CLIP > 0.95 and DINOv2 < 0.6)")
    if profile.random_weights:
        say("== NOTE: the tiny profile has seeded RANDOM weights: these numbers show the pipeline works, "
            "not what the paper's models see.")
        say("   For real models: mofserve demo --profile paper --clip PATH --dinov2 PATH --llava PATH "
            "(local folders or HF ids already in the HF cache; nothing is downloaded).")
    say("== stopped Triton; demo done")
    return 0


if __name__ == "__main__":
    from mofserve.core.profiles import get_profile

    sys.exit(run_demo(get_profile("tiny")))
