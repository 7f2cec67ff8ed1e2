"""Triton python-backend model ``preprocess``: image bytes -> CLIP-normalised pixels.

A bad image fails only its own request (INVALID_ARG, naming the field and the limit); the
other requests of the dynamic batch are answered normally and the model keeps serving.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from mofserve.core import tensors as T
from mofserve.core.preprocessing import ImageError, ImageLimits, preprocess_bytes


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.image_size = int(params["image_size"])
        self.aspect = params.get("aspect", "crop")
        self.limits = ImageLimits(max_bytes=int(params["max_bytes"]), max_pixels=int(params["max_pixels"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, T.IMAGE).as_numpy().reshape(-1)
            try:
                pixels = np.stack([preprocess_bytes(bytes(item), self.image_size, aspect=self.aspect,
                                                    limits=self.limits) for item in images])
            except ImageError as error:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(T.PIXEL_VALUES, pixels)]))
        return responses
