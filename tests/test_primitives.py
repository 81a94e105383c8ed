"""Every format of the table, looped over: round-trip error bounds, exact packing, parameters."""

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FORMATS, get_format
from lowbit.primitives import (
    NonFiniteError,
    choose_qparams,
    dequantize_codes,
    fake_quantize,
    grouped,
    mse_clip_search,
    quantize_codes,
)
from lowbit.qweight import QWeight
from lowbit.scheme import PRESETS, parse_scheme


def _bound_ok(w: torch.Tensor, qw: QWeight) -> None:
    """|w - deq(q(w))| within the format's documented bound, wherever w is inside the range."""
    s = qw.scheme
    fmt = s.fmt
    deq = qw.dequantize().reshape(w.shape[0], -1)
    w = w.reshape(w.shape[0], -1).float()
    err = (w - deq).abs()
    if s.is_cast:
        # half an ulp relative; fp16's subnormals (below 2^-14) have a fixed step of 2^-24
        rel, absolute = {"fp16": (2**-11, 2**-25), "bf16": (2**-8, 1e-38)}[fmt.name]
        assert bool((err <= rel * w.abs() + absolute).all())
        return
    if fmt.kind == "float":  # fp8 e4m3: 3 mantissa bits; subnormal step 2^-9 of the scale
        scale = qw.scale.float().abs()
        assert bool((err <= 2**-4 * w.abs() + scale * 2**-9 + 1e-12).all())
        return
    flat = w.reshape(1, -1) if s.per_tensor else w
    gs = flat.shape[1] if s.group_size is None else s.group_size
    g = grouped(flat, gs)
    e = grouped(err.reshape(flat.shape), gs)
    qp = qw.qparams()
    sc = qp.scale.unsqueeze(-1)
    if fmt.kind == "codebook":
        cb = torch.tensor(fmt.codebook)
        half_gap = float((cb[1:] - cb[:-1]).max()) / 2
        inside = g.abs() <= sc.abs()
        bound = sc.abs() * half_gap
    else:
        # the codes' span, plus the half step that still rounds onto its end codes
        z = qp.zero.unsqueeze(-1) if qp.zero is not None else fmt.sym_zero
        lo, hi = sc * (0 - z), sc * (fmt.qmax - z)
        half = sc.abs() / 2
        inside = (g >= torch.minimum(lo, hi) - half) & (g <= torch.maximum(lo, hi) + half)
        bound = half
    tol = 1e-6 * g.abs().amax() + 1e-12
    assert bool((e[inside.expand_as(e)] <= (bound.expand_as(e) + tol)[inside.expand_as(e)]).all())
    # Min/max scales put (nearly) every value inside: asymmetric all of them; symmetric clamps
    # only values beyond the positive end code on the side opposite the largest magnitude.
    assert float(inside.float().mean()) == 1.0 if not s.symmetric else float(inside.float().mean()) > 0.95


@pytest.mark.parametrize("scheme", PRESETS)
@pytest.mark.parametrize("shape", [(16, 64), (7, 130), (5, 576), (3, 8)])
def test_round_trip_within_half_step(scheme, shape):
    g = torch.Generator().manual_seed(zlib.crc32(f"{scheme}{shape}".encode()))
    w = torch.randn(*shape, generator=g) * 0.05
    w[0, 0] = 0.3  # an outlier
    qw = QWeight.from_float(w, parse_scheme(scheme))
    _bound_ok(w, qw)
    assert qw.dequantize().shape == w.shape


@pytest.mark.parametrize("scheme", PRESETS)
def test_stored_bytes_are_exact(scheme):
    s = parse_scheme(scheme)
    n, k = 24, 200
    qw = QWeight.from_float(torch.randn(n, k), s)
    fmt = s.fmt
    if s.is_cast:
        assert qw.nbytes == n * k * 2
        return
    ng = 1 if s.per_tensor else (1 if s.group_size is None else math.ceil(k / s.group_size))
    rows = 1 if s.per_tensor else n
    data = n * k if fmt.kind == "float" else n * (math.ceil(k / 8) * 3 if fmt.bits == 3 else math.ceil(k * fmt.bits / 8))
    scales = rows * ng * fmt.scale_dtype.itemsize
    zeros = 0 if s.symmetric else rows * (math.ceil(ng / 8) * 3 if fmt.bits == 3 else math.ceil(ng * fmt.bits / 8))
    assert qw.nbytes == data + scales + zeros
    assert qw.bits_per_weight == pytest.approx(8 * qw.nbytes / (n * k))


@settings(max_examples=80, deadline=None)
@given(
    scheme=st.sampled_from(PRESETS),
    n=st.integers(1, 12),
    k=st.integers(1, 300),
    scale=st.floats(1e-3, 1e2),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(scheme, n, k, scale, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    _bound_ok(w, QWeight.from_float(w, parse_scheme(scheme)))


def test_symmetric_uses_every_level_and_keeps_the_extreme_exact():
    w = torch.linspace(-1, 0.9, 64).reshape(1, 64)
    qw = QWeight.from_float(w, parse_scheme("w4g64"))
    codes = qw.codes()
    assert int(codes.min()) == 0 and int(codes.max()) == 15
    assert float(qw.dequantize()[0, 0]) == pytest.approx(-1.0, abs=1e-3)  # fp16 scale rounding only


def test_asymmetric_zero_is_integer_and_zero_is_exact():
    w = torch.rand(4, 64) + 0.5  # all positive: the range is widened to include 0
    s = parse_scheme("w4g64-asym")
    qp = choose_qparams(w, s)
    assert torch.equal(qp.zero, qp.zero.round())
    zero_row = torch.zeros(1, 64)
    assert torch.equal(dequantize_codes(quantize_codes(zero_row, qp, s)[:1], qp, s)[:1], torch.zeros(1, 64))


def test_ragged_last_group_equals_zero_padding():
    w = torch.randn(6, 576)
    s = parse_scheme("w4g128")
    ragged = QWeight.from_float(w, s)
    padded = QWeight.from_float(torch.nn.functional.pad(w, (0, 64)), s)
    assert ragged.scale.shape == (6, 5)
    assert torch.equal(ragged.scale, padded.scale)
    assert torch.equal(ragged.dequantize(), padded.dequantize()[:, :576])


def test_per_tensor_has_one_scale():
    qw = QWeight.from_float(torch.randn(10, 30), parse_scheme("w8-tensor"))
    assert qw.scale.shape == (1, 1)


@pytest.mark.parametrize("scheme", ["w4g64", "w4g64-asym", "w3g64", "w2g32-asym", "nf4g64", "int8", "fp8"])
def test_mse_clip_search_never_worse_than_minmax(scheme):
    s = parse_scheme(scheme)
    w = torch.randn(32, 256) * torch.linspace(0.01, 1, 256)
    w[3, 7] = 8.0
    def err(qp):
        return float((QWeight.from_float(w, s, qp).dequantize() - w).pow(2).sum())
    assert err(mse_clip_search(w, s)) <= err(choose_qparams(w, s)) + 1e-9


def test_fake_quantize_is_straight_through():
    w = torch.randn(8, 64, requires_grad=True)
    s = parse_scheme("w4g64")
    y = fake_quantize(w, s)
    assert torch.allclose(y, QWeight.from_float(w.detach(), s).dequantize())
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise(bad):
    w = torch.randn(4, 64)
    w[2, 3] = bad
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        QWeight.from_float(w, parse_scheme("w4g64"), name="layer.weight")


def test_format_table_lookup():
    assert get_format("int4").qmax == 15 and get_format("int4").sym_zero == 8
    with pytest.raises(KeyError, match="known formats"):
        get_format("int5")
    assert all(f.name == name for name, f in FORMATS.items())


@pytest.mark.parametrize("scheme", ["int8", "w8g32-asym", "w4g64", "w4g128-asym", "w4-asym-tensor", "w2g32-asym", "w2g64"])
@pytest.mark.parametrize("n,k", [(16, 64), (17, 130), (5, 576)])
def test_tiled_layout_is_exact_and_counts_the_stored_bytes(scheme, n, k):
    w = torch.randn(n, k)
    rows = QWeight.from_float(w, parse_scheme(scheme))
    tiled = rows.to_layout("tiled")
    assert tiled.layout == "tiled" and tiled.can_tile()
    assert torch.equal(tiled.dequantize(), rows.dequantize())
    assert tiled.nbytes == rows.nbytes  # what a file stores, whatever the layout in memory
    back = tiled.to_layout("rows")
    for name, t in rows.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    idx = torch.tensor([n - 1, 0, n // 2])
    assert torch.equal(tiled.rows_subset(idx).dequantize(), rows.dequantize()[idx])


@pytest.mark.parametrize("scheme", ["w3g64", "nf4g64", "fp8", "bf16"])
def test_formats_without_a_tiled_layout_say_so(scheme):
    qw = QWeight.from_float(torch.randn(4, 64), parse_scheme(scheme))
    assert not qw.can_tile()
    with pytest.raises(ValueError, match="no tiled layout"):
        qw.to_layout("tiled")
