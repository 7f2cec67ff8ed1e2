"""Triton python-backend model ``fuse_<mode>``: CLIP/DINOv2 patch features -> visual tokens.

The projectors come from the LLaVA-format checkpoint named in the config (only their keys are
read). For ``additive`` the per-request ``ALPHA`` is optional (the profile's default applies)
and a value outside [0, 1] fails that request alone. ``TIMING_FUSION_MS`` [1] is the wall time
of the batched projector call that produced the row.
"""

import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from mofserve.core import tensors as T
from mofserve.core.checkpoints import load_fuser
from mofserve.core.fusion import alpha_column, check_alpha
from mofserve.model_repository.common import model_config, set_torch_threads


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_config(args)
        set_torch_threads(params)
        self.mode = T.FusionMode.parse(params["mode"])
        self.default_alpha = check_alpha(float(params["default_alpha"]))
        self.fuser = load_fuser(params["llava"])
        self.input_names = [i["name"] for i in config["input"] if i["name"] != T.ALPHA]

    def _alpha(self, request, batch: int) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, T.ALPHA)
        values = None if tensor is None else tensor.as_numpy().reshape(-1).tolist()
        return np.asarray(alpha_column(values, batch, self.default_alpha), dtype=np.float32)

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted, features, alphas = [], {name: [] for name in self.input_names}, []
        for i, request in enumerate(requests):
            arrays = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}
            batch = next(iter(arrays.values())).shape[0]
            try:
                if self.mode is T.FusionMode.ADDITIVE:
                    alphas.append(self._alpha(request, batch))
            except ValueError as error:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
                continue
            accepted.append((i, batch))
            for name, array in arrays.items():
                features[name].append(array)
        if accepted:
            started = time.perf_counter()
            inputs = {n: torch.from_numpy(np.concatenate(v)) for n, v in features.items()}
            alpha = torch.from_numpy(np.concatenate(alphas)) if alphas else None
            tokens = self.fuser(self.mode, inputs.get(T.CLIP_FEATURES), inputs.get(T.DINO_FEATURES), alpha)
            tokens = tokens.float().numpy()
            elapsed_ms = (time.perf_counter() - started) * 1e3
            start = 0
            for i, batch in accepted:
                responses[i] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(T.VISUAL_TOKENS, np.ascontiguousarray(tokens[start:start + batch])),
                     pb_utils.Tensor(T.TIMING_FUSION, np.full((batch, 1), elapsed_ms, dtype=np.float32))])
                start += batch
        return responses
