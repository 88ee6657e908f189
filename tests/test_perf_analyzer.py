"""The committed perf_analyzer input-data files are requests the ``driffusion`` model accepts.

Read as perf_analyzer reads them (one tensor per input, typed by the model's config) and validated
by ``api.parse_request``, the server's own validation. No server and no perf_analyzer needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from driffusion import api

INPUTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "perf_analyzer"
INPUT_FILES = sorted(INPUTS_DIR.glob("*.json"))
FIELDS = {f.name: f for f in api.INPUTS}
PYTHON_TYPES = {"BYTES": str, "INT64": int, "INT32": int, "FP32": (int, float)}


def as_tensor(name: str, value) -> np.ndarray:
    """One input of a perf_analyzer JSON entry as the model would receive it."""
    field = FIELDS[name]
    if isinstance(value, dict):  # {"content": [...], "shape": [...]}
        content, shape = value["content"], value["shape"]
    else:  # a flat list; the model's dims give the shape
        content, shape = value, list(field.dims)
    assert len(content) == math.prod(shape), f"{name}: {len(content)} values for shape {shape}"
    for item in content:  # JSON types perf_analyzer can convert to the input's dtype
        ok = isinstance(item, PYTHON_TYPES[field.dtype]) and not isinstance(item, bool)
        assert ok, f"{name} is {field.dtype}; got {item!r}"
    if field.dtype == "BYTES":
        return np.array([s.encode("utf-8") for s in content], dtype=object).reshape(shape)
    return np.array(content, dtype=api.NUMPY_DTYPES[field.dtype]).reshape(shape)


def entries(path: Path) -> list[dict]:
    return json.loads(path.read_text())["data"]


def test_there_are_input_data_files():
    names = {p.name for p in INPUT_FILES}
    assert {"sequential.json", "aggressive_k4.json"} <= names


@pytest.mark.parametrize("path", INPUT_FILES, ids=lambda p: p.name)
def test_every_entry_is_a_valid_request(path):
    data = entries(path)
    assert data, f"{path.name} has no entries"
    for entry in data:
        unknown = set(entry) - set(FIELDS)
        assert not unknown, f"{path.name}: {sorted(unknown)} are not inputs of the model"
        values = {name: as_tensor(name, value) for name, value in entry.items()}
        api.parse_request(values, api.Limits(), api.Defaults())  # raises on a bad request


@pytest.mark.parametrize("path", INPUT_FILES, ids=lambda p: p.name)
def test_every_entry_of_a_file_asks_for_the_same_mode(path):
    # The benchmark labels a file's numbers with its mode, k and fan-out; perf_analyzer cycles
    # through the entries, so they may differ only in prompt and seed.
    kinds = {tuple(str(e.get(n)) for n in ("mode", "k", "fanout")) for e in entries(path)}
    assert all("mode" in e for e in entries(path)), f"{path.name}: every entry names its mode"
    assert len(kinds) == 1, f"{path.name} mixes {sorted(kinds)}"


def test_invalid_entries_are_rejected():
    # the check above would catch a bad file: a k beyond max_k and a mode that does not exist
    with pytest.raises(ValueError, match="k must be in"):
        values = {n: as_tensor(n, v) for n, v in {"prompt": ["x"], "k": [99]}.items()}
        api.parse_request(values, api.Limits(), api.Defaults())
    with pytest.raises(ValueError, match="mode must be one of"):
        values = {n: as_tensor(n, v) for n, v in {"prompt": ["x"], "mode": ["fast"]}.items()}
        api.parse_request(values, api.Limits(), api.Defaults())
