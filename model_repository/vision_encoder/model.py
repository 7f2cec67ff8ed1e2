"""Triton python-backend model for one exported encoder graph: the vision towers (``clip_vision``,
``dinov2_vision``) and CLIP's text tower (``clip_text``: ``INPUT_IDS`` int64 -> ``TEXT_EMBEDS``).
The input, outputs and timing come from the model's config, so one source serves all three.

Dynamic batching hands ``execute`` several requests at once; the rows not found in the feature
cache run as ONE call of the ONNX graph (the batch axis is dynamic) and the outputs are split
back per request. The lookup / miss-batch / fill logic is ``core.feature_cache.lookup_or_run``,
shared with gpu-torch's ``torch_encoder``. The feature cache is why a second fusion mode on an
image already seen costs no encoder time; its hits and misses are Prometheus counters on
Triton's metrics port (``mofserve_encoder_cache_total{model, result}``). The timing output
(``TIMING_CLIP_MS`` / ``TIMING_DINOV2_MS`` / ``TIMING_CLIP_TEXT_MS`` [1]) is the batch's cache
lookup plus, for a row that missed, the wall time of the graph call that computed it: ~0 for a
row answered from the cache.
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mofserve.core import tensors as T
from mofserve.core.feature_cache import CacheCounter, FeatureCache, content_key, lookup_or_run
from mofserve.core.runtime import OnnxRunner
from mofserve.model_repository.common import model_config


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_config(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.runner = OnnxRunner(version_dir / params.get("onnx_file", "model.onnx"),
                                 runtime=params.get("runtime", "onnxruntime"),
                                 threads=int(params.get("threads", "0")),
                                 precision=params.get("precision", "fp32"))
        self.name = config["name"]
        self.input_name = config["input"][0]["name"]
        outputs = [o["name"] for o in config["output"]]
        self.timing_names = [n for n in outputs if T.is_timing(n)]
        self.output_names = [n for n in outputs if n not in self.timing_names]  # the graph's outputs
        self.cache = FeatureCache(int(params.get("feature_cache_bytes", "0")))
        self.count_cache = CacheCounter(pb_utils, self.name)

    def _run(self, rows: list, indices: list[int]) -> dict:
        batch = np.ascontiguousarray(np.stack([rows[i] for i in indices]))
        outputs = self.runner.run({self.input_name: batch})
        return {name: outputs[name] for name in self.output_names}

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        rows = [row for array in arrays for row in array]
        try:
            result = lookup_or_run(self.cache, len(rows), keys=lambda: [content_key(row) for row in rows],
                                   run=lambda indices: self._run(rows, indices), counted=self.count_cache)
        except Exception as error:  # a runtime failure fails these requests, never the model; nothing is cached
            message = f"{self.input_name}: {self.name} failed: {error}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        responses, start = [], 0
        for array in arrays:
            stop = start + array.shape[0]
            found = result.outputs[start:stop]
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(np.stack([f[name] for f in found])))
                       for name in self.output_names]
            timing = np.array(result.elapsed_ms[start:stop], dtype=np.float32).reshape(-1, 1)
            tensors += [pb_utils.Tensor(name, timing) for name in self.timing_names]
            responses.append(pb_utils.InferenceResponse(tensors))
            start = stop
        return responses
