"""Export a diffusers pipeline's text encoders, denoiser and VAE decoder to ONNX, as its family spec
says.

Each component is traced through its wrapper (``driffusion.export.wrappers``), whose positional
inputs and outputs are the spec's tensors in the spec's order, so the ONNX graph carries the
spec's names and dynamic axes.

The ONNX files are fp32; TensorRT picks the build precision from the spec. Exporter: torch's
TorchScript-based exporter (``dynamo=False``), which exports all three families with dynamic
batch and spatial axes at opsets 17 to 20; the dynamo exporter needs ``onnxscript``, which is not a
dependency. Models above 2 GiB of weights keep them in one ``model.onnx.data`` file beside
``model.onnx``.

    paths = export_pipeline_to_onnx(pipe, family_for_pipeline("sdxl", pipe), "out/onnx")
    # {"text_encoder": Path("out/onnx/text_encoder/model.onnx"), ...}
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from driffusion.families import FamilySpec
from driffusion.tensors import ModelSpec

from .wrappers import WrapError, wrap_component

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20  # protobuf's 2 GiB limit, less room for the graph
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


class ExportError(RuntimeError):
    """A component failed to export; the message names it and says why."""


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
    try:
        wrapper = wrap_component(pipe, spec)
    except WrapError as exc:
        raise ExportError(str(exc)) from exc
    dtypes = {p.dtype for p in wrapper.parameters()}
    if dtypes != {torch.float32}:
        raise ExportError(f"{role}: export needs float32 weights, found {sorted(map(str, dtypes))}")
    sample = spec.sample_inputs(2, *trace_size)
    args = tuple(torch.from_numpy(sample[n]) for n in spec.input_names)

    # A torch forward first: a spec/pipeline mismatch fails here with readable shapes.
    try:
        with torch.no_grad():
            out = wrapper(*args)
    except Exception as exc:
        shapes = {n: tuple(a.shape) for n, a in zip(spec.input_names, args, strict=True)}
        raise ExportError(
            f"{role}: {type(wrapper.get_submodule(_inner(wrapper))).__name__} does not accept the "
            f"spec's inputs {shapes}: {type(exc).__name__}: {exc}"
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


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
    from the public ones).
    A component whose ``model.onnx`` already exists with the spec's inputs and outputs is skipped
    unless ``force`` (weights are not compared: force after changing the checkpoint).
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
            f"[onnx] {family_spec.name}/{role}: {path} ({mb:.1f} MiB, opset {opset}) "
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
    """Whether an existing ONNX file has the spec's inputs and outputs (weights not compared)."""
    try:
        _check_graph(onnx.load(str(path), load_external_data=False), spec)
    except Exception:
        return False
    return True


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
