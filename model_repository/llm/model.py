"""Triton python-backend model ``llm``: visual tokens + question -> answer (core.language_model).

Inputs per batch row: ``VISUAL_TOKENS`` [N, H] (N depends on the fusion mode), ``QUESTION`` and
the optional ``OPTIONS``, ``MAX_NEW_TOKENS``, ``TEMPERATURE``, ``TOP_P``, ``SEED``. Outputs:
``ANSWER``, ``CHOSEN_OPTION`` ("" without options), ``OPTION_SCORES`` (mean log-probability per
option token, in option order; rows of one request with fewer options are padded with NaN) and
``TIMING_LLM_MS``. Rows run one at a time (the module doc of core.language_model says why); a
bad value fails only its own request with INVALID_ARG naming the field and its limit.
"""

import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from mofserve.core import tensors as T
from mofserve.core.language_model import VisualLanguageModel
from mofserve.model_repository.common import model_config, set_torch_threads

_OPTIONAL = ((T.MAX_NEW_TOKENS, "max_new_tokens"), (T.TEMPERATURE, "temperature"), (T.TOP_P, "top_p"),
             (T.SEED, "seed"))


def _text(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name}: must be UTF-8 text") from None
    return str(value)


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_config(args)
        set_torch_threads(params)
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        self.vlm = VisualLanguageModel.from_checkpoint(
            params["llava"], dtype=params.get("dtype", "float32"), device=device,
            default_max_new_tokens=int(params["max_new_tokens"]),
            max_new_tokens_limit=int(params["max_new_tokens_limit"]))
        self.logger = pb_utils.Logger
        if params.get("random_weights", "false") == "true":
            self.logger.log_warn(f"llm: profile {params.get('profile', '?')} has seeded random weights; "
                                 "its answers are arbitrary text and carry no meaning")
        # the family must outlive its metrics: keep it on the instance
        self.metric_family = family = pb_utils.MetricFamily(
            name="mofserve_llm_tokens_total", description="tokens read (prompt, visual included) and generated",
            kind=pb_utils.MetricFamily.COUNTER)
        self.prompt_metric = family.Metric(labels={"model": config["name"], "kind": "prompt"})
        self.generated_metric = family.Metric(labels={"model": config["name"], "kind": "generated"})

    @staticmethod
    def _visual(request):
        """[rows, N, H]: a numpy array, or a torch tensor where a GPU model hands it over on the device."""
        tensor = pb_utils.get_input_tensor_by_name(request, T.VISUAL_TOKENS)
        if tensor.is_cpu():
            return tensor.as_numpy()
        return torch.from_dlpack(tensor.to_dlpack())

    @staticmethod
    def _column(request, name: str, rows: int) -> list | None:
        """One value per row of an optional [rows, 1] input (a single value applies to every row)."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        values = tensor.as_numpy().reshape(-1).tolist()
        if len(values) not in (1, rows):
            raise ValueError(f"{name.lower()}: expected one value per batch row ({rows}), got {len(values)}")
        return values if len(values) == rows else values * rows

    def _answer_request(self, request):
        visual = self._visual(request)
        rows = visual.shape[0]
        questions = self._column(request, T.QUESTION, rows)
        options = self._column(request, T.OPTIONS, rows) or [None] * rows
        settings = {key: self._column(request, name, rows) for name, key in _OPTIONAL}
        answers, timings = [], []
        for i in range(rows):
            started = time.perf_counter()
            kwargs = {key: None if values is None else values[i] for key, values in settings.items()}
            option_text = None if options[i] is None else _text(options[i], "options")
            answer = self.vlm.answer(visual[i], _text(questions[i], "question"), option_text, **kwargs)
            answers.append(answer)
            timings.append((time.perf_counter() - started) * 1e3)
            self.prompt_metric.increment(answer.prompt_tokens)
            self.generated_metric.increment(answer.generated_tokens)
        width = max(len(a.option_scores) for a in answers)
        scores = np.full((rows, width), np.nan, dtype=np.float32)
        for i, a in enumerate(answers):
            scores[i, :len(a.option_scores)] = a.option_scores
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(T.ANSWER, np.array([[a.text.encode()] for a in answers], dtype=np.object_)),
            pb_utils.Tensor(T.CHOSEN_OPTION, np.array([[a.chosen_option.encode()] for a in answers],
                                                      dtype=np.object_)),
            pb_utils.Tensor(T.OPTION_SCORES, scores),
            pb_utils.Tensor(T.TIMING_LLM, np.array(timings, dtype=np.float32).reshape(rows, 1)),
        ])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._answer_request(request))
            except ValueError as error:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)))
            except Exception as error:  # a failure of one request never takes the model down
                self.logger.log_error(f"llm: request failed: {error!r}")
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"llm: generation failed: {error}")))
        return responses
