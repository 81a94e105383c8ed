"""Round-to-nearest fused in C (kernels/csrc/quantize.h) gives the torch path's bytes on every ISA."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.algorithms import rtn
from lowbit.kernels import cpu
from lowbit.primitives import NonFiniteError, choose_qparams, quantize_codes
from lowbit.qweight import QWeight

SCHEMES = ["w4g32", "w4g32-asym", "w8g64", "int8", "w3g64", "w3g64-asym", "w2g16-asym", "w2g32", "w4g128", "w4",
           "w4-asym", "w8a8", "w8-asym"]  # fmt: skip


def _torch_path(w: torch.Tensor, scheme) -> QWeight:
    w2 = w.reshape(w.shape[0], -1).float()
    qp = choose_qparams(w2, scheme)
    return QWeight.from_codes(tuple(w.shape), scheme, quantize_codes(w2, qp, scheme), qp)


def _same(a: QWeight, b: QWeight) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype and torch.equal(x, y))

    return eq(a.data, b.data) and eq(a.scale, b.scale) and eq(a.zero, b.zero)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(SCHEMES), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       rows=st.integers(1, 24), cols=st.integers(1, 300), magnitude=st.sampled_from([1e-3, 0.05, 1.0, 30.0]),
       seed=st.integers(0, 2**16), ties=st.booleans(), zero_rows=st.booleans())  # fmt: skip
def test_fused_rtn_gives_the_torch_bytes(isa, scheme, dtype, rows, cols, magnitude, seed, ties, zero_rows):
    s = lowbit.parse_scheme(scheme)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * magnitude * torch.rand(rows, 1, generator=g)
    if ties:  # equal magnitudes of both signs: the first one decides a symmetric scale's sign
        w[0, -1] = -w[0, 0]
        w[:, ::7] = w[:, :1].clone()
    if zero_rows:
        w[-1] = 0.0
        w[0, ::3] = 0.0
    w = w.to(dtype)
    ref = _torch_path(w, s)
    # the fused path runs exactly when every scale lies in float16's normal range (else the torch
    # path stores float32 scales, or float16 subnormals where those happen to hold a scale exactly)
    a, tiny = ref.scale.float().abs(), torch.finfo(torch.float16).tiny
    normal = ref.scale.dtype == torch.float16 and bool(((a == 0) | (a >= tiny)).all())
    assert (cpu.rtn_affine(w, s) is not None) == normal
    assert _same(rtn.quantize_weight(w, s), ref), (scheme, dtype, rows, cols)


@pytest.mark.parametrize("scheme", ["w4g32", "w4g32-asym", "w8g64"])
def test_scales_outside_float16_fall_back_to_the_torch_path(isa, scheme):
    s = lowbit.parse_scheme(scheme)
    for magnitude in (1e-9, 1e7):  # scales below float16's normal range / above its largest value
        w = torch.randn(16, 64) * magnitude
        assert cpu.rtn_affine(w, s) is None
        q = rtn.quantize_weight(w, s)
        assert q.scale.dtype == torch.float32 and _same(q, _torch_path(w, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_count_nonfinite_matches_isfinite(isa, dtype):
    """The exponent-bit count the streaming check uses equals torch's isfinite, on every ISA."""
    w = torch.randn(3, 1001).to(dtype)
    assert cpu.count_nonfinite(w) == 0
    w[0, 5], w[1, 0], w[2, -1] = float("nan"), float("inf"), float("-inf")
    w[1, 7] = torch.finfo(dtype).max  # largest finite: not counted
    assert cpu.count_nonfinite(w) == int((~torch.isfinite(w)).sum()) == 3
    assert cpu.count_nonfinite(w.t()) is None  # not contiguous: the caller uses torch


def test_nonfinite_and_subnormal_weights_are_reported_as_on_the_torch_path(isa):
    s = lowbit.parse_scheme("w4g32")
    w = torch.randn(8, 64)
    w[3, 5] = float("inf")
    with pytest.raises(NonFiniteError, match="blocks.3.fc.weight has 1 NaN/Inf"):
        rtn.quantize_weight(w.bfloat16(), s, name="blocks.3.fc.weight")
    w[3, 5] = 0.0
    w[6] = 1e-38  # a row of float32 subnormals: no scale represents it
    with pytest.warns(UserWarning, match="1 row.*below ~1e-35"):
        q = rtn.quantize_weight(w, s, name="fc.weight")
    assert _same(q, _torch_path(w, s)) and torch.equal(q.dequantize()[6], torch.zeros(64))
