"""Triton python-backend model ``tokenize_text``: UTF-8 text -> CLIP token ids (core.text).

The tokenizer is the CLIP checkpoint's own (parameter ``tokenizer``: the checkpoint folder), and
every row is padded or truncated to ``context_length`` (77) ids ending in ``<|endoftext|>``, as
OpenAI's ``clip.tokenize(..., truncate=True)``. Text that is not UTF-8 fails only its own request
(INVALID_ARG naming ``text``). ``TIMING_TOKENIZE_MS`` [1] is each row's share of its request's
tokenisation time.
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from mofserve.core import tensors as T
from mofserve.core.text import load_clip_tokenizer, tokenize
from mofserve.model_repository.common import model_config


def _texts(request) -> list[str]:
    values = pb_utils.get_input_tensor_by_name(request, T.TEXT).as_numpy().reshape(-1)
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"text: row {i} is not UTF-8 text") from None
        texts.append(str(value))
    return texts


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config(args)
        self.tokenizer = load_clip_tokenizer(params["tokenizer"])
        self.context_length = int(params["context_length"])

    def execute(self, requests):
        responses = []
        for request in requests:
            started = time.perf_counter()
            try:
                texts = _texts(request)
            except ValueError as error:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)))
                continue
            ids = tokenize(self.tokenizer, texts, self.context_length)
            share = (time.perf_counter() - started) * 1e3 / max(len(texts), 1)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(T.INPUT_IDS, ids),
                pb_utils.Tensor(T.TIMING_TOKENIZE, np.full((len(texts), 1), share, dtype=np.float32))]))
        return responses
