"""Triton python-backend model of the ``gpu-torch`` target for one encoder (``clip_vision``,
``dinov2_vision`` or ``clip_text``): the export wrapper as a PyTorch module on the instance's
GPU in bf16 (``export.torch_runtime``), no ONNX.

Start-up loads the checkpoint named in the config, runs the accuracy gate against fp32 (the
min cosine goes to Triton's log; below 0.999 ``initialize`` raises, so the model, and with it
the server, does not come up) and warms up every batch bucket (compiling it when the config asks
for ``torch.compile``) and the feature cache's key. Tensors come in and go out by DLPack: with
``FORCE_CPU_ONLY_INPUT_TENSORS`` off, the features stay on the device for the fusion model.

Same behaviour as the cpu target's ``vision_encoder`` (the lookup / miss-batch / fill logic is
the one ``core.feature_cache.lookup_or_run``): the requests of a dynamic batch are copied to the
device once, each row's content key is computed THERE (``core.feature_cache.TensorKeys``: only
64 bytes per row come back to the host, never the image), the rows not in the feature cache run
as one padded batch, and the cache keeps whole per-row outputs on the device, in the serving
dtype (bf16 on a GPU: the fp32 outputs are those values widened, so a hit is bit-identical to a
miss), bounded by ``feature_cache_bytes`` per instance. Hits and misses count into
``mofserve_encoder_cache_total{model, result}``; the timing output (``TIMING_CLIP_MS`` /
``TIMING_DINOV2_MS`` / ``TIMING_CLIP_TEXT_MS`` [1], host memory) is the batch's lookup plus, for a
row that missed, the wall time of the encoder call (synchronised): ~0 for a cached row.
Token ids outside the text tower's vocabulary fail that request alone (INVALID_ARG) before they
reach the device.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from mofserve.core import tensors as T
from mofserve.core.feature_cache import CacheCounter, FeatureCache, TensorKeys, lookup_or_run
from mofserve.export.torch_runtime import load_from_parameters
from mofserve.model_repository.common import model_config, set_torch_threads


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_config(args)
        set_torch_threads(params)  # CPU instances (the GPU check's dry run)
        self.name = config["name"]
        gpu = args.get("model_instance_kind") == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        if gpu:
            torch.cuda.set_device(self.device)
        self.encoder = load_from_parameters(params, device=self.device,
                                            log=lambda message: pb_utils.Logger.log_info(f"{self.name}: {message}"))
        pb_utils.Logger.log_info(self.encoder.gate.line(self.name) if self.encoder.gate else f"{self.name}: no gate")
        self.input_name = config["input"][0]["name"]
        outputs = [o["name"] for o in config["output"]]
        self.timing_names = [n for n in outputs if T.is_timing(n)]
        self.output_names = [n for n in outputs if n not in self.timing_names]  # the module's outputs
        missing = set(self.output_names) - set(self.encoder.output_names)
        if missing:
            raise ValueError(f"{self.name}: config outputs {sorted(missing)} are not outputs of the module")
        self.cache = FeatureCache(int(params.get("feature_cache_bytes", "0")))
        self.keys = TensorKeys()
        if self.cache.max_bytes and self.encoder.row_example is not None:
            self.keys(self.encoder.row_example.to(self.device))  # the key's weights go to the device now
        self.count_cache = CacheCounter(pb_utils, self.name)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _run(self, batch: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
        if indices != list(range(batch.shape[0])):
            batch = batch[torch.tensor(indices, device=batch.device)]
        outputs = self.encoder(batch, out_dtype=None)  # the serving dtype: what the cache keeps
        self._synchronize()  # the timing is the encoder's wall time, not its launch
        return {name: t for name, t in zip(self.encoder.output_names, outputs, strict=True)
                if name in self.output_names}

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted, inputs = [], []
        for i, request in enumerate(requests):
            tensor = torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, self.input_name).to_dlpack())
            try:
                self.encoder.check_ids(tensor)
            except ValueError as error:  # that request alone
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
                continue
            accepted.append(i)
            inputs.append(tensor)
        if not accepted:
            return responses
        try:
            batch = torch.cat([t.to(self.device) for t in inputs])  # one copy to the device; misses run from it
            result = lookup_or_run(self.cache, int(batch.shape[0]), keys=lambda: self.keys(batch),
                                   run=lambda indices: self._run(batch, indices), counted=self.count_cache)
            start, built = 0, []
            for tensor in inputs:
                stop = start + tensor.shape[0]
                rows = result.outputs[start:stop]
                # a fresh fp32 tensor per request: never a cached entry handed to Triton
                outputs = [(name, torch.stack([row[name] for row in rows]).to(torch.float32).contiguous())
                           for name in self.output_names]
                timing = np.array(result.elapsed_ms[start:stop], dtype=np.float32).reshape(-1, 1)
                built.append((outputs, timing))
                start = stop
            self._synchronize()  # ready before Triton reads them
        except Exception as error:  # a failure fails these requests, never the model; nothing is cached
            message = f"{self.input_name}: {self.name} failed: {error}"
            for i in accepted:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
            return responses
        for i, (outputs, timing) in zip(accepted, built, strict=True):
            tensors = [pb_utils.Tensor.from_dlpack(name, to_dlpack(t)) for name, t in outputs]
            tensors += [pb_utils.Tensor(name, timing) for name in self.timing_names]
            responses[i] = pb_utils.InferenceResponse(tensors)
        return responses
