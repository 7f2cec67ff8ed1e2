"""Triton python-backend model for one exported vision tower (``clip_vision``, ``dinov2_vision``).

Dynamic batching hands ``execute`` several requests at once; they run as ONE call of the ONNX
graph (the batch axis is dynamic) and the outputs are split back per request.

A request must ask for every output (clients that name no outputs do): Triton's response cache
keys on inputs only, and a cached partial response would be replayed to requests that need the
other output. Errors are never cached, so refusing partial requests keeps the cache whole.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mofserve.core.runtime import OnnxRunner


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.runner = OnnxRunner(version_dir / params.get("onnx_file", "model.onnx"),
                                 runtime=params.get("runtime", "onnxruntime"),
                                 threads=int(params.get("threads", "0")),
                                 precision=params.get("precision", "fp32"))
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        self.name = config["name"]

    def execute(self, requests):
        responses = [self._refusal(r) for r in requests]
        accepted = [r for r, refusal in zip(requests, responses, strict=True) if refusal is None]
        for request, response in zip(accepted, self._run(accepted), strict=True):
            responses[requests.index(request)] = response
        return responses

    def _refusal(self, request):
        requested = set(request.requested_output_names())
        if requested and requested != set(self.output_names):
            message = (f"outputs: {self.name} answers only requests for all of its outputs "
                       f"({', '.join(self.output_names)}), got {', '.join(sorted(requested))}; "
                       "its response cache replays whole responses")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
        return None

    def _run(self, requests):
        if not requests:
            return []
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            outputs = self.runner.run({self.input_name: np.ascontiguousarray(np.concatenate(arrays))})
        except Exception as error:  # a runtime failure fails these requests, never the model
            message = f"{self.input_name}: encoder failed: {error}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        responses, start = [], 0
        for array in arrays:
            stop = start + array.shape[0]
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.ascontiguousarray(outputs[name][start:stop]))
                 for name in self.output_names]))
            start = stop
        return responses
