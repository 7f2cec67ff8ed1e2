"""Triton python-backend model ``fuse_<mode>`` of the ``gpu-torch`` target: the projectors
(``core.fusion.Fuser``, fp32) on the instance's GPU, reading the encoders' features on the
device by DLPack and handing the visual tokens to the LLM the same way.

Same contract as ``model_repository/fuse`` (the cpu target's): ``ALPHA`` is optional for
``additive`` (the profile's default applies) and a value outside [0, 1] fails that request
alone; ``TIMING_FUSION_MS`` [1] is the wall time of the batched projector call.
"""

import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from mofserve.core import tensors as T
from mofserve.core.checkpoints import load_fuser
from mofserve.core.fusion import alpha_column, check_alpha
from mofserve.model_repository.common import model_config, set_torch_threads


def _torch(tensor) -> torch.Tensor:
    return torch.from_dlpack(tensor.to_dlpack())


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_config(args)
        set_torch_threads(params)  # CPU instances (the GPU check's dry run)
        gpu = args.get("model_instance_kind") == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        if gpu:
            torch.cuda.set_device(self.device)
        self.mode = T.FusionMode.parse(params["mode"])
        self.default_alpha = check_alpha(float(params["default_alpha"]))
        self.fuser = load_fuser(params["llava"]).to(self.device)
        self.input_names = [i["name"] for i in config["input"] if i["name"] != T.ALPHA]

    def _alphas(self, request, rows: int) -> list[float]:
        tensor = pb_utils.get_input_tensor_by_name(request, T.ALPHA)
        values = None if tensor is None else _torch(tensor).reshape(-1).float().cpu().tolist()
        return alpha_column(values, rows, self.default_alpha)

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted, features, alphas = [], {name: [] for name in self.input_names}, []
        for i, request in enumerate(requests):
            tensors = {n: _torch(pb_utils.get_input_tensor_by_name(request, n)) for n in self.input_names}
            rows = next(iter(tensors.values())).shape[0]
            try:
                if self.mode is T.FusionMode.ADDITIVE:
                    alphas += self._alphas(request, rows)
            except ValueError as error:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
                continue
            accepted.append((i, rows))
            for name, tensor in tensors.items():
                features[name].append(tensor.to(self.device, torch.float32))
        if not accepted:
            return responses
        started = time.perf_counter()
        try:
            inputs = {n: torch.cat(v) for n, v in features.items()}
            alpha = torch.tensor(alphas, dtype=torch.float32, device=self.device) if alphas else None
            tokens = self.fuser(self.mode, inputs.get(T.CLIP_FEATURES), inputs.get(T.DINO_FEATURES), alpha)
            tokens = tokens.float().contiguous()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        except Exception as error:  # fails these requests, never the model
            for i, _ in accepted:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"fusion failed: {error}"))
            return responses
        elapsed_ms = (time.perf_counter() - started) * 1e3
        start = 0
        for i, rows in accepted:
            responses[i] = pb_utils.InferenceResponse(
                [pb_utils.Tensor.from_dlpack(T.VISUAL_TOKENS, to_dlpack(tokens[start:start + rows])),
                 pb_utils.Tensor(T.TIMING_FUSION, np.full((rows, 1), elapsed_ms, dtype=np.float32))])
            start += rows
        return responses
