"""Triton python-backend model ``preprocess``: image bytes -> CLIP-normalised pixels.

A bad image fails only its own request (INVALID_ARG, naming the field and the limit); the
other requests of the dynamic batch are answered normally and the model keeps serving.
``TIMING_PREPROCESS_MS`` [1] is each image's own decode-and-normalise time.
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from mofserve.core import tensors as T
from mofserve.core.preprocessing import ImageError, ImageLimits, preprocess_bytes
from mofserve.model_repository.common import model_config


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config(args)
        self.image_size = int(params["image_size"])
        self.aspect = params.get("aspect", "crop")
        self.limits = ImageLimits(max_bytes=int(params["max_bytes"]), max_pixels=int(params["max_pixels"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, T.IMAGE).as_numpy().reshape(-1)
            rows, timings = [], []
            try:
                for item in images:
                    started = time.perf_counter()
                    rows.append(preprocess_bytes(bytes(item), self.image_size, aspect=self.aspect,
                                                 limits=self.limits))
                    timings.append((time.perf_counter() - started) * 1e3)
            except ImageError as error:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(T.PIXEL_VALUES, np.stack(rows)),
                pb_utils.Tensor(T.TIMING_PREPROCESS, np.array(timings, dtype=np.float32).reshape(-1, 1))]))
        return responses
