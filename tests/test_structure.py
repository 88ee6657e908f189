"""The dependency rules of the package layout (README, "Architecture"), checked on the imports in
the source: the algorithm core knows nothing of serving, export or clients; the contract modules
need only numpy; the client needs only the request API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ("schedule", "prediction", "jumps", "multistep", "engine", "guidance", "gmm", "parallel")
HOST = ("routing",)  # host logic of serving, tested without Triton: transports are injected
CONTRACTS = (
    "tensors",
    "families",
    "conditioning",
    "api",
    "metrics",
)  # client and stubs import them
SERVING = (
    "driffusion.model_repository",
    "driffusion.export",
    "driffusion.client",
    "driffusion.cli",
)
SERVERS = ("tritonclient", "triton_python_backend_utils", "onnx", "onnxruntime", "tensorrt")
PACKAGES = {"orchestrator": "driffusion", "client": "driffusion.client"}


def imports(path: Path, package: str) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved inside ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.add(module)  # and each name, which may be a module: from driffusion import api
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", CORE + CONTRACTS + HOST)
def test_the_library_imports_nothing_from_serving_export_or_clients(module):
    found = imports(ROOT / "orchestrator" / f"{module}.py", "driffusion")
    assert not [n for n in found if under(n, SERVING + SERVERS)], module


@pytest.mark.parametrize("module", CONTRACTS)
def test_the_contracts_need_only_numpy(module):
    found = imports(ROOT / "orchestrator" / f"{module}.py", "driffusion")
    outside = {n for n in found if not under(n, ("driffusion", "numpy", "__future__"))}
    assert all(n.split(".")[0] in _STDLIB for n in outside), outside


@pytest.mark.parametrize("path", sorted((ROOT / "client").glob("*.py")), ids=lambda p: p.name)
def test_the_client_needs_only_the_request_api(path):
    found = imports(path, "driffusion.client")
    ours = {n for n in found if under(n, ("driffusion",)) and not under(n, ("driffusion.client",))}
    assert ours <= {"driffusion", "driffusion.api"}, ours
    assert not [n for n in found if under(n, ("torch", "diffusers", "onnxruntime"))]


_STDLIB = {
    "collections",
    "dataclasses",
    "math",
    "typing",
    "re",
    "json",
}
