"""CLIP's text tower served by the real tritonserver (tiny profile): ``embed_text`` (tokenize_text ->
clip_text) against an in-process reference that uses transformers as released (the CLIP
checkpoint's tokenizer with HF's own padding and attention mask, CLIPTextModelWithProjection with
its default attention): cosine >= 0.9999 per text.
"""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from transformers import AutoTokenizer, CLIPModel, CLIPTextModelWithProjection
from tritonclient.utils import InferenceServerException

from tests.reference import min_row_cosine

pytestmark = pytest.mark.integration

TEXTS = ["a photo of the dog facing left", "a photo of the dog facing right",
         "A PHOTO of 3 red apples (and 1 green one) on a café table!",
         "a photo of " + "a very long description of the scene " * 20,  # truncated to 77 tokens
         "a photo of 日本の猫 🐈"]


class TextReference:
    def __init__(self, clip_dir) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(clip_dir)
        self.model = CLIPTextModelWithProjection.from_pretrained(clip_dir).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.inference_mode():
            return self.model(**encoded).text_embeds.numpy()


@pytest.fixture(scope="module")
def reference(tiny_paths) -> TextReference:
    return TextReference(tiny_paths.clip)


@pytest.fixture(scope="module")
def client(tiny_triton):
    return grpcclient.InferenceServerClient(tiny_triton.grpc_url)


def text_input(texts: list[bytes | str]):
    tensor = grpcclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode() if isinstance(t, str) else t] for t in texts], dtype=object))
    return tensor


def test_embed_text_equals_the_in_process_clip_text_model(client, reference):
    result = client.infer("embed_text", [text_input(TEXTS)])
    got = result.as_numpy("TEXT_EMBEDS")
    assert got.shape == (len(TEXTS), 24) and got.dtype == np.float32
    want = reference(TEXTS)
    assert min_row_cosine(got, want) >= 0.9999
    assert float(np.max(np.abs(got - want))) <= 1e-3 * float(np.max(np.abs(want))) + 1e-4
    assert result.as_numpy("TIMING_TOKENIZE_MS").shape == (len(TEXTS), 1)
    assert (result.as_numpy("TIMING_CLIP_TEXT_MS") >= 0).all()


def test_text_and_image_embeddings_share_clips_space_and_logit_scale(client, tiny_paths):
    """The served text embedding against the served image embedding gives CLIPModel's own logits."""
    from mofserve.core.samples import sample_photos

    photo = sample_photos()[:1]
    image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[photo[0]]], dtype=object))
    image_embeds = client.infer("embed", [image]).as_numpy("CLIP_EMBEDS")
    text_embeds = client.infer("embed_text", [text_input(TEXTS[:2])]).as_numpy("TEXT_EMBEDS")
    config = client.get_model_config("embed_text").config
    scale = float(config.parameters["logit_scale"].string_value)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    served_logits = scale * unit(text_embeds) @ unit(image_embeds).T

    model = CLIPModel.from_pretrained(tiny_paths.clip).eval()
    assert math.isclose(scale, float(model.logit_scale.detach().exp()), rel_tol=1e-6)
    from mofserve.core.preprocessing import preprocess_bytes

    pixels = torch.from_numpy(preprocess_bytes(photo[0], 224)[None])
    encoded = AutoTokenizer.from_pretrained(tiny_paths.clip)(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(pixel_values=pixels, **encoded).logits_per_text.numpy()
    np.testing.assert_allclose(served_logits, logits, rtol=1e-3, atol=1e-3)


def test_rows_are_answered_as_if_alone_and_concurrent_requests_batch(client, reference):
    alone = np.concatenate([client.infer("embed_text", [text_input([t])]).as_numpy("TEXT_EMBEDS") for t in TEXTS])
    with concurrent.futures.ThreadPoolExecutor(len(TEXTS)) as pool:
        together = list(pool.map(lambda t: client.infer("embed_text", [text_input([t])]).as_numpy("TEXT_EMBEDS"),
                                 TEXTS))
    np.testing.assert_allclose(np.concatenate(together), alone, rtol=1e-5, atol=1e-6)
    assert min_row_cosine(alone, reference(TEXTS)) >= 0.9999


def test_text_that_is_not_utf8_fails_that_request_naming_the_field(client):
    with pytest.raises(InferenceServerException, match="text: row 0 is not UTF-8 text") as error:
        client.infer("embed_text", [text_input([b"\xff\xfe bad"])])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.infer("embed_text", [text_input(["still serving"])]).as_numpy("TEXT_EMBEDS").shape == (1, 24)
