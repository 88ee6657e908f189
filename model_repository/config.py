"""``config.pbtxt`` rendered from the model specs and the request API, with Triton's own protobuf.

Every tensor name, dtype and shape comes from ``driffusion.tensors`` (pipeline components) or
``driffusion.api`` (the ``driffusion`` model): nothing is typed here. Every config says
``max_batch_size: 0`` (shapes carry their own batch axis) in so many words: proto3's text format
leaves a zero out, and a server running with auto-complete on would then fill in its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from driffusion import api
from driffusion.tensors import ModelSpec

_NUMPY_TO_TRITON = {
    "float32": mc.TYPE_FP32,
    "float16": mc.TYPE_FP16,
    "int64": mc.TYPE_INT64,
    "int32": mc.TYPE_INT32,
    "uint8": mc.TYPE_UINT8,
    "object": mc.TYPE_STRING,
}
_API_TO_TRITON = {
    "BYTES": mc.TYPE_STRING,
    "INT64": mc.TYPE_INT64,
    "INT32": mc.TYPE_INT32,
    "FP32": mc.TYPE_FP32,
    "UINT8": mc.TYPE_UINT8,
    "BOOL": mc.TYPE_BOOL,
}


def _group(
    count: int, gpus: Sequence[int] | None, profiles: Sequence[int] = ()
) -> mc.ModelInstanceGroup:
    if gpus is None:
        return mc.ModelInstanceGroup(count=count, kind=mc.ModelInstanceGroup.KIND_CPU)
    return mc.ModelInstanceGroup(
        count=count,
        kind=mc.ModelInstanceGroup.KIND_GPU,
        gpus=list(gpus),
        profile=[str(i) for i in profiles],  # TensorRT optimization profiles this group may use
    )


def _config(
    name: str,
    inputs: Iterable[mc.ModelInput],
    outputs: Iterable[mc.ModelOutput],
    groups: Iterable[mc.ModelInstanceGroup],
    *,
    backend: str = "",
    platform: str = "",
    parameters: Mapping[str, object] | None = None,
) -> str:
    config = mc.ModelConfig(
        name=name,
        backend=backend,
        platform=platform,
        max_batch_size=0,
        input=list(inputs),
        output=list(outputs),
        instance_group=list(groups),
    )
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    text = text_format.MessageToString(config)
    first, rest = text.split("\n", 1)  # the name line
    return f"{first}\nmax_batch_size: 0\n{rest}"


def component_config(
    name: str,
    spec: ModelSpec,
    *,
    backend: str = "",
    platform: str = "",
    instances: int = 1,
    gpus: Sequence[int] | None = None,
    parameters: Mapping[str, object] | None = None,
    profiles: Sequence[int] = (),
) -> str:
    """A pipeline component served by ``backend`` (``python``: ONNX Runtime or torch runners) or
    ``platform`` (``tensorrt_plan``): ``instances`` on the CPU when ``gpus`` is None, else
    ``instances`` on EACH of ``gpus``, each allowed the engine's optimization ``profiles`` (none
    listed: Triton uses profile 0 only; several: per request, the one whose optimum is nearest
    its shape). Tensor dtypes are the spec's (float16 where ``families.at_precision`` says so)."""
    if bool(backend) == bool(platform):
        raise ValueError("give exactly one of backend and platform")
    if gpus is not None and not gpus:
        raise ValueError("gpus must list at least one GPU index (or be None for the CPU)")
    if profiles and gpus is None:
        raise ValueError("optimization profiles are for TensorRT engines on GPUs")
    ins = [
        mc.ModelInput(name=t.name, data_type=_NUMPY_TO_TRITON[t.dtype], dims=t.wildcard_shape)
        for t in spec.inputs
    ]
    outs = [
        mc.ModelOutput(name=t.name, data_type=_NUMPY_TO_TRITON[t.dtype], dims=t.wildcard_shape)
        for t in spec.outputs
    ]
    groups = [_group(instances, gpus, profiles)]
    return _config(
        name, ins, outs, groups, backend=backend, platform=platform, parameters=parameters
    )


def orchestrator_config(name: str, instances: int, decoupled: bool = False) -> str:
    """The ``driffusion`` BLS model: the request API of ``driffusion.api``; ``decoupled``: the
    ``driffusion_stream`` variant, a response per round (``api.STREAM_OUTPUTS``), for gRPC
    streaming clients."""
    ins = [
        mc.ModelInput(
            name=f.name, data_type=_API_TO_TRITON[f.dtype], dims=f.dims, optional=f.optional
        )
        for f in api.INPUTS
    ]
    outs = [
        mc.ModelOutput(name=f.name, data_type=_API_TO_TRITON[f.dtype], dims=f.dims)
        for f in (api.STREAM_OUTPUTS if decoupled else api.OUTPUTS)
    ]
    text = _config(name, ins, outs, [_group(instances, None)], backend="python")
    if decoupled:
        policy = mc.ModelTransactionPolicy(decoupled=True)
        text += text_format.MessageToString(mc.ModelConfig(model_transaction_policy=policy))
    return text


def parse_config(text: str) -> mc.ModelConfig:
    """Parse ``config.pbtxt`` text with Triton's protobuf definition (raises on any error)."""
    return text_format.Parse(text, mc.ModelConfig())


__all__ = ["component_config", "orchestrator_config", "parse_config"]
