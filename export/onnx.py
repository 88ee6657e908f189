"""Export a diffusers pipeline's text encoders, denoiser and VAE decoder to ONNX, as its family spec
says.

Each component is traced through its wrapper (``driffusion.export.wrappers``), whose positional
inputs and outputs are the spec's tensors in the spec's order, so the ONNX graph carries the
spec's names and dynamic axes.

The spec says everything about a file: its weights are ``spec.precision`` ("fp16" | "fp32") and
its inputs and outputs the TensorSpecs' dtypes (``families.at_precision`` gives a family's fp16 or
fp32 view). TensorRT builds every file strongly typed, in exactly these types. Exporter: torch's
TorchScript-based exporter (``dynamo=False``), which exports all three families with dynamic
batch and spatial axes at opsets 17 to 20; the dynamo exporter needs ``onnxscript``, which is not a
dependency. Models above 2 GiB of weights keep them in one ``model.onnx.data`` file beside
``model.onnx``. Every file passes ONNX's strict type inference, which is what a strongly typed
TensorRT build needs (a graph whose operand types disagree does not build).

fp16: the torch module is traced in fp16, as TensorRT's demo/Diffusion exports its fp16 models,
rather than converting an fp32 ONNX file. Measured on the tiny pipelines
(``benchmarks/bench_fp16_export.py``, BENCHMARKS.md "fp16 export"): tracing in fp16 took as long
as the fp32 export (0.1 to 1.5 s per component) and matched torch fp32 within 1.2e-3 to 5.0e-3
(max |error| / max |ref|, computed in the graph's own fp16 types by onnx.reference) on the 10
fp16 components of SD2.1, SDXL and SD3; onnxconverter-common 1.16's ``convert_float_to_float16``
on the fp32 files (keep_io_types) gave graphs with mismatched operand types (Cast, Expand,
LayerNormalization) for 9 of the 11 components, which neither ONNX Runtime nor a strongly typed
build accepts. nvidia-modelopt's AutoCast (0.47) cannot be installed beside this
project: its ``[onnx]`` extra needs numpy >= 2 (the pytriton wheel needs numpy < 2), onnx 1.21 and
onnxruntime-gpu. Tracing in fp16 also keeps the model's own precision decisions, which a
converter would have to rediscover:

- diffusers computes the timestep and SDXL's time-id embeddings in float32 and casts them to the
  model's dtype; the graph keeps those casts (``timestep`` and ``time_ids`` stay float32 inputs);
- attention that the model marks ``upcast_attention`` / ``upcast_softmax`` (SD2.1's UNet, every
  VAE's mid-block attention) is traced with diffusers' ``AttnProcessor``, the processor that
  honours the flags: Q·Kᵀ and the softmax run in float32 in the graph, so a strongly typed
  engine runs them in float32 too (the default SDPA processor ignores the flags; on a GPU its
  fused kernels accumulate in float32, but an exported graph would state float16);
- CLIP text encoders are traced with transformers' "eager" attention (softmax in float32): its
  SDPA path, traced in fp16 with a float mask, exports a graph whose attention output is float32
  where the next MatMul's weights are float16 (invalid).

SDXL's VAE stays fp32 (its spec says so: it overflows in fp16). The pipeline itself stays fp32:
the fp16 trace converts the parameters in place and restores the very same fp32 tensors after.

    paths = export_pipeline_to_onnx(pipe, at_precision(family_for_pipeline("sdxl", pipe), "fp16"),
                                    "out/onnx")
    # {"text_encoder": Path("out/onnx/text_encoder/model.onnx"), ...}
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from driffusion.families import FP32_TENSORS, PRECISIONS, FamilySpec
from driffusion.tensors import ModelSpec

from .wrappers import WrapError, wrap_component

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20  # protobuf's 2 GiB limit, less room for the graph
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


class ExportError(RuntimeError):
    """A component failed to export; the message names it and says why."""


class PrecisionBoundary(nn.Module):
    """The spec's tensors in, in the spec's dtypes; the wrapped component computes in ``compute``.

    Float inputs are cast to ``compute`` except ``FP32_TENSORS`` (which the models turn into
    float32 embeddings themselves); outputs are cast to the spec's dtypes. Where the dtypes agree
    the casts are no-ops and leave no node in the graph.
    """

    def __init__(self, inner: nn.Module, spec: ModelSpec, compute: torch.dtype):
        super().__init__()
        self.inner = inner
        self.compute = compute
        self.input_names = spec.input_names
        self.output_dtypes = [getattr(torch, t.dtype) for t in spec.outputs]

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        args = [
            _cast(t, self.compute) if n not in FP32_TENSORS else t
            for n, t in zip(self.input_names, tensors, strict=True)
        ]
        out = self.inner(*args)
        outs = out if isinstance(out, tuple) else (out,)
        cast = tuple(_cast(o, d) for o, d in zip(outs, self.output_dtypes, strict=True))
        return cast if isinstance(out, tuple) else cast[0]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` if it is a float tensor of another dtype (decided while tracing, so a
    matching dtype leaves no Cast node)."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


@contextlib.contextmanager
def traced_in_fp16(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with fp16 parameters and buffers, as the fp16 export traces it; on exit the very
    same fp32 tensors are back (the pipeline is unchanged, and no fp32 copy is made).

    Attention that the model marks ``upcast_attention``/``upcast_softmax`` is traced with
    diffusers' ``AttnProcessor`` (which honours the flags: float32 scores and softmax), and
    transformers text encoders with "eager" attention (softmax in float32; their SDPA path exports
    a type-inconsistent graph in fp16). See the module docstring.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    processors: list[tuple[Any, Any]] = []
    attention: list[tuple[Any, str]] = []
    try:
        for m in module.modules():
            if isinstance(m, Attention) and (m.upcast_attention or m.upcast_softmax):
                if not isinstance(m.processor, (AttnProcessor, AttnProcessor2_0)):
                    raise ExportError(
                        f"{type(m.processor).__name__} ignores upcast_attention/upcast_softmax; "
                        "an fp16 export would lose the float32 attention the model asks for"
                    )
                processors.append((m, m.processor))
                m.set_processor(AttnProcessor())
            config = getattr(m, "config", None)
            if hasattr(m, "set_attn_implementation") and hasattr(config, "_attn_implementation"):
                attention.append((m, config._attn_implementation))
                m.set_attn_implementation("eager")
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point():
                saved.append((t, t.data))
                t.data = t.data.to(torch.float16)
        yield module
    finally:
        for t, data in saved:
            t.data = data
        for m, processor in processors:
            m.set_processor(processor)
        for m, implementation in attention:
            m.set_attn_implementation(implementation)


# --- export ------------------------------------------------------------------------------------


def export_component(
    pipe: Any,
    spec: ModelSpec,
    path: str | Path,
    *,
    trace_size: tuple[int, int],
    opset: int = 18,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Export one component to ``path`` (its folder gets ``model.onnx.data`` when large).

    Traces at batch 2 and ``trace_size`` (pixels); the spec's dynamic axes stay dynamic. Raises
    ExportError naming the component when the module does not match the spec or export fails.
    """
    path = Path(path)
    role = spec.role
    if spec.precision not in PRECISIONS:
        raise ValueError(f"{role}: precision must be one of {PRECISIONS}")
    try:
        inner = wrap_component(pipe, spec)
    except WrapError as exc:
        raise ExportError(str(exc)) from exc
    dtypes = {p.dtype for p in inner.parameters()}
    if dtypes != {torch.float32}:
        raise ExportError(f"{role}: export needs float32 weights, found {sorted(map(str, dtypes))}")
    fp16 = spec.precision == "fp16"
    with traced_in_fp16(inner) if fp16 else contextlib.nullcontext(inner):
        wrapper = PrecisionBoundary(inner, spec, torch.float16 if fp16 else torch.float32).eval()
        _export(wrapper, spec, path, trace_size, opset, external_data_threshold)
    return path


def _export(
    wrapper: PrecisionBoundary,
    spec: ModelSpec,
    path: Path,
    trace_size: tuple[int, int],
    opset: int,
    external_data_threshold: int,
) -> None:
    role = spec.role
    sample = spec.sample_inputs(2, *trace_size)
    args = tuple(torch.from_numpy(sample[n]) for n in spec.input_names)

    # A torch forward first: a spec/pipeline mismatch fails here with readable shapes.
    try:
        with torch.no_grad():
            out = wrapper(*args)
    except Exception as exc:
        shapes = {n: tuple(a.shape) for n, a in zip(spec.input_names, args, strict=True)}
        raise ExportError(
            f"{role}: {type(wrapper.inner.get_submodule(_inner(wrapper.inner))).__name__} does "
            f"not accept the spec's inputs {shapes}: {type(exc).__name__}: {exc}"
        ) from exc
    out = out if isinstance(out, tuple) else (out,)
    dims = spec.dims(2, *trace_size)
    got = [tuple(o.shape) for o in out]
    want = [t.resolve(dims) for t in spec.outputs]
    if got != want:
        raise ExportError(f"{role}: torch outputs {got} do not match the spec's {want}")

    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # TracerWarnings on python-side shape checks; the legacy exporter's deprecation note.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # CLIP's EOS gather; its indices are never negative.
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            # the VAE encoder's slicing; folding is an optimisation only
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(
                wrapper,
                args,
                str(tmp / MODEL_FILE),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        # Reload (pulling in any per-tensor files the exporter wrote for > 2 GiB models) and save
        # as one file, or one graph file plus one weights file.
        model = onnx.load(str(tmp / MODEL_FILE))
        _stamp_output_shapes(model, spec)
        _check_graph(model, spec)
        data_file = f"{path.name}.data"  # DATA_FILE for model.onnx
        for stale in (path, path.parent / data_file):
            stale.unlink(missing_ok=True)
        large = _initializer_bytes(model) > external_data_threshold
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            location=data_file,
            size_threshold=1024,
        )
        onnx.checker.check_model(str(path))
        _check_types(path, tmp / "inferred.onnx", role)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_pipeline_to_onnx(
    pipe: Any,
    family_spec: FamilySpec,
    out_dir: str | Path,
    opset: int = 18,
    force: bool = False,
    progress: Callable[[str], Any] | None = print,
    *,
    trace_size: tuple[int, int] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict[str, Path]:
    """Export every component of ``family_spec`` to ``out_dir/<role>/model.onnx``.

    ``pipe``: a loaded fp32 diffusers pipeline of that family (see
    :func:`driffusion.export.introspect.family_for_pipeline` for checkpoints whose widths differ
    from the public ones); ``family_spec``: its view at the precision to export
    (:func:`driffusion.families.at_precision`).
    A component whose ``model.onnx`` already exists with the spec's inputs, outputs and weight
    precision is skipped unless ``force`` (weights are not compared: force after changing the
    checkpoint).
    ``trace_size`` (pixels) defaults to the family's smallest square size, the cheapest to trace.
    Returns {role: path}. Raises ExportError naming the component on failure.
    """
    if not isinstance(opset, int) or opset < 17:
        raise ValueError(f"opset must be an integer >= 17, got {opset!r}")
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    size = trace_size or (family_spec.min_size, family_spec.min_size)
    family_spec.check_size(*size)
    paths = {}
    for role, spec in family_spec.components.items():
        path = out_dir / role / MODEL_FILE
        paths[role] = path
        if path.exists() and not force:
            if matches_spec(path, spec):
                say(f"[onnx] {family_spec.name}/{role}: {path} exists, skipped (force re-exports)")
                continue
            say(f"[onnx] {family_spec.name}/{role}: {path} has other inputs/outputs, re-exporting")
        start = time.perf_counter()
        try:
            export_component(
                pipe,
                spec,
                path,
                trace_size=size,
                opset=opset,
                external_data_threshold=external_data_threshold,
            )
        except ExportError as exc:
            raise ExportError(f"{family_spec.name}/{exc}") from exc
        except Exception as exc:
            raise ExportError(
                f"{family_spec.name}/{role}: ONNX export failed: {type(exc).__name__}: {exc}"
            ) from exc
        mb = sum(f.stat().st_size for f in path.parent.glob(f"{MODEL_FILE}*")) / 2**20
        say(
            f"[onnx] {family_spec.name}/{role}: {path} ({spec.precision}, {mb:.1f} MiB, "
            f"opset {opset}) "
            f"in {time.perf_counter() - start:.1f} s"
        )
    return paths


# --- checks ------------------------------------------------------------------------------------


def graph_io(model: onnx.ModelProto) -> dict[str, dict[str, tuple[str, tuple[int | str, ...]]]]:
    """{"inputs"|"outputs": {name: (numpy dtype name, shape with dim names for dynamic dims)}}."""

    def describe(values: Any) -> dict[str, tuple[str, tuple[int | str, ...]]]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
            shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
            out[v.name] = (dtype, shape)
        return out

    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    return {"inputs": describe(inputs), "outputs": describe(model.graph.output)}


def _check_graph(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """The graph's inputs and outputs are the spec's, in order, with its dtypes and shapes."""
    io = graph_io(model)
    for kind, specs in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        want = {t.name: (t.dtype, t.shape) for t in specs}
        if list(io[kind]) != list(want) or io[kind] != want:
            raise ExportError(f"{spec.role}: ONNX graph {kind} {io[kind]} differ from spec {want}")


def matches_spec(path: Path, spec: ModelSpec) -> bool:
    """Whether an existing ONNX file has the spec's inputs, outputs and weight precision (the
    weights themselves are not compared)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        _check_graph(model, spec)
    except Exception:
        return False
    return weights_precision(model) == spec.precision


def weights_precision(model: onnx.ModelProto) -> str:
    """Return "fp16" or "fp32": the float type holding most of the model's weight bytes (an fp16
    model keeps a few small float32 constants, e.g. for its timestep embedding)."""
    by_type = {onnx.TensorProto.FLOAT16: 0, onnx.TensorProto.FLOAT: 0}
    for init in model.graph.initializer:
        if init.data_type in by_type:
            by_type[init.data_type] += int(np.prod(init.dims, dtype=np.int64))
    return "fp16" if by_type[onnx.TensorProto.FLOAT16] > by_type[onnx.TensorProto.FLOAT] else "fp32"


def _check_types(path: Path, scratch: Path, role: str) -> None:
    """ONNX's strict type inference over the saved file (external data is not loaded): every
    operator's operand types agree, as a strongly typed TensorRT build requires."""
    try:
        onnx.shape_inference.infer_shapes_path(
            str(path), str(scratch), check_type=True, strict_mode=True
        )
    except Exception as exc:
        raise ExportError(f"{role}: the exported graph's types are inconsistent: {exc}") from exc
    finally:
        scratch.unlink(missing_ok=True)


def _stamp_output_shapes(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Write the spec's output shapes into the graph.

    The tracer names some fixed output dims symbolically (e.g. the text length after a
    LayerNorm); the torch forward in export_component has checked the spec's shapes hold.
    """
    outputs = {t.name: t for t in spec.outputs}
    for value in model.graph.output:
        if value.name not in outputs:
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in outputs[value.name].shape:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d


def _inner(wrapper: nn.Module) -> str:
    """Name of the wrapped diffusers/transformers module inside a wrapper."""
    return next(name for name, _ in wrapper.named_children())


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return total
