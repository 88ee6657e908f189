"""Request decoding fuzzed against the input validation (hypothesis): whatever arrives, parsing
either yields a valid request or raises ValueError (served as INVALID_ARG), never anything else."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driffusion import api

LIMITS, DEFAULTS = api.Limits(max_size=256, size_multiple=16), api.Defaults(height=64, width=64)

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.binary(max_size=50),
    st.just("m" * 100_000),  # a value far past every limit: the error must not echo it
    st.booleans(),
)
dtypes = st.sampled_from([np.int32, np.int64, np.float32, np.float64, np.object_, np.uint8])
shapes = st.sampled_from([(1,), (), (2,), (1, 1), (0,)])


@st.composite
def arrays(draw):
    dtype, shape = draw(dtypes), draw(shapes)
    values = [draw(scalars) for _ in range(int(np.prod(shape)) if shape else 1)]
    try:
        with warnings.catch_warnings():  # out-of-range casts are what we want to send
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow in a float cast: inf
            return np.array(values, dtype=dtype).reshape(shape)
    except (ValueError, TypeError, OverflowError):
        return np.array(values, dtype=np.object_).reshape(shape)


names = st.sampled_from([f.name for f in api.INPUTS] + ["bogus"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(names, st.one_of(st.none(), arrays()), max_size=6))
def test_parsing_anything_gives_a_request_or_a_value_error(values):
    try:
        request = api.parse_request(values, LIMITS, DEFAULTS)
    except ValueError as err:
        message = str(err)
        named = [f.name for f in api.INPUTS if message.startswith(f"{f.name} ")]
        assert named or message.startswith("unknown input"), message  # it names the field
        assert len(message) < 300  # and never echoes a large value back
        return
    assert 1 <= request.steps <= LIMITS.max_steps
    assert 1 <= request.k <= min(request.steps, LIMITS.max_k)
    assert request.mode in api.MODES and request.fanout in api.FANOUTS
    assert request.height % LIMITS.size_multiple == 0 and request.prompt.strip()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_as_a_prompt_parse_or_fail_cleanly(raw):
    values = {"prompt": np.array([raw], dtype=np.object_)}
    try:
        assert api.parse_request(values, LIMITS, DEFAULTS).prompt == raw.decode("utf-8")
    except ValueError as err:
        assert "prompt" in str(err)
