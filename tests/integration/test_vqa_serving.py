"""The ``vqa_<mode>`` ensembles (preprocess -> encoders -> fuse -> llm) served by the real
tritonserver on the tiny profile, checked against the in-process ``VisualLanguageModel`` fed
with the visual tokens that ``tokens_<mode>`` returns. Random weights: answers are arbitrary
text, so the checks are on equality, shape and form, never on content.

The ``llm`` model streams (decoupled), so every request goes through Triton's streaming gRPC
(``ModelStreamInfer``), one row per request, read to the response Triton flags as final: a
response per generated token (``TEXT_DELTA``), then the whole answer (core/tensors.py).
"""

from __future__ import annotations

import concurrent.futures
import queue
import re

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mofserve.core import tensors as T
from mofserve.core.language_model import VisualLanguageModel
from mofserve.core.samples import sample_photos

pytestmark = pytest.mark.integration
MODES = ("clip", "dinov2", "additive", "interleaved")
QUESTION = "Is the dog facing left or right from the camera's perspective?"
OPTIONS = "(a) Left (b) Right"
ENCODER_TIMINGS = {"clip": [T.TIMING_CLIP], "dinov2": [T.TIMING_DINOV2],
                   "additive": [T.TIMING_CLIP, T.TIMING_DINOV2], "interleaved": [T.TIMING_CLIP, T.TIMING_DINOV2]}


@pytest.fixture(scope="module")
def vlm(tiny_paths, tiny_profile):
    threads = torch.get_num_threads()
    torch.set_num_threads(tiny_profile.serving.llm_threads)  # the server's llm runs with the same
    yield VisualLanguageModel.from_checkpoint(tiny_paths.llava,
                                              default_max_new_tokens=tiny_profile.serving.max_new_tokens)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return sample_photos()


@pytest.fixture(scope="module")
def client(tiny_triton):
    return grpcclient.InferenceServerClient(tiny_triton.grpc_url)


def text_input(name: str, values: list[bytes]):
    tensor = grpcclient.InferInput(name, [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[v] for v in values], dtype=np.object_))
    return tensor


def scalar_input(name: str, value, dtype: str):
    tensor = grpcclient.InferInput(name, [1, 1], dtype)
    tensor.set_data_from_numpy(np.array([[value]], dtype={"FP32": np.float32, "INT32": np.int32,
                                                          "INT64": np.int64}[dtype]))
    return tensor


class Streamed:
    """The responses to one streamed request, in order; ``as_numpy`` gives an output's latest value."""

    def __init__(self, results: list) -> None:
        self.results = results

    def as_numpy(self, name: str):
        for result in reversed(self.results):
            value = result.as_numpy(name)
            if value is not None:
                return value
        return None

    @property
    def deltas(self) -> list[str]:
        values = (r.as_numpy(T.TEXT_DELTA) for r in self.results)
        return [v[0, 0].decode("utf-8") for v in values if v is not None]


def stream(client, model: str, inputs, outputs=None) -> Streamed:
    """One request on its own stream, read to its final response (an error response raises)."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, outputs=outputs, enable_empty_final_response=True)
        results = []
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                raise error
            results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return Streamed(results)
    finally:
        client.stop_stream()  # half-closes and waits for the stream's end: a Triton stream is never cancelled


def ask(client, mode: str, image: bytes, question: str = QUESTION, options: str | None = OPTIONS, **scalars):
    inputs = [text_input(T.IMAGE, [image]), text_input(T.QUESTION, [question.encode()])]
    if options is not None:
        inputs.append(text_input(T.OPTIONS, [options.encode()]))
    dtypes = {T.MAX_NEW_TOKENS: "INT32", T.TEMPERATURE: "FP32", T.TOP_P: "FP32", T.SEED: "INT64", T.ALPHA: "FP32"}
    inputs += [scalar_input(name, value, dtypes[name]) for name, value in scalars.items()]
    return stream(client, f"vqa_{mode}", inputs)


def answer_text(result) -> str:
    return result.as_numpy(T.ANSWER)[0, 0].decode("utf-8")


def upstream_timings(result) -> dict[str, float]:
    return dict(zip(T.UPSTREAM_STAGES, result.as_numpy(T.UPSTREAM_TIMINGS)[0].tolist(), strict=True))


def served_tokens(client, mode: str, image: bytes, alpha: float | None = None) -> np.ndarray:
    inputs = [text_input(T.IMAGE, [image])]
    if alpha is not None:
        inputs.append(scalar_input(T.ALPHA, alpha, "FP32"))
    return client.infer(f"tokens_{mode}", inputs,
                        outputs=[grpcclient.InferRequestedOutput(T.VISUAL_TOKENS)]).as_numpy(T.VISUAL_TOKENS)[0]


@pytest.mark.parametrize("mode", MODES)
def test_vqa_streams_tokens_then_a_letter_two_scores_and_every_stage_timing(client, photos, mode):
    result = ask(client, mode, photos[0], MAX_NEW_TOKENS=8)
    assert len(result.results) >= 2 and answer_text(result) == "".join(result.deltas)
    assert result.as_numpy(T.CHOSEN_OPTION)[0, 0].decode() in {"a", "b"}
    scores = result.as_numpy(T.OPTION_SCORES)
    assert scores.shape == (1, 2) and np.all(np.isfinite(scores)) and np.all(scores <= 0)
    upstream = upstream_timings(result)  # echoed by llm: a streaming ensemble outputs only its last step's tensors
    for name in (T.TIMING_PREPROCESS, *ENCODER_TIMINGS[mode], T.TIMING_FUSION):
        assert upstream[name] >= 0, name
    assert all(np.isnan(v) for n, v in upstream.items() if n not in (T.TIMING_PREPROCESS, T.TIMING_FUSION,
                                                                     *ENCODER_TIMINGS[mode]))
    for name in (T.TIMING_LLM, T.TIMING_PREFILL, T.TIMING_DECODE):
        assert result.as_numpy(name)[0, 0] > 0, name
    assert result.as_numpy(T.FINISH_REASON)[0, 0] == b"length"  # random weights never emit EOS
    assert result.as_numpy(T.COMPLETION_TOKENS)[0, 0] == 8
    # the visual tokens never leave Triton on this path
    outputs = {o.name for o in client.get_model_metadata(f"vqa_{mode}").outputs}
    assert T.VISUAL_TOKENS not in outputs and T.CLIP_FEATURES not in outputs and T.DINO_FEATURES not in outputs


@pytest.mark.parametrize("mode", MODES)
def test_served_answer_equals_the_in_process_model_on_the_served_tokens(client, vlm, photos, mode):
    image = photos[1]
    result = ask(client, mode, image)  # the profile's default max_new_tokens, greedy
    want = vlm.answer(served_tokens(client, mode, image), QUESTION, OPTIONS)
    assert answer_text(result) == want.text
    assert result.as_numpy(T.PROMPT_TOKENS)[0, 0] == want.prompt_tokens
    assert result.as_numpy(T.COMPLETION_TOKENS)[0, 0] == want.generated_tokens
    assert result.as_numpy(T.CHOSEN_OPTION)[0, 0].decode() == want.chosen_option
    np.testing.assert_allclose(result.as_numpy(T.OPTION_SCORES)[0], want.option_scores, atol=1e-4)


def test_additive_alpha_reaches_the_tokens_the_llm_reads(client, vlm, photos):
    image = photos[2]
    result = ask(client, "additive", image, options='["Left", "Right"]', ALPHA=0.25, MAX_NEW_TOKENS=6)
    want = vlm.answer(served_tokens(client, "additive", image, alpha=0.25), QUESTION, '["Left", "Right"]',
                      max_new_tokens=6)
    assert answer_text(result) == want.text
    np.testing.assert_allclose(result.as_numpy(T.OPTION_SCORES)[0], want.option_scores, atol=1e-4)


def test_without_options_there_is_no_choice_and_no_score(client, photos):
    result = ask(client, "clip", photos[0], options=None, MAX_NEW_TOKENS=4)
    assert result.as_numpy(T.CHOSEN_OPTION)[0, 0] == b""
    assert result.as_numpy(T.OPTION_SCORES).shape == (1, 0)


def test_the_same_seed_samples_the_same_answer_through_the_server(client, vlm, photos):
    settings = dict(MAX_NEW_TOKENS=10, TEMPERATURE=1.0, TOP_P=0.9, SEED=1234)
    first = answer_text(ask(client, "interleaved", photos[3], **settings))
    assert answer_text(ask(client, "interleaved", photos[3], **settings)) == first
    want = vlm.answer(served_tokens(client, "interleaved", photos[3]), QUESTION, OPTIONS,
                      max_new_tokens=10, temperature=1.0, top_p=np.float32(0.9), seed=1234)
    assert first == want.text


@pytest.mark.parametrize("name, value, dtype, field", [
    (T.MAX_NEW_TOKENS, 0, "INT32", r"max_new_tokens: must be an integer within \[1, 512\]"),
    (T.MAX_NEW_TOKENS, 100000, "INT32", r"max_new_tokens: must be an integer within \[1, 512\]"),
    (T.TEMPERATURE, 3.0, "FP32", r"temperature: must be within \[0, 2\]"),
    (T.TOP_P, 0.0, "FP32", r"top_p: must be within \(0, 1\]"),
    (T.OPTIONS, "Left or right", "BYTES", "options: expected MMVP-style '\\(a\\) ... \\(b\\) ...'"),
])
def test_a_bad_value_fails_only_its_request_naming_the_field(client, photos, name, value, dtype, field):
    """The llm model's errors travel as data on its final response (a stream's error keeps no status code)."""
    kwargs = {"options": value} if name == T.OPTIONS else {name: value}
    result = ask(client, "clip", photos[0], **kwargs)
    assert result.as_numpy(T.FINISH_REASON)[0, 0] == b"error"
    assert result.as_numpy(T.ERROR_CODE)[0, 0] == b"invalid_argument"
    assert re.match(field, result.as_numpy(T.ERROR_MESSAGE)[0, 0].decode())
    assert answer_text(ask(client, "clip", photos[0], MAX_NEW_TOKENS=2)) is not None


def test_an_image_the_pipeline_cannot_decode_is_an_error_response_naming_it(client):
    with pytest.raises(InferenceServerException, match="image:"):
        ask(client, "clip", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)


def test_a_request_holds_one_sequence(client, photos):
    """A stream is one sequence: two rows in one request are refused (send two requests)."""
    both = stream(client, "vqa_dinov2", [text_input(T.IMAGE, photos[:2]),
                                         text_input(T.QUESTION, [QUESTION.encode(), b"What color is the sky?"])])
    assert both.as_numpy(T.FINISH_REASON)[0, 0] == b"error"
    assert both.as_numpy(T.ERROR_CODE)[0, 0] == b"invalid_argument"
    assert "one sequence per request" in both.as_numpy(T.ERROR_MESSAGE)[0, 0].decode()


def test_concurrent_requests_all_succeed_with_the_answer_they_get_alone(tiny_triton, client, photos):
    alone = {mode: answer_text(ask(client, mode, photos[4], MAX_NEW_TOKENS=6)) for mode in MODES}

    def call(i: int):
        mode = MODES[i % len(MODES)]
        own = grpcclient.InferenceServerClient(tiny_triton.grpc_url)
        return mode, ask(own, mode, photos[4], MAX_NEW_TOKENS=6)

    before = client.get_inference_statistics(T.LLM).model_stats[0].inference_count
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    for mode, result in results:
        assert answer_text(result) == alone[mode], mode  # batch-invariant: the same answer under load
        assert result.as_numpy(T.CHOSEN_OPTION)[0, 0].decode() in {"a", "b"}
    assert client.get_inference_statistics(T.LLM).model_stats[0].inference_count - before == 16
