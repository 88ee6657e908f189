"""The ``driffusion`` BLS model: moves tensors between Triton and ``driffusion.service``.

All logic (validation, tokenization, DRiffusion rounds, guidance) is in the plain module
``driffusion.service``; this file only adapts requests, responses and model calls.
A bad request gets INVALID_ARG with the field and the allowed range; a cancelled one CANCELLED;
a failing model call INTERNAL naming the model. The model itself never goes down.
"""

import asyncio
import traceback
from pathlib import Path

import triton_python_backend_utils as pb_utils

from driffusion import api
from driffusion.service import ModelCallError, Orchestrator, RequestCancelled


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        self.orchestrator = Orchestrator.load(folder)
        self.logger = pb_utils.Logger

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._handle(r) for r in requests)))

    async def _handle(self, request):
        error = pb_utils.TritonError
        try:
            values = {}
            for f in api.INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, f.name)
                values[f.name] = None if tensor is None else tensor.as_numpy()
            req = self.orchestrator.parse(values)
        except ValueError as exc:
            return pb_utils.InferenceResponse(error=error(str(exc), error.INVALID_ARG))
        try:
            out = await self.orchestrator.generate(req, self._infer, request.is_cancelled)
        except RequestCancelled as exc:
            return pb_utils.InferenceResponse(error=error(str(exc), error.CANCELLED))
        except Exception as exc:  # one request fails; the model keeps serving
            self.logger.log_error(f"driffusion request failed: {traceback.format_exc()}")
            return pb_utils.InferenceResponse(error=error(f"{type(exc).__name__}: {exc}"))
        tensors = [pb_utils.Tensor(name, array) for name, array in out.arrays().items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    async def _infer(self, model, inputs, outputs):
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
            requested_output_names=list(outputs),
        )
        response = await request.async_exec()
        if response.has_error():
            message = response.error().message()
            # a crashed stub stays down in Triton 2.51: retry the call on another instance
            unhealthy = "is not healthy" in message
            if unhealthy:
                reason = message.rstrip(".")
                self.logger.log_error(f"{model}: {reason}; retrying on another instance")
            raise ModelCallError(f"model {model} failed: {message}", retryable=unhealthy)
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}
