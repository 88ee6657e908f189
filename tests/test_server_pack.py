"""The server pack for the lent GPU machine: ``benchmarks/gpu/server-files.txt`` (what
``pack_server.sh`` packs) names files of the installed nvidia-pytriton wheel, and a server runs
from those files alone, copied elsewhere (``TritonDistribution.from_folder``), as
``run_served.sh`` runs it from the unpacked pack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

pytriton = pytest.importorskip("pytriton", reason="the server pack comes from driffusion[server]")
grpcclient = pytest.importorskip("tritonclient.grpc")

from driffusion.model_repository.server import (  # noqa: E402
    TritonDistribution,
    TritonServerError,
    locate_tritonserver,
    server_environment,
)

ROOT = Path(__file__).resolve().parent.parent
FILE_LIST = ROOT / "benchmarks" / "gpu" / "server-files.txt"
SITE = Path(pytriton.__file__).resolve().parent.parent  # where the wheel installed itself
LIBS = "nvidia_pytriton.libs"

ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 0
input [{ name: "text" data_type: TYPE_STRING dims: [-1] },
       { name: "x" data_type: TYPE_FP32 dims: [-1] }]
output [{ name: "text_out" data_type: TYPE_STRING dims: [-1] },
        { name: "y" data_type: TYPE_FP32 dims: [-1] }]
instance_group [{ count: 1 kind: KIND_CPU }]
"""
ECHO_MODEL = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            outputs = [pb_utils.Tensor("text_out", text), pb_utils.Tensor("y", 2 * x)]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
"""


def packed_files() -> list[str]:
    lines = FILE_LIST.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_pack_script_packs_the_listed_files():
    assert "server-files.txt" in (ROOT / "benchmarks" / "gpu" / "pack_server.sh").read_text()


def test_every_listed_file_is_a_file_of_the_installed_wheel():
    files = packed_files()
    assert len(files) == len(set(files))
    missing = [f for f in files if not (SITE / f).is_file()]
    assert not missing, f"not in the installed nvidia-pytriton: {missing}"


def test_the_list_has_the_server_its_libraries_and_the_stubs_of_both_pythons():
    files = set(packed_files())
    stubs = "pytriton/tritonserver/python_backend_stubs/{}/triton_python_backend_stub"
    wanted = {"pytriton/tritonserver/bin/tritonserver", stubs.format("3.12"), stubs.format("3.11")}
    assert wanted <= files
    # every library of the wheel but the 3.13 stub's libpython (ours link the interpreter's)
    libs = {f"{LIBS}/{p.name}" for p in (SITE / LIBS).iterdir() if "libpython" not in p.name}
    assert libs == {f for f in files if f.startswith(f"{LIBS}/")}


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    """The listed files copied out of the wheel, in its layout (what run_served.sh unpacks)."""
    root = tmp_path_factory.mktemp("unpacked")
    for name in packed_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SITE / name, root / name)
    return root


def test_from_folder_finds_the_server_its_version_and_this_pythons_stub(unpacked):
    dist = TritonDistribution.from_folder(unpacked)
    assert dist.version == locate_tritonserver().version == "0.7.0"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert dist.stub == unpacked.resolve() / f"pytriton/tritonserver/python_backend_stubs/{py}" / (
        "triton_python_backend_stub"
    )
    assert dist.binary.is_relative_to(unpacked.resolve())
    assert dist.libs_dir == unpacked.resolve() / LIBS


def test_from_folder_names_what_is_missing(tmp_path):
    with pytest.raises(TritonServerError, match="missing"):
        TritonDistribution.from_folder(tmp_path)


def test_a_server_runs_from_the_copied_files(unpacked, tmp_path, start_triton_server):
    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    server = start_triton_server(repo, distribution=TritonDistribution.from_folder(unpacked))
    assert Path(os.readlink(f"/proc/{server.pid}/exe")).is_relative_to(unpacked.resolve())
    client = grpcclient.InferenceServerClient(server.grpc_url)
    text = grpcclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"a prompt", b"another"], dtype=object))
    x = grpcclient.InferInput("x", [3], "FP32")
    x.set_data_from_numpy(np.arange(3, dtype=np.float32))
    result = client.infer("echo", [text, x])
    assert result.as_numpy("text_out").tolist() == [b"a prompt", b"another"]
    np.testing.assert_array_equal(result.as_numpy("y"), [0.0, 2.0, 4.0])
    stubs = server.stubs()
    assert stubs and all(s.model == "echo" for s in stubs)


def test_the_models_environment_can_be_another_virtual_environment(tmp_path):
    """``python=``: a virtual environment's bin first on PATH (how the stub finds its
    packages), its base interpreter's libpython folder on LD_LIBRARY_PATH."""
    venv = tmp_path / "models"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    dist = locate_tritonserver()
    env = server_environment(dist, base={"PATH": "/usr/bin"}, python=venv / "bin" / "python")
    assert env["PATH"].split(os.pathsep) == [str(venv / "bin"), "/usr/bin"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [
        str(dist.libs_dir),
        sysconfig.get_config_var("LIBDIR"),
    ]
