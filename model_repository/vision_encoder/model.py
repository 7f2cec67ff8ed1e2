"""Triton python-backend model for one exported encoder graph: the vision towers (``clip_vision``,
``dinov2_vision``) and CLIP's text tower (``clip_text``: ``INPUT_IDS`` int64 -> ``TEXT_EMBEDS``).
The input, outputs and timing come from the model's config, so one source serves all three.

Dynamic batching hands ``execute`` several requests at once; the image rows not found in the
feature cache run as ONE call of the ONNX graph (the batch axis is dynamic) and the outputs are
split back per request. The feature cache (core.feature_cache) is why a second fusion mode on
an image already seen costs no encoder time; its hits and misses are Prometheus counters on
Triton's metrics port (``mofserve_encoder_cache_total{model, result}``). The timing output
(``TIMING_CLIP_MS`` / ``TIMING_DINOV2_MS`` [1]) is each row's cache lookup plus, for a miss, the
wall time of the graph call that computed it: ~0 for a row answered from the cache.
"""

import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mofserve.core import tensors as T
from mofserve.core.feature_cache import FeatureCache, content_key
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
        # the family must outlive its metrics: keep it on the instance
        self.metric_family = family = pb_utils.MetricFamily(name="mofserve_encoder_cache_total",
                                       description="encoder feature-cache lookups by result",
                                       kind=pb_utils.MetricFamily.COUNTER)
        self.hit_metric = family.Metric(labels={"model": self.name, "result": "hit"})
        self.miss_metric = family.Metric(labels={"model": self.name, "result": "miss"})

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        rows = [row for array in arrays for row in array]
        keys, found, elapsed_ms = [], [], []
        for row in rows:
            started = time.perf_counter()
            key = content_key(row) if self.cache.max_bytes else None
            keys.append(key)
            found.append(self.cache.get(key) if key is not None else None)
            elapsed_ms.append((time.perf_counter() - started) * 1e3)
        missing = [i for i, entry in enumerate(found) if entry is None]
        # the same image twice in one batch (e.g. the modes of a Compare) runs once
        slots: dict[object, int] = {}
        representatives: list[int] = []
        for i in missing:
            key = keys[i] if keys[i] is not None else i
            if key not in slots:
                slots[key] = len(representatives)
                representatives.append(i)
        self.hit_metric.increment(len(rows) - len(representatives))
        self.miss_metric.increment(len(representatives))
        if missing:
            started = time.perf_counter()
            batch = np.ascontiguousarray(np.stack([rows[i] for i in representatives]))
            try:
                outputs = self.runner.run({self.input_name: batch})
            except Exception as error:  # a runtime failure fails these requests, never the model
                message = f"{self.input_name}: {self.name} failed: {error}"
                return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
            run_ms = (time.perf_counter() - started) * 1e3
            for i in missing:
                slot = slots[keys[i] if keys[i] is not None else i]
                elapsed_ms[i] += run_ms
                found[i] = {name: outputs[name][slot] for name in self.output_names}
                if keys[i] is not None:
                    self.cache.put(keys[i], found[i])
        responses, start = [], 0
        for array in arrays:
            stop = start + array.shape[0]
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(np.stack([found[i][name]
                                                                             for i in range(start, stop)])))
                       for name in self.output_names]
            timing = np.array(elapsed_ms[start:stop], dtype=np.float32).reshape(-1, 1)
            tensors += [pb_utils.Tensor(name, timing) for name in self.timing_names]
            responses.append(pb_utils.InferenceResponse(tensors))
            start = stop
        return responses
