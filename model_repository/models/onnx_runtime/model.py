"""Triton python-backend model that runs ``<version>/model.onnx`` with ONNX Runtime on CPU.

Input and output names and data types come from the model's ``config.pbtxt``; they must match the
ONNX graph (checked at load time, so a mismatch fails the load instead of every request).

Optional ``parameters`` in ``config.pbtxt`` (string values, as Triton requires):

- ``intra_op_threads`` (int, default 1): ONNX Runtime intra-op threads per instance.
- ``emulated_latency_ms`` (float, default 0): every ``execute`` call is padded with sleep to last
  at least this long from its start. It stands in for a GPU on a CPU machine, so that scheduling,
  batching and fan-out can be studied with realistic timings.
- ``emulated_latency_per_item_ms`` (float, default 0): extra padding per batch row, the rows being
  the first input's dim 0 summed over the requests of the call. Total padding:
  ``emulated_latency_ms + emulated_latency_per_item_ms * rows``.
- ``input_shapes``, ``dim_bounds`` (JSON, optional): the shapes a request may have (the spec's
  shapes, and the range of each named dim: the largest batch a valid ``driffusion`` request makes,
  the served sizes). Anything else is refused with INVALID_ARG before ONNX Runtime allocates for
  it: a model that any client can call must not take a 1024x1024 latent into a 16x16 model.
- ``emulated_compute_delay_ms`` (float, default 0; only while emulating): the model's own CPU
  work starts this long into the padded call. A GPU does that work on the device, leaving the
  host's cores to dispatch the round's other requests; on a CPU box the tiny model's real math
  would instead compete with that dispatch. Measured on 2 cores (4 concurrent calls padded to
  40 ms, 3.4 ms of CPU work each): the round's overhead beyond the pad is 7.5 ms with the work
  started at once, 3.5 ms with it started 3 ms in, and 3.4 ms with no work at all.

A request with bad inputs gets an error response naming the problem; the other requests of the
call, and the model, carry on.
"""

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from driffusion.tensors import check_shapes

# numpy dtype name -> ONNX Runtime type name, where they differ.
_ORT_TYPE_NAMES = {"float32": "float", "float64": "double", "object": "string"}


def _tensor_specs(entries):
    """[(name, numpy dtype)] from a config's ``input`` or ``output`` list."""
    return [(e["name"], np.dtype(pb_utils.triton_string_to_numpy(e["data_type"]))) for e in entries]


def _check_against_graph(kind, specs, graph_args):
    """Raise ValueError if config tensors and ONNX graph tensors differ in name or dtype."""
    graph = {a.name: a.type for a in graph_args}
    if set(graph) != {name for name, _ in specs}:
        raise ValueError(f"config {kind}s {[n for n, _ in specs]} != model.onnx {list(graph)}")
    for name, dtype in specs:
        expected = f"tensor({_ORT_TYPE_NAMES.get(dtype.name, dtype.name)})"
        if graph[name] != expected:
            raise ValueError(f"{kind} '{name}': config says {dtype.name}, model.onnx {graph[name]}")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.latency_s = float(params.get("emulated_latency_ms", 0)) / 1000
        self.latency_per_item_s = float(params.get("emulated_latency_per_item_ms", 0)) / 1000
        emulating = self.latency_s > 0 or self.latency_per_item_s > 0
        delay_s = float(params.get("emulated_compute_delay_ms", 0)) / 1000
        self.compute_delay_s = delay_s if emulating else 0.0

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", 1))
        options.inter_op_num_threads = 1
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = _tensor_specs(config["input"])
        self.outputs = _tensor_specs(config["output"])
        _check_against_graph("input", self.inputs, self.session.get_inputs())
        _check_against_graph("output", self.outputs, self.session.get_outputs())
        shapes = json.loads(params.get("input_shapes", "null"))
        self.declared = None if shapes is None else {k: tuple(v) for k, v in shapes.items()}
        self.bounds = {k: tuple(v) for k, v in json.loads(params.get("dim_bounds", "{}")).items()}

    def execute(self, requests):
        start = time.perf_counter()
        if self.compute_delay_s:
            time.sleep(self.compute_delay_s)
        responses, rows = [], 0
        for request in requests:
            try:
                tensors = {}
                for name, _ in self.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ValueError(f"missing input '{name}'")
                    tensors[name] = tensor
                if self.declared is not None:
                    shapes = {n: tuple(t.shape()) for n, t in tensors.items()}
                    check_shapes(self.declared, self.bounds, shapes)
                feeds = {
                    name: tensors[name].as_numpy().astype(dtype, copy=False)
                    for name, dtype in self.inputs
                }
                results = self.session.run([name for name, _ in self.outputs], feeds)
                first = feeds[self.inputs[0][0]]
                rows += first.shape[0] if first.ndim else 1
                tensors = [
                    pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=dtype))
                    for (name, dtype), value in zip(self.outputs, results, strict=True)
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except (ValueError, InvalidArgument) as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            except Exception as exc:  # one bad request must not take down the model
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(error=error))

        pad = self.latency_s + self.latency_per_item_s * rows
        remaining = start + pad - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return responses

    def finalize(self):
        self.session = None
