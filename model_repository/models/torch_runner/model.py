"""Triton python-backend model that runs one pipeline component with PyTorch (the ``torch`` engine).

``<version>/component/`` holds the module as diffusers or transformers saved it
(``driffusion.export.torch_modules``); it runs behind the same spec wrapper the ONNX export
traces, so its inputs and outputs are the spec's. Each instance runs on the device Triton gives
it: ``KIND_GPU`` instances on their own GPU in the ``dtype`` parameter (float16 by default),
``KIND_CPU`` instances in float32.

Outputs of a GPU instance stay on the GPU and go back through DLPack, as a TensorRT model's would;
the orchestrator asks Triton for them in host memory.

Parameters (``config.pbtxt``, string values):

- ``dtype``: ``float16`` | ``float32`` on a GPU (the CPU always runs float32);
- ``input_shapes``, ``dim_bounds`` (JSON): the shapes a request may have; anything else is refused
  with INVALID_ARG before any memory is allocated for it;
- ``intra_op_threads`` (CPU, default 1): torch threads of this process.
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from driffusion.export.torch_modules import load_component
from driffusion.tensors import check_shapes


def _device(args) -> str:
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return f"cuda:{int(args['model_instance_device_id'])}"
    return "cpu"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.device = _device(args)
        dtype = params.get("dtype", "float32") if self.device != "cpu" else "float32"
        if self.device == "cpu":
            torch.set_num_threads(int(params.get("intra_op_threads", 1)))
        else:
            torch.cuda.set_device(self.device)
        folder = Path(args["model_repository"]) / args["model_version"] / "component"
        self.module, self.spec = load_component(folder, device=self.device, dtype=dtype)
        self.dtype = getattr(torch, dtype)
        self.declared = {k: tuple(v) for k, v in json.loads(params["input_shapes"]).items()}
        self.bounds = {k: tuple(v) for k, v in json.loads(params["dim_bounds"]).items()}

    def _inputs(self, request) -> list[torch.Tensor]:
        tensors = {}
        for spec in self.spec.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise ValueError(f"missing input '{spec.name}'")
            tensors[spec.name] = tensor
        check_shapes(self.declared, self.bounds, {n: tuple(t.shape()) for n, t in tensors.items()})
        out = []
        for spec in self.spec.inputs:
            t = tensors[spec.name]
            value = (
                torch.from_numpy(t.as_numpy()) if t.is_cpu() else torch.from_dlpack(t.to_dlpack())
            )
            value = value.to(self.device, non_blocking=True)
            out.append(value.to(self.dtype) if value.is_floating_point() else value)
        return out

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                inputs = self._inputs(request)
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            try:
                with torch.inference_mode():
                    outputs = self.module(*inputs)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                tensors = [
                    self._tensor(spec.name, value, spec.dtype)
                    for spec, value in zip(self.spec.outputs, outputs, strict=True)
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # one request fails; the model keeps serving
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses

    def _tensor(self, name: str, value: torch.Tensor, dtype: str):
        value = value.to(getattr(torch, dtype)).contiguous()
        if value.is_cuda:  # stays on the device, as a TensorRT engine's output would
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value))
        return pb_utils.Tensor(name, np.ascontiguousarray(value.numpy()))

    def finalize(self):
        self.module = None
