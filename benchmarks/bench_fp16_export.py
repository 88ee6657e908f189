"""fp16 ONNX export, two ways, on the tiny SD2.1 / SDXL / SD3 pipelines: time and error.

    .venv/bin/python benchmarks/bench_fp16_export.py [--out /tmp/fp16-bench] [--write]

Per component: seconds to export fp32; seconds to export fp16 by tracing the torch model in fp16
(driffusion's way, ``export.onnx``); and, when onnxconverter-common is installed (it is not a
dependency), seconds to convert the fp32 file with its ``convert_float_to_float16``
(keep_io_types) and whether the result is a valid graph (ONNX strict type inference). Error:
max |out - torch fp32| / max |torch fp32| at batch 2, default size, the fp16 file run in the
graph's own types (onnx.reference; ONNX Runtime where it has every kernel). One CPU thread.
``--write`` puts the table into the ``fp16-export`` section of BENCHMARKS.md (install
onnxconverter-common==1.16.0 first for its two columns).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_export import run_as_typed  # noqa: E402  (the tests' runner: same numbers as the tests)

from driffusion.export.introspect import family_for_pipeline  # noqa: E402
from driffusion.export.onnx import export_component  # noqa: E402
from driffusion.export.tiny import build_tiny_pipeline, load_tiny_pipeline  # noqa: E402
from driffusion.export.wrappers import wrap_component  # noqa: E402
from driffusion.families import at_precision  # noqa: E402
from report import write_section  # noqa: E402


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float32) - ref).max() / np.abs(ref).max())


def convert_with_onnxconverter(path32: Path, path: Path) -> tuple[float, str]:
    try:
        from onnxconverter_common import float16
    except ImportError:
        return float("nan"), "not installed"
    start = time.perf_counter()
    model = float16.convert_float_to_float16(onnx.load(str(path32)), keep_io_types=True)
    onnx.save(model, str(path))
    seconds = time.perf_counter() - start
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        return seconds, f"invalid: {str(exc).splitlines()[0][:60]}"
    return seconds, "valid"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    root = args.out or Path(tempfile.mkdtemp(prefix="fp16-bench-"))
    rows = []
    for name in ("sd21", "sdxl", "sd3"):
        pipe = load_tiny_pipeline(build_tiny_pipeline(name, root / "pipelines" / name))
        family = family_for_pipeline(name, pipe)
        fp16, fp32 = at_precision(family, "fp16"), at_precision(family, "fp32")
        size = (family.min_size, family.min_size)
        for role in family.components:
            folder = root / name / role
            folder.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            p32 = export_component(
                pipe, fp32.components[role], folder / "fp32.onnx", trace_size=size
            )
            t32 = time.perf_counter() - start
            start = time.perf_counter()
            p16 = export_component(
                pipe, fp16.components[role], folder / "fp16.onnx", trace_size=size
            )
            t16 = time.perf_counter() - start
            tconv, status = convert_with_onnxconverter(p32, folder / "converted.onnx")
            spec = fp16.components[role]
            x = spec.sample_inputs(2, *family.default_size, seed=1)
            x32 = {n: v.astype(np.float32) if v.dtype == np.float16 else v for n, v in x.items()}
            with torch.no_grad():
                ref = wrap_component(pipe, fp32.components[role])(
                    *(torch.from_numpy(x32[n]) for n in spec.input_names)
                )
            ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
            err = max(rel_err(g, r) for g, r in zip(run_as_typed(p16, x), ref, strict=True))
            rows.append((name, role, spec.precision, t32, t16, err, tconv, status))
    lines = [
        "## fp16 export (`benchmarks/bench_fp16_export.py`)",
        "",
        "Tiny random-weight pipelines (64 px, batch 2, one CPU thread). *fp16 error*: max |fp16 "
        "file - torch fp32| / max |torch fp32|, the fp16 file run in its own types by "
        "onnx.reference. *onnxconverter*: onnxconverter-common's `convert_float_to_float16"
        "(keep_io_types=True)` on the fp32 file (not a dependency; installed by hand for the "
        "run), checked by ONNX's strict type inference.",
        "",
        "| family | component | weights | fp32 export s | fp16 trace s | fp16 error | "
        "onnxconverter s | onnxconverter result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, role, precision, t32, t16, err, tconv, status in rows:
        lines.append(
            f"| {name} | {role} | {precision} | {t32:.2f} | {t16:.2f} | {err:.1e} | "
            f"{tconv:.2f} | {status} |"
        )
    print("\n".join(lines))
    if args.write:
        write_section("fp16-export", "\n".join(lines))


if __name__ == "__main__":
    main()
