"""The ``vqa_<mode>`` ensembles (preprocess -> encoders -> fuse -> llm) served by the real
tritonserver on the tiny profile, checked against the in-process ``VisualLanguageModel`` fed
with the visual tokens that ``tokens_<mode>`` returns. Random weights: answers are arbitrary
text, so the checks are on equality, shape and form, never on content."""

from __future__ import annotations

import concurrent.futures

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


def ask(client, mode: str, image: bytes, question: str = QUESTION, options: str | None = OPTIONS, **scalars):
    inputs = [text_input(T.IMAGE, [image]), text_input(T.QUESTION, [question.encode()])]
    if options is not None:
        inputs.append(text_input(T.OPTIONS, [options.encode()]))
    dtypes = {T.MAX_NEW_TOKENS: "INT32", T.TEMPERATURE: "FP32", T.TOP_P: "FP32", T.SEED: "INT64", T.ALPHA: "FP32"}
    inputs += [scalar_input(name, value, dtypes[name]) for name, value in scalars.items()]
    return client.infer(f"vqa_{mode}", inputs)


def answer_text(result, row: int = 0) -> str:
    return result.as_numpy(T.ANSWER)[row, 0].decode("utf-8")


def served_tokens(client, mode: str, image: bytes, alpha: float | None = None) -> np.ndarray:
    inputs = [text_input(T.IMAGE, [image])]
    if alpha is not None:
        inputs.append(scalar_input(T.ALPHA, alpha, "FP32"))
    return client.infer(f"tokens_{mode}", inputs,
                        outputs=[grpcclient.InferRequestedOutput(T.VISUAL_TOKENS)]).as_numpy(T.VISUAL_TOKENS)[0]


@pytest.mark.parametrize("mode", MODES)
def test_vqa_answers_with_a_letter_two_scores_and_every_stage_timing(client, photos, mode):
    result = ask(client, mode, photos[0], MAX_NEW_TOKENS=8)
    assert isinstance(answer_text(result), str)
    assert result.as_numpy(T.CHOSEN_OPTION)[0, 0].decode() in {"a", "b"}
    scores = result.as_numpy(T.OPTION_SCORES)
    assert scores.shape == (1, 2) and np.all(np.isfinite(scores)) and np.all(scores <= 0)
    for name in (T.TIMING_PREPROCESS, *ENCODER_TIMINGS[mode], T.TIMING_FUSION, T.TIMING_LLM):
        timing = result.as_numpy(name)
        assert timing.shape == (1, 1) and timing[0, 0] >= 0, name
    assert result.as_numpy(T.TIMING_LLM)[0, 0] > 0
    # the visual tokens never leave Triton on this path
    outputs = {o.name for o in client.get_model_metadata(f"vqa_{mode}").outputs}
    assert T.VISUAL_TOKENS not in outputs and T.CLIP_FEATURES not in outputs and T.DINO_FEATURES not in outputs


@pytest.mark.parametrize("mode", MODES)
def test_served_answer_equals_the_in_process_model_on_the_served_tokens(client, vlm, photos, mode):
    image = photos[1]
    result = ask(client, mode, image)  # the profile's default max_new_tokens, greedy
    want = vlm.answer(served_tokens(client, mode, image), QUESTION, OPTIONS)
    assert answer_text(result) == want.text
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
    kwargs = {"options": value} if name == T.OPTIONS else {name: value}
    with pytest.raises(InferenceServerException, match=field) as error:
        ask(client, "clip", photos[0], **kwargs)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert answer_text(ask(client, "clip", photos[0], MAX_NEW_TOKENS=2)) is not None


def test_rows_of_one_request_are_answered_each_as_if_alone(client, photos):
    images, questions = photos[:2], [QUESTION.encode(), b"What color is the sky?"]
    both = client.infer("vqa_dinov2", [text_input(T.IMAGE, images), text_input(T.QUESTION, questions),
                                       text_input(T.OPTIONS, [OPTIONS.encode(), b""])])
    scores = both.as_numpy(T.OPTION_SCORES)
    assert scores.shape == (2, 2) and np.all(np.isnan(scores[1]))  # the row without options is padded
    assert [c[0] for c in both.as_numpy(T.CHOSEN_OPTION)][1] == b""
    alone = [ask(client, "dinov2", images[0]), ask(client, "dinov2", images[1], questions[1].decode(), None)]
    assert [answer_text(both, 0), answer_text(both, 1)] == [answer_text(r) for r in alone]
    np.testing.assert_allclose(scores[0], alone[0].as_numpy(T.OPTION_SCORES)[0], atol=1e-5)


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
