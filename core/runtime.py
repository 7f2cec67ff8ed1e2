"""Runs an exported ONNX graph on the CPU with ONNX Runtime or OpenVINO.

One class shared by the Triton python-backend models, the export parity check and the
in-process baselines of the benchmarks, so that they all measure the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")


class OnnxRunner:
    """An ONNX graph compiled for one runtime; ``run`` maps input names to output arrays."""

    def __init__(self, path: Path | str, runtime: str = "onnxruntime", threads: int = 0,
                 precision: str = "fp32") -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime: unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if runtime == "onnxruntime" and precision != "fp32":
            raise ValueError("precision: ONNX Runtime on the CPU runs fp32 here; use runtime=openvino for bf16")
        self.path, self.runtime, self.precision = Path(path), runtime, precision
        if runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads:
                options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self._session.get_inputs()]
            self.output_names = [o.name for o in self._session.get_outputs()]
        else:
            import openvino as ov

            config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                                         "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            self._compiled = ov.Core().compile_model(str(path), "CPU", config)
            self.input_names = [i.get_any_name() for i in self._compiled.inputs]
            self.output_names = [o.get_any_name() for o in self._compiled.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.runtime == "onnxruntime":
            outputs = self._session.run(self.output_names, dict(inputs))
            return dict(zip(self.output_names, outputs, strict=True))
        request = self._compiled.create_infer_request()
        result = request.infer(dict(inputs))
        return {name: np.asarray(result[self._compiled.output(name)], dtype=np.float32)
                for name in self.output_names}
