"""Triton python-backend model of the ``gpu-torch`` target for one encoder (``clip_vision``,
``dinov2_vision`` or ``clip_text``): the export wrapper as a PyTorch module on the instance's
GPU in bf16 (``export.torch_runtime``), no ONNX.

Start-up loads the checkpoint named in the config, runs the accuracy gate against fp32 (the
min cosine goes to Triton's log; below 0.999 ``initialize`` raises, so the model, and with it
the server, does not come up) and warms up every batch bucket (compiling it when the config asks
for ``torch.compile``). Requests of a dynamic batch run as one padded batch. Tensors come in
and go out by DLPack: with ``FORCE_CPU_ONLY_INPUT_TENSORS`` off, the features stay on the
device for the fusion model. No feature cache and no timing output (yet): Triton's per-model
statistics time this stage.
"""

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

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
        self.output_names = [o["name"] for o in config["output"]]
        missing = set(self.output_names) - set(self.encoder.output_names)
        if missing:
            raise ValueError(f"{self.name}: config outputs {sorted(missing)} are not outputs of the module")

    def execute(self, requests):
        inputs = [torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name).to_dlpack())
                  for r in requests]
        try:
            batch = torch.cat([t.to(self.device) for t in inputs])
            outputs = dict(zip(self.encoder.output_names, self.encoder(batch), strict=True))
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # ready before Triton reads them
        except Exception as error:  # a failure fails these requests, never the model
            message = f"{self.input_name}: {self.name} failed: {error}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        responses, start = [], 0
        for tensor in inputs:
            stop = start + tensor.shape[0]
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor.from_dlpack(name, to_dlpack(outputs[name][start:stop].contiguous()))
                 for name in self.output_names]))
            start = stop
        return responses
