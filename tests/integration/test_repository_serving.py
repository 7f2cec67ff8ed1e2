"""The tiny repository served by the real tritonserver, checked against an independent
in-process PyTorch reference of the whole pipeline (preprocess -> encoders -> fusion).

The reference preprocesses with transformers' CLIPImageProcessor, runs the HF models as
released (DINOv2 interpolating its position embeddings at run time) and fuses with the numpy
formulas of tests/reference.py; it shares no code with what is served.
Tolerance: min cosine per token >= 0.9999 and max |diff| <= 1e-3 * max |reference| + 1e-4.
"""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from safetensors.torch import load_file
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection, Dinov2Model
from tritonclient.utils import InferenceServerException

from mofserve.core.profiles import CLIP_MEAN, CLIP_STD
from mofserve.core.samples import sample_photos
from tests.reference import fuse, min_row_cosine

pytestmark = pytest.mark.integration
MODES = ("clip", "dinov2", "additive", "interleaved")


class Reference:
    """Features and tokens of the tiny profile computed in-process without mofserve code."""

    def __init__(self, paths, image_size: int) -> None:
        self.processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                               crop_size={"height": image_size, "width": image_size},
                                               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        self.clip = CLIPVisionModelWithProjection.from_pretrained(paths.clip).eval()
        self.dino = Dinov2Model.from_pretrained(paths.dinov2).eval()
        state = {k: v.numpy() for k, v in load_file(str(paths.llava / "model.safetensors")).items()}
        self.p_clip = {k[len("model.mm_projector."):]: v for k, v in state.items()
                       if k.startswith("model.mm_projector.")}
        self.p_dino = {k[len("model.dino_mm_projector."):]: v for k, v in state.items()
                       if k.startswith("model.dino_mm_projector.")}

    def features(self, image_bytes: bytes) -> dict[str, np.ndarray]:
        import io

        from PIL import Image

        pixels = self.processor(Image.open(io.BytesIO(image_bytes)), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            c = self.clip(pixel_values=pixels, output_hidden_states=True)
            d = self.dino(pixel_values=pixels, output_hidden_states=True)
        return {"clip": c.hidden_states[-2][0, 1:].numpy(), "clip_embeds": c.image_embeds[0].numpy(),
                "dino": d.hidden_states[-1][0, 1:].numpy(), "dino_cls": d.pooler_output[0].numpy()}

    def tokens(self, mode: str, image_bytes: bytes, alpha: float | None = None) -> np.ndarray:
        f = self.features(image_bytes)
        return fuse(mode, f["clip"], f["dino"], self.p_clip, self.p_dino, alpha)


@pytest.fixture(scope="module")
def reference(tiny_paths, tiny_profile) -> Reference:
    return Reference(tiny_paths, tiny_profile.image_size)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return sample_photos()


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert min_row_cosine(got, want) >= 0.9999
    assert float(np.max(np.abs(got - want))) <= 1e-3 * float(np.max(np.abs(want))) + 1e-4


def image_input(module, images: list[bytes]):
    tensor = module.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b] for b in images], dtype=object))
    return tensor


def alpha_input(module, values: list[float]):
    tensor = module.InferInput("ALPHA", [len(values), 1], "FP32")
    tensor.set_data_from_numpy(np.array([[v] for v in values], dtype=np.float32))
    return tensor


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_tokens_ensemble_matches_the_in_process_pytorch_reference(tiny_triton, reference, photos, mode,
                                                                  transport, tiny_profile):
    module = grpcclient if transport == "grpc" else httpclient
    client = module.InferenceServerClient(tiny_triton.grpc_url if transport == "grpc" else tiny_triton.http_url)
    result = client.infer(f"tokens_{mode}", [image_input(module, [photos[0]])],
                          outputs=[module.InferRequestedOutput("VISUAL_TOKENS")])
    tokens = result.as_numpy("VISUAL_TOKENS")
    patches = (224 // 14) ** 2
    assert tokens.shape == (1, 2 * patches if mode == "interleaved" else patches, 64)
    alpha = tiny_profile.default_alpha if mode == "additive" else None
    assert_close(tokens[0], reference.tokens(mode, photos[0], alpha))


def test_a_batch_of_images_in_one_request_is_answered_per_image(tiny_triton, reference, photos):
    client = grpcclient.InferenceServerClient(tiny_triton.grpc_url)
    images = photos[:3]
    tokens = client.infer("tokens_interleaved", [image_input(grpcclient, images)]).as_numpy("VISUAL_TOKENS")
    assert tokens.shape[0] == 3
    for i, image in enumerate(images):
        assert_close(tokens[i], reference.tokens("interleaved", image))


def test_additive_alpha_is_taken_per_request_and_defaults_to_the_profile(tiny_triton, reference, photos,
                                                                          tiny_profile):
    client = grpcclient.InferenceServerClient(tiny_triton.grpc_url)
    image = photos[1]
    default = client.infer("tokens_additive", [image_input(grpcclient, [image])]).as_numpy("VISUAL_TOKENS")
    assert_close(default[0], reference.tokens("additive", image, tiny_profile.default_alpha))
    explicit = client.infer("tokens_additive", [image_input(grpcclient, [image]),
                                                alpha_input(grpcclient, [0.25])]).as_numpy("VISUAL_TOKENS")
    assert_close(explicit[0], reference.tokens("additive", image, 0.25))


@pytest.mark.parametrize("alpha", [1.5, -0.5, math.nan])
def test_alpha_outside_unit_interval_fails_that_request_and_the_server_keeps_serving(tiny_triton, photos, alpha):
    client = grpcclient.InferenceServerClient(tiny_triton.grpc_url)
    with pytest.raises(InferenceServerException, match=r"alpha: must be within \[0, 1\]") as error:
        client.infer("tokens_additive", [image_input(grpcclient, [photos[0]]), alpha_input(grpcclient, [alpha])])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.infer("tokens_additive", [image_input(grpcclient, [photos[0]])]).as_numpy("VISUAL_TOKENS") is not None


@pytest.mark.parametrize("payload", [b"", b"not an image", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_undecodable_image_fails_naming_the_image_field_and_the_server_keeps_serving(tiny_triton, photos,
                                                                                     payload):
    client = grpcclient.InferenceServerClient(tiny_triton.grpc_url)
    with pytest.raises(InferenceServerException, match="image: ") as error:
        client.infer("tokens_clip", [image_input(grpcclient, [payload])])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert tiny_triton.is_ready()
    assert client.infer("tokens_clip", [image_input(grpcclient, [photos[2]])]).as_numpy("VISUAL_TOKENS") is not None


def test_embed_returns_the_pooled_clip_embedding_and_dinov2_cls(tiny_triton, reference, photos):
    client = httpclient.InferenceServerClient(tiny_triton.http_url)
    result = client.infer("embed", [image_input(httpclient, [photos[3]])])
    want = reference.features(photos[3])
    assert_close(result.as_numpy("CLIP_EMBEDS")[0][None], want["clip_embeds"][None])
    assert_close(result.as_numpy("DINO_CLS")[0][None], want["dino_cls"][None])


def encoder_cache(server, model: str) -> dict[str, float]:
    """The encoder feature-cache counters from Triton's Prometheus endpoint."""
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    counts = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if line.startswith("mofserve_encoder_cache_total{") and f'model="{model}"' in line:
            result = "hit" if 'result="hit"' in line else "miss"
            counts[result] = float(line.rsplit(" ", 1)[1])
    return counts


def test_second_mode_on_a_seen_image_reuses_the_encoder_features(tiny_triton, photos):
    client = grpcclient.InferenceServerClient(tiny_triton.grpc_url)
    image = photos[4]
    only_tokens = [grpcclient.InferRequestedOutput("VISUAL_TOKENS")]
    client.infer("tokens_clip", [image_input(grpcclient, [image])], outputs=only_tokens)
    clip0, dino0 = encoder_cache(tiny_triton, "clip_vision"), encoder_cache(tiny_triton, "dinov2_vision")
    client.infer("tokens_interleaved", [image_input(grpcclient, [image])], outputs=only_tokens)
    clip1, dino1 = encoder_cache(tiny_triton, "clip_vision"), encoder_cache(tiny_triton, "dinov2_vision")
    assert (clip1["hit"] - clip0["hit"], clip1["miss"] - clip0["miss"]) == (1, 0)
    assert (dino1["hit"] - dino0["hit"], dino1["miss"] - dino0["miss"]) == (0, 1)  # DINOv2's first look
    # cached entries are whole: embed gets the pooled outputs that tokens_* did not ask for
    result = client.infer("embed", [image_input(grpcclient, [image])])
    assert encoder_cache(tiny_triton, "clip_vision")["hit"] == clip1["hit"] + 1
    assert result.as_numpy("CLIP_EMBEDS").shape == (1, 24) and result.as_numpy("DINO_CLS").shape == (1, 32)


def test_a_request_for_some_outputs_does_not_leave_a_partial_cache_entry(tiny_triton):
    """Triton's own response cache would replay the partial response; the feature cache must not."""
    client = grpcclient.InferenceServerClient(tiny_triton.grpc_url)
    pixels = grpcclient.InferInput("PIXEL_VALUES", [1, 3, 224, 224], "FP32")
    pixels.set_data_from_numpy(np.full((1, 3, 224, 224), 0.123, np.float32))
    part = client.infer("clip_vision", [pixels], outputs=[grpcclient.InferRequestedOutput("CLIP_EMBEDS")])
    assert part.as_numpy("CLIP_EMBEDS").shape == (1, 24)
    whole = client.infer("clip_vision", [pixels])
    assert whole.as_numpy("CLIP_FEATURES").shape == (1, 256, 32)
    np.testing.assert_array_equal(whole.as_numpy("CLIP_EMBEDS"), part.as_numpy("CLIP_EMBEDS"))


def test_concurrent_requests_are_dynamically_batched_into_one_encoder_call(tiny_triton):
    client = grpcclient.InferenceServerClient(tiny_triton.grpc_url)
    before = client.get_inference_statistics("dinov2_vision").model_stats[0]
    rng = np.random.default_rng(7)

    def call(i: int):
        pixels = grpcclient.InferInput("PIXEL_VALUES", [1, 3, 224, 224], "FP32")
        pixels.set_data_from_numpy(rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
        return grpcclient.InferenceServerClient(tiny_triton.grpc_url).infer("dinov2_vision", [pixels])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(32)))
    assert all(r.as_numpy("DINO_FEATURES").shape == (1, 256, 32) for r in results)
    after = client.get_inference_statistics("dinov2_vision").model_stats[0]
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == 32
    assert executions < inferences, "dynamic batching should merge some of 32 concurrent requests"


def _unique_png(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_same_image_twice_in_one_batch_runs_the_encoder_once(tiny_triton):
    client = grpcclient.InferenceServerClient(tiny_triton.grpc_url)
    image = _unique_png(20261126)  # seen by no other test
    before = encoder_cache(tiny_triton, "clip_vision")
    tokens = client.infer("tokens_clip", [image_input(grpcclient, [image, image])]).as_numpy("VISUAL_TOKENS")
    after = encoder_cache(tiny_triton, "clip_vision")
    assert (after["miss"] - before["miss"], after["hit"] - before["hit"]) == (1, 1)
    np.testing.assert_array_equal(tokens[0], tokens[1])
