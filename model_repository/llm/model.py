"""Triton python-backend model ``llm``: visual tokens + question -> a stream of tokens.

Decoupled (``model_transaction_policy { decoupled: true }``): ``execute`` hands each request to
the in-flight batching engine (core.llm_engine) and returns at once, so requests that arrive
while others decode join the running batch after their prefill; the engine's thread sends one
response per generated token and a final one (core.tensors, "the `llm` model streams").

One row per request (a sequence is a stream). A request carrying ``CANCEL`` and a
``REQUEST_ID`` ends that sequence (finish reason "cancelled") and frees its slot: the front-end
sends one when its client goes away, because cancelling the Triton gRPC call itself crashes
Triton 2.51 (server#7368). Errors are final responses carrying ``ERROR_CODE`` and
``ERROR_MESSAGE`` (the field first): Triton's streaming gRPC would keep only an error's text.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from mofserve.core import tensors as T
from mofserve.core.errors import FieldError
from mofserve.core.language_model import VisualLanguageModel
from mofserve.core.llm_engine import CapacityError, Delta, Event, Failed, Finished, LLMEngine
from mofserve.model_repository.common import model_config, set_torch_threads

_OPTIONAL = ((T.MAX_NEW_TOKENS, "max_new_tokens"), (T.TEMPERATURE, "temperature"), (T.TOP_P, "top_p"),
             (T.SEED, "seed"))
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _text(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise FieldError(name, "must be UTF-8 text") from None
    return str(value)


def _string(name: str, value: str) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([[value.encode()]], dtype=np.object_))


def _number(name: str, value: float, dtype=np.float32) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([[value]], dtype=dtype))


def _scores(values) -> pb_utils.Tensor:
    return pb_utils.Tensor(T.OPTION_SCORES, np.array([list(values)], dtype=np.float32).reshape(1, -1))


def error_response(code: str, message: str, field: str | None = None) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse([_string(T.FINISH_REASON, "error"), _string(T.ERROR_CODE, code),
                                       _string(T.ERROR_MESSAGE, message), _string(T.ERROR_FIELD, field or "")])


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_config(args)
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("llm: the model streams; its config must be decoupled")
        set_torch_threads(params)
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        vlm = VisualLanguageModel.from_checkpoint(
            params["llava"], dtype=params.get("dtype", "float32"), device=device,
            default_max_new_tokens=int(params["max_new_tokens"]),
            max_new_tokens_limit=int(params["max_new_tokens_limit"]))
        self.engine = LLMEngine(vlm, max_sequences=int(params.get("max_sequences", "8")),
                                kv_cache_mb=int(params.get("kv_cache_mb", "0")),
                                prefill_chunk=int(params.get("prefill_chunk", "0")))
        self.logger = pb_utils.Logger
        if params.get("random_weights", "false") == "true":
            self.logger.log_warn(f"llm: profile {params.get('profile', '?')} has seeded random weights; "
                                 "its answers are arbitrary text and carry no meaning")
        geometry = self.engine.geometry
        self.logger.log_info(f"llm: in-flight batching, {geometry.slots} sequence slots of {geometry.slot_tokens} "
                             f"tokens ({geometry.bytes / 2**20:.0f} MiB of KV cache, {vlm.dtype}, {device})")
        # the families must outlive their metrics: keep them on the instance
        name = config["name"]
        self.token_family = pb_utils.MetricFamily(
            name="mofserve_llm_tokens_total", description="tokens read (prompt, visual included) and generated",
            kind=pb_utils.MetricFamily.COUNTER)
        self.prompt_metric = self.token_family.Metric(labels={"model": name, "kind": "prompt"})
        self.generated_metric = self.token_family.Metric(labels={"model": name, "kind": "generated"})
        self.finish_family = pb_utils.MetricFamily(
            name="mofserve_llm_finished_total", description="sequences ended, by finish reason",
            kind=pb_utils.MetricFamily.COUNTER)
        self.finish_metrics = {reason: self.finish_family.Metric(labels={"model": name, "reason": reason})
                               for reason in T.FINISH_REASONS}
        self.batch_family = pb_utils.MetricFamily(
            name="mofserve_llm_batch_rows_total", description="decode steps run and the sequences they served "
            "(rows / steps = mean in-flight batch)", kind=pb_utils.MetricFamily.COUNTER)
        self.step_metric = self.batch_family.Metric(labels={"model": name, "kind": "steps"})
        self.row_metric = self.batch_family.Metric(labels={"model": name, "kind": "rows"})
        self._counted = (0, 0)

    # ---- requests ---------------------------------------------------------------------------

    @staticmethod
    def _input(request, name: str):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        if tensor.is_cpu():
            return tensor.as_numpy()
        return torch.from_dlpack(tensor.to_dlpack())  # a GPU fuse model hands the tokens over on the device

    def _scalar(self, request, name: str):
        value = self._input(request, name)
        if value is None:
            return None
        values = np.asarray(value).reshape(-1)
        if values.size != 1:
            raise FieldError(name.lower(), f"expected one value per request, got {values.size}")
        return values[0].item() if hasattr(values[0], "item") else values[0]

    def _start(self, request, sender) -> None:
        received = time.perf_counter()
        request_id = self._scalar(request, T.REQUEST_ID)
        request_id = _text(request_id, "request_id") if request_id is not None else uuid.uuid4().hex
        if self._scalar(request, T.CANCEL):
            self.engine.cancel(request_id)
            sender.send(flags=_FINAL)
            return
        visual = self._input(request, T.VISUAL_TOKENS)
        if visual is None:
            raise FieldError("visual_tokens", "required (only a CANCEL request goes without)")
        if visual.shape[0] != 1:
            raise FieldError("visual_tokens", f"one sequence per request (it streams), got {visual.shape[0]}")
        question = self._scalar(request, T.QUESTION)
        if question is None:
            raise FieldError("question", "required")
        options = self._scalar(request, T.OPTIONS)
        settings = {key: self._scalar(request, name) for name, key in _OPTIONAL}
        sampling = self.engine.vlm.sampling(**settings)
        upstream = [self._scalar(request, name) for name in T.UPSTREAM_STAGES]
        upstream = np.array([[np.nan if v is None else v for v in upstream]], dtype=np.float32)
        self.engine.submit(request_id, visual[0], _text(question, "question"),
                           None if options is None else _text(options, "options"), sampling,
                           emit=lambda event: self._send(sender, event, received, upstream))

    def _send(self, sender, event: Event, received: float, upstream: np.ndarray) -> None:
        """One engine event -> one response (called from the engine's thread)."""
        if isinstance(event, Delta):
            outputs = [_string(T.TEXT_DELTA, event.text)]
            if event.first:
                outputs += [_string(T.CHOSEN_OPTION, event.chosen_option), _scores(event.option_scores),
                            _number(T.TIMING_LLM_QUEUE, event.queue_ms), _number(T.TIMING_PREFILL, event.prefill_ms),
                            pb_utils.Tensor(T.UPSTREAM_TIMINGS, upstream)]
            sender.send(pb_utils.InferenceResponse(outputs))
            return
        if isinstance(event, Failed):
            self.logger.log_error(f"llm: {event.request_id}: generation failed: {event.error!r}")
            self.finish_metrics["error"].increment(1)
            sender.send(error_response("internal", f"llm: generation failed: {event.error}"), flags=_FINAL)
            return
        assert isinstance(event, Finished)
        self.prompt_metric.increment(event.prompt_tokens)
        self.generated_metric.increment(event.completion_tokens)
        self.finish_metrics[event.finish_reason].increment(1)
        self._count_steps()
        sender.send(pb_utils.InferenceResponse([
            _string(T.TEXT_DELTA, ""), _string(T.ANSWER, event.answer), _string(T.CHOSEN_OPTION, event.chosen_option),
            _scores(event.option_scores), _string(T.FINISH_REASON, event.finish_reason),
            _number(T.PROMPT_TOKENS, event.prompt_tokens, np.int32),
            _number(T.COMPLETION_TOKENS, event.completion_tokens, np.int32),
            _number(T.TIMING_LLM, (time.perf_counter() - received) * 1e3),
            _number(T.TIMING_LLM_QUEUE, event.queue_ms), _number(T.TIMING_PREFILL, event.prefill_ms),
            _number(T.TIMING_DECODE, event.decode_ms)]), flags=_FINAL)

    def _count_steps(self) -> None:
        steps, rows = self.engine.steps, self.engine.batched_rows
        self.step_metric.increment(steps - self._counted[0])
        self.row_metric.increment(rows - self._counted[1])
        self._counted = (steps, rows)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._start(request, sender)
            except ValueError as error:  # FieldError names its field as data
                sender.send(error_response("invalid_argument", str(error), getattr(error, "field", None)),
                            flags=_FINAL)
            except CapacityError as error:
                sender.send(error_response("resource_exhausted", str(error), error.field), flags=_FINAL)
            except Exception as error:  # a failure of one request never takes the model down
                self.logger.log_error(f"llm: request failed: {error!r}")
                sender.send(error_response("internal", f"llm: {error}"), flags=_FINAL)
        return None

    def finalize(self):
        self.engine.close()
