"""Every fast path against the reference, on random inputs with odd shapes."""

import pytest
import torch

from lowbit import kernels
from lowbit.kernels import KernelError, cpu
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.scheme import SchemeError, parse_scheme

VNNI_SCHEMES = ["int8", "w8g128", "w8-tensor", "w8-asym", "w4g32", "w4g64", "w4g128", "w4g64-asym", "w4g32-asym",
                "w4-tensor", "w4-asym-tensor", "w2g64-asym", "w2g128", "w2-asym", "w2g32", "w8g32-asym"]  # fmt: skip
SHAPES = [(1, 64, 1), (3, 96, 5), (5, 130, 7), (17, 576, 33), (1, 1000, 13), (67, 256, 9), (2, 8, 3)]


def _layer(scheme: str, k: int, n: int, seed: int, bias: bool = True, act_zero: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, k))  # uneven columns, as in real layers
    # static schemes: a scale that clips the large inputs the tests feed (|x| up to 40 -> 127 * 0.05)
    if not parse_scheme(scheme).act_static:
        return QuantLinear.from_float(lin, scheme)
    return QuantLinear.from_float(lin, scheme, act_scale=0.05, act_zero=act_zero)


def _activation_bound(mod: QuantLinear, x: torch.Tensor, block: int) -> torch.Tensor:
    """Worst-case effect of the kernel's int16 activation rounding: per block, half a step
    (absmax/32767/2) times the sum of |dequantized weights| in that block; shape (M, N)."""
    w = mod.qw.dequantize().abs()  # (N, K)
    k = x.shape[1]
    pad = -k % block
    xa = torch.nn.functional.pad(x.abs(), (0, pad)).reshape(x.shape[0], -1, block).amax(-1)  # (M, nb)
    wa = torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, block).sum(-1)  # (N, nb)
    return (xa / 32767 / 2) @ wa.t()


@pytest.mark.parametrize("scheme", VNNI_SCHEMES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_cpu_matches_reference(scheme, m, k, n, isa):
    s = parse_scheme(scheme)
    g = s.group_size
    if g is not None and g > k and g % 64:
        pytest.skip("group wider than the row")
    mod = _layer(scheme, k, n, seed=m * 7 + k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 2
    x[:, 0] = 40.0  # an activation outlier channel
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod, "cpu")
    assert mod.kernel == "cpu"
    got = mod(x)
    block = cpu._block(mod)
    bound = _activation_bound(mod, x, block)
    tol = bound * 1.001 + 1e-5 * ref.abs().amax() + 1e-6
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert bool(((got - ref).abs() <= tol).all()), float(((got - ref).abs() - tol).max())


def test_cpu_keeps_leading_dims_dtype_and_bias(isa):
    mod = _layer("w4g64", 128, 20, seed=3)
    x = torch.randn(2, 3, 128)
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod, "cpu")
    got = mod(x)
    assert got.shape == (2, 3, 20)
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3)
    xb = x.to(torch.bfloat16)
    assert mod(xb).dtype == torch.bfloat16
    nobias = _layer("int8", 64, 6, seed=4, bias=False)
    kernels.assign(nobias, "cpu")
    y = nobias(torch.zeros(1, 64))
    assert torch.equal(y, torch.zeros(1, 6))


def test_cpu_falls_back_to_reference_for_gradients(isa):
    mod = _layer("w4g64", 64, 4, seed=5)
    kernels.assign(mod, "cpu")
    x = torch.randn(2, 64, requires_grad=True)
    mod(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(
    "scheme, why",
    [("w3g64", "int3"), ("nf4g64", "nf4"), ("fp8", "fp8"), ("w4g16", "group size 16"), ("w2g16-asym", "group size 16")],
)
def test_auto_falls_back_with_a_visible_reason(scheme, why):
    """Formats the packed tiles do not take run on the any-format kernel, saying why."""
    mod = _layer(scheme, 128, 8, seed=6)
    kernels.assign(mod, "auto")
    assert mod.kernel == ("cpu-any" if cpu.unavailable_reason() is None else "float-copy")
    assert why in mod.kernel_note
    with pytest.raises(KernelError, match="cannot run"):
        kernels.assign(mod, "cpu")


def test_casts_run_in_their_dtype():
    for scheme in ("bf16", "fp16"):
        mod = _layer(scheme, 64, 8, seed=7)
        kernels.assign(mod, "auto")
        assert mod.kernel == "cast"
        x = torch.randn(3, 64)
        ref = torch.nn.functional.linear(x, mod.qw.dequantize(), mod.bias)
        assert torch.allclose(mod(x), ref, rtol=2e-2, atol=2e-2)


def test_unknown_kernel_name():
    mod = _layer("int8", 64, 4, seed=8)
    with pytest.raises(KernelError, match="unknown kernel"):
        kernels.assign(mod, "cuda-magic")


def test_auto_prefers_the_cpu_kernel_for_int4_int8(isa):
    for scheme in ("int8", "w4g64", "w4g128-asym"):
        mod = _layer(scheme, 576, 8, seed=9)
        kernels.assign(mod, "auto")
        assert mod.kernel == "cpu", mod.kernel_note


def test_reference_kernels_of_every_op():
    from lowbit.nn import QuantConv2d, QuantEmbedding

    conv = torch.nn.Conv2d(3, 5, 3, padding=1, groups=1)
    qc = QuantConv2d.from_float(conv, "int8")
    x = torch.randn(2, 3, 7, 7)
    assert torch.allclose(qc(x), torch.nn.functional.conv2d(x, qc.qw.dequantize(), conv.bias, padding=1), atol=1e-6)
    emb = torch.nn.Embedding(30, 24)
    qe = QuantEmbedding.from_float(emb, "w4g8")
    idx = torch.tensor([[1, 29, 3], [0, 0, 7]])
    assert torch.allclose(qe(idx), qe.qw.dequantize()[idx], atol=0)


A8_SCHEMES = [
    "w8a8", "w8g64a8", "w8a8-asym", "w8g32a8-asym", "w8a8-tensor",
    "w8a8g32", "w8a8g64-asym", "w8g128a8g64", "w8g32a8g64-asym", "w8g64a8g64",
    "w8a8-static", "w8g64a8-asym-static",
]  # fmt: skip


@pytest.mark.parametrize("scheme", A8_SCHEMES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w8a8_kernel_matches_reference_exactly(scheme, m, k, n, isa):
    """Integer arithmetic on both sides: only float summation order may differ."""
    mod = _layer(scheme, k, n, seed=m + 3 * k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)) * 3
    x[:, 0] = 40.0
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod, "cpu-a8")
    assert mod.kernel == "cpu-a8" and mod.layout == "tiled4"
    got = mod(x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("scheme", ["w8a8-static", "w8g64a8-asym-static"])
@pytest.mark.parametrize("zero", [-127, 51])
@pytest.mark.parametrize("m,k,n", SHAPES[:4])
def test_static_zero_point_kernel_matches_reference(scheme, zero, m, k, n, isa):
    """A zero point shifts the codes (unsigned inputs: -127); the kernel takes the shift back out
    through its bias and must agree with the reference, clipping at both ends included."""
    mod = _layer(scheme, k, n, seed=m + k, act_zero=zero)
    x = torch.rand(m, k, generator=torch.Generator().manual_seed(n)) * 10 - (0.0 if zero == -127 else 4.0)
    x[:, 0] = 40.0  # clipped at the top code
    if zero != -127:
        x[:, -1] = -40.0  # and at the bottom
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod, "cpu-a8")
    got = mod(x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=2e-5 * float(ref.abs().max()))


def test_w8a8_reference_quantizes_activations_per_token():
    from lowbit.kernels.reference import quantize_activations

    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 1.0, -3.0]])
    q = quantize_activations(x)
    assert torch.allclose(q[0], torch.tensor([1.0, -0.5, 0.25]), atol=1 / 127)  # its own scale: 1/127
    assert float(q[1, 1]) == pytest.approx(100 / 127, rel=1e-6)  # 1.0 rounds to one step of 100/127
    mod = _layer("w8a8", 64, 8, seed=1)
    kernels.assign(mod, "auto")
    assert mod.kernel in ("cpu-a8", "reference")
    with pytest.raises(KernelError):
        kernels.assign(mod, "cpu")  # the weight-only kernel would silently drop the a8


def test_activation_groups_quantize_each_block_on_its_own():
    from lowbit.kernels.reference import quantize_activations

    x = torch.cat([torch.full((1, 32), 0.01), torch.full((1, 32), 100.0), torch.full((1, 8), -0.5)], 1)
    per_token = quantize_activations(x)
    grouped = quantize_activations(x, 32)
    assert float(per_token[0, 0]) == 0.0  # 0.01 is below half a step of 100/127
    assert torch.allclose(grouped, x, rtol=1e-6)  # each block is constant: its own scale is exact
    assert grouped.shape == x.shape  # the last, short block (8 columns) is its own block
    with pytest.raises(SchemeError, match="multiple of 32"):
        parse_scheme("w8a8g48")
    with pytest.raises(SchemeError, match="divide"):
        parse_scheme("w8g96a8g64")
    with pytest.raises(SchemeError, match="dynamic"):
        parse_scheme("w8a8g64-static")
    assert str(parse_scheme("w8g128a8g64-asym")) == "w8g128a8g64-asym"


def test_static_activations_use_the_calibrated_scale_and_clip():
    mod = _layer("w8a8-static", 64, 8, seed=5)
    x = torch.full((2, 64), 0.5)
    x[1] = 100.0  # beyond 127 * 0.05: clipped to 6.35
    kernels.assign(mod, "reference")
    w = mod.qw.dequantize()
    want = torch.stack([torch.full((64,), 0.5), torch.full((64,), 127 * 0.05)]) @ w.t() + mod.bias
    assert torch.allclose(mod(x), want, rtol=1e-5, atol=1e-5)
    # unsigned codes (zero point -127): 255 levels over [0, 254 * 0.05]; negatives clip to 0
    u = _layer("w8a8-static", 64, 8, seed=5, act_zero=-127)
    kernels.assign(u, "reference")
    x = torch.stack([torch.full((64,), 0.5), torch.full((64,), 100.0), torch.full((64,), -1.0)])
    want = torch.stack([torch.full((64,), 0.5), torch.full((64,), 254 * 0.05), torch.zeros(64)]) @ w.t() + u.bias
    assert torch.allclose(u(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="zero point"):
        QuantLinear.from_float(torch.nn.Linear(64, 8), "w8a8-static", act_scale=0.1, act_zero=-128)
    with pytest.raises(ValueError, match="calibrated activation scale"):
        QuantLinear.from_float(torch.nn.Linear(64, 8), "w8a8-static")
    with pytest.raises(ValueError, match="finite and positive"):
        QuantLinear.from_float(torch.nn.Linear(64, 8), "w8a8-static", act_scale=float("nan"))
    with pytest.raises(ValueError, match="no static activation scale"):
        QuantLinear.from_float(torch.nn.Linear(64, 8), "w8a8", act_scale=0.1)


def test_activation_schemes_run_only_where_activations_are_quantized():
    for scheme in ("w4g64a8",):
        mod = _layer(scheme, 64, 8, seed=2)
        kernels.assign(mod, "auto")
        assert mod.kernel == ("cpu-any" if cpu.unavailable_reason() is None else "float-copy")
        assert "cpu-a8" in mod.kernel_note


def _conv(cin: int, cout: int, k: int, seed: int, zero: int, **conv) -> QuantConv2d:
    torch.manual_seed(seed)
    c = torch.nn.Conv2d(cin, cout, k, **conv)
    from lowbit.qweight import QWeight

    qw = QWeight.from_float(c.weight, parse_scheme("w8a8-static"))
    return QuantConv2d(qw, c.bias, QuantConv2d.conv_args(c), act_scale=0.05, act_zero=zero)


@pytest.mark.parametrize("zero", [-127, 0, 51])
@pytest.mark.parametrize("cin,cout,stride,hw", [(16, 24, 1, 7), (37, 5, 2, 9), (96, 576, 1, 3), (3, 8, 2, 1)])
def test_pointwise_conv_runs_the_int8_gemm_and_matches_reference(zero, cin, cout, stride, hw, isa):
    mod = _conv(cin, cout, 1, seed=cin + cout, zero=zero, stride=stride)
    x = torch.rand(2, cin, hw, hw + 1, generator=torch.Generator().manual_seed(hw)) * 10 - (0 if zero == -127 else 4)
    x[:, 0] = 40.0  # clipped
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod)
    assert mod.kernel == "cpu-a8" and mod.layout == "tiled4", mod.kernel_note
    got = mod(x)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-5, atol=2e-5 * float(ref.abs().max()))
    # a channels-last input (what the previous pointwise layer returns) gives the same result
    assert torch.allclose(mod(x.contiguous(memory_format=torch.channels_last)), got, rtol=1e-6, atol=1e-6)
    assert mod(x[:0]).shape == (0, *ref.shape[1:])  # an empty batch


@pytest.mark.parametrize("scheme", ["w8a8-static", "w8a8-asym-static", "w8a8-tensor-static"])
@pytest.mark.parametrize("zero", [-127, 0, 51])
@pytest.mark.parametrize("c,k,stride,pad,hw", [(16, 3, 1, 1, 7), (37, 3, 2, 1, 9), (8, 5, 2, 2, 6), (24, 3, 1, 0, 4)])
def test_depthwise_conv_integer_path_matches_reference(scheme, zero, c, k, stride, pad, hw, isa):
    from lowbit.qweight import QWeight

    torch.manual_seed(c + k)
    conv = torch.nn.Conv2d(c, c, k, stride=stride, padding=pad, groups=c)
    qw = QWeight.from_float(conv.weight, parse_scheme(scheme))
    mod = QuantConv2d(qw, conv.bias, QuantConv2d.conv_args(conv), act_scale=0.05, act_zero=zero)
    x = torch.rand(2, c, hw, hw + 1, generator=torch.Generator().manual_seed(hw)) * 10 - (0 if zero == -127 else 4)
    x[:, 0] = 40.0  # clipped
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod)
    assert mod.kernel == "cpu-dw-a8", mod.kernel_note
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):  # NCHW and channels-last inputs
        got = mod(inp)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, rtol=1e-5, atol=2e-5 * float(ref.abs().max()))
    assert mod(x[:0]).shape == (0, *ref.shape[1:])  # an empty batch


def test_convs_without_an_integer_path_stay_on_the_reference_with_a_reason(isa):
    for mod, why, kernel in (
        (_conv(3, 8, 3, 1, 0, padding=1), "3x3 kernel", "cpu-a8"),
        (_conv(8, 8, 1, 2, 0, padding=1), "padding", "cpu-a8"),
        (_conv(8, 16, 3, 3, 0, groups=8), "not depthwise", "cpu-dw-a8"),  # two filters per channel
        (_conv(8, 8, 3, 4, 0, groups=8, dilation=2), "dilation", "cpu-dw-a8"),
    ):
        kernels.assign(mod)
        assert mod.kernel == "reference", (mod.kernel, mod.kernel_note)
        with pytest.raises(KernelError, match=why):
            kernels.assign(mod, kernel)


def test_fractional_zero_points_keep_a_depthwise_conv_on_the_reference(isa):
    import lowbit

    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)).eval()
    x = [torch.rand(2, 16, 6, 6) for _ in range(2)]
    q = lowbit.quantize(conv, "w8a8-asym-static", method="hqq", calibration=x)  # hqq: float zero points
    assert q[0].kernel == "reference" and "cpu-dw-a8: fractional zero points" in q[0].kernel_note, q[0].kernel_note


def test_a_module_that_has_run_deep_copies_and_the_copy_runs_the_same(isa):
    import copy

    mod = _layer("w8a8-static", 96, 5, seed=3, act_zero=-127)
    kernels.assign(mod)
    x = torch.rand(3, 96)
    y = mod(x)  # the kernel has built its descriptor (raw pointers) now
    twin = copy.deepcopy(mod)
    assert twin.qweight.data_ptr() != mod.qweight.data_ptr()
    assert torch.equal(twin(x), y)


@pytest.mark.parametrize("scheme", ["w4g64", "w8g32-asym", "int8", "w8a8", "w2g32-asym"])
@pytest.mark.parametrize("magnitude", [1e-7, 1e9])
def test_float32_scales_run_on_the_cpu_kernels(scheme, magnitude, isa):
    """Weights beyond float16's range keep float32 scales; the kernels read them as they are."""
    mod = _layer(scheme, 200, 21, seed=11)
    with torch.no_grad():
        lin = torch.nn.Linear(200, 21)
        lin.weight.copy_(mod.qw.dequantize() * magnitude)
        lin.bias.mul_(magnitude)
    mod = QuantLinear.from_float(lin, scheme)
    assert mod.scales.dtype == torch.float32
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(2))
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod)
    assert mod.kernel in ("cpu", "cpu-a8"), mod.kernel_note
    got = mod(x)
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


ANY_SCHEMES = ["w3g64", "w3g128-asym", "nf4g64", "fp8", "w4g16", "w2g16-asym", "w4g64a8", "w3-asym", "w4-asym-tensor",
               "int8", "w8g48-asym", "w2g64", "nf4g32", "w4g64-asym", "w3g32"]  # fmt: skip


@pytest.mark.parametrize("scheme", ANY_SCHEMES)
@pytest.mark.parametrize("m,k,n", SHAPES + [(40, 200, 37)])
def test_any_format_kernel_matches_reference(scheme, m, k, n, isa):
    """Float arithmetic on both sides (no activation rounding): only summation order differs.
    40 input rows take the tiled-GEMM branch."""
    s = parse_scheme(scheme)
    if s.group_size is not None and s.group_size > k:
        pytest.skip("group wider than the row")
    mod = _layer(scheme, k, n, seed=m + k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 2
    x[:, 0] = 40.0
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod, "cpu-any")
    assert mod.kernel == "cpu-any" and mod.layout == "rows"
    got = mod(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6)


@pytest.mark.parametrize("m", [1, 3, 40])  # fused dot, dequantized row, tiles through torch's GEMM
def test_any_format_kernel_decodes_every_fp8_byte_as_torch_does(m, isa):
    """All 256 E4M3 patterns (subnormals, both zeros, the NaNs): row n holds code n only, so
    y[:, n] is code n's value times the input's single nonzero column."""
    mod = _layer("fp8", 24, 256, seed=0, bias=False)
    with torch.no_grad():
        mod.qweight.copy_(torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 24).view(mod.qweight.dtype))
        mod.scales.fill_(1.0)
    x = torch.zeros(m, 24)
    x[:, 5] = 1.0
    kernels.assign(mod, "cpu-any")
    assert mod.kernel == "cpu-any"
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    got = mod(x)
    assert torch.equal(got.isnan(), want.isnan().expand(m, 256))
    assert torch.equal(got.nan_to_num(), want.nan_to_num().expand(m, 256))


@pytest.mark.parametrize("scheme", ["w3g64-asym", "w4g16-asym"])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_any_format_kernel_gives_exact_zeros_with_float32_scales(scheme, m, isa):
    """w = (v - z) * s as the reference computes it: a code equal to its zero point is exactly 0
    even when the scale is float32 (weights beyond float16's range), so inf * w is NaN there too."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 6, bias=False)
    with torch.no_grad():
        lin.weight.normal_().mul_(1e6)
    mod = QuantLinear.from_float(lin, scheme)
    assert mod.scales.dtype == torch.float32 and mod.zeros is not None
    w = mod.qw.dequantize()
    n, k = (w == 0).nonzero()[0].tolist()
    x = torch.randn(m, 64)
    x[0, k] = float("inf")
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod, "cpu-any")
    got = mod(x)
    assert bool(ref[0, n].isnan())
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())


def test_hqq_fractional_zero_points_run_on_the_packed_kernel(isa, tmp_path):
    import lowbit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8)).eval()
    x = torch.randn(3, 256)
    q = lowbit.quantize(model, "w4g64-asym", method="hqq")
    assert q[0].zeros.dtype == torch.float16  # fractional zero points
    assert q[0].kernel == "cpu" and q[0].layout == "tiled", q[0].kernel_note
    got = q(x)
    lowbit.save(q, tmp_path / "m")  # stored in the row layout, float16 zeros as they were
    back = lowbit.load(tmp_path / "m", model=torch.nn.Sequential(torch.nn.Linear(256, 48), torch.nn.ReLU(),
                                                                 torch.nn.Linear(48, 8)))  # fmt: skip
    assert torch.equal(back[0].qw.to_layout("rows").zero, q[0].qw.to_layout("rows").zero)
    assert torch.equal(back(x), got)
    kernels.use_kernel(q, "reference")
    assert torch.allclose(got, q(x), rtol=1e-3, atol=1e-4)


def _run_py(code: str, **env):
    """``python -c code`` in a subprocess, LOWBIT_ISA unset unless given; the CompletedProcess."""
    import os
    import subprocess
    import sys

    e = {k: v for k, v in os.environ.items() if k != "LOWBIT_ISA"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=600)


def test_lowbit_isa_names_an_isa_or_fails_clearly(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "sse9")
    with pytest.raises(cpu.IsaError, match="LOWBIT_ISA=sse9: unknown ISA; choose from avx512, avx2, portable, reference"):
        cpu.use_isa(None)
    lacking = [n for n in cpu.ISAS if cpu.isa_reason(n) is not None and cpu.isa_reason(n).startswith("CPU lacks")]
    for name in lacking:  # e.g. avx512 on an AVX2-only machine
        monkeypatch.setenv("LOWBIT_ISA", name)
        with pytest.raises(cpu.IsaError, match=f"LOWBIT_ISA={name}: this machine cannot run it \\(CPU lacks"):
            cpu.use_isa(None)
    monkeypatch.setenv("LOWBIT_ISA", "reference")
    assert cpu.use_isa(None) == "reference"
    mod = _layer("w4g64", 128, 8, seed=1)
    kernels.assign(mod)
    assert mod.kernel == "float-copy" and "LOWBIT_ISA=reference" in mod.kernel_note
    assert "float32 copy of the weight kept in memory" in mod.kernel_note
    x = torch.randn(3, 128)
    y = mod(x)
    kernels.assign(mod, "reference")  # the definition: dequantize on every call
    assert torch.equal(mod(x), y)
    monkeypatch.delenv("LOWBIT_ISA")
    assert cpu.use_isa(None) == cpu.available_isas()[0]


def test_a_bad_lowbit_isa_stops_quantize_with_one_line():
    p = _run_py("import torch, lowbit; lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), 'w4g32')",
                LOWBIT_ISA="avx1024")  # fmt: skip
    assert p.returncode != 0 and "IsaError: LOWBIT_ISA=avx1024: unknown ISA" in p.stderr


CHECK_FALLBACK = """
import torch, lowbit
from lowbit.kernels import cpu
m = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), 'w4g32')
y = m(torch.randn(2, 64))
print(cpu.isa()); print(m[0].kernel); print(cpu.summary())
"""


def test_without_a_compiler_the_reference_runs_and_says_why(tmp_path):
    p = _run_py(CHECK_FALLBACK, CC=str(tmp_path / "no-such-cc"), LOWBIT_CACHE=str(tmp_path / "cache"))
    assert p.returncode == 0, p.stderr
    isa, kernel, summary = p.stdout.splitlines()
    assert (isa, kernel) == ("reference", "float-copy")  # no C kernels: dequantize once, not per call
    assert "no C compiler" in summary


def test_a_compiler_that_fails_for_vector_flags_leaves_the_portable_path(tmp_path):
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler here")
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do case "$a" in -mavx*) echo "unknown flag $a" >&2; exit 1;; esac; done\nexec {cc} "$@"\n')
    wrapper.chmod(0o755)
    p = _run_py(CHECK_FALLBACK, CC=str(wrapper), LOWBIT_CACHE=str(tmp_path / "cache"))
    assert p.returncode == 0, p.stderr
    isa, kernel, summary = p.stdout.splitlines()
    assert (isa, kernel) == ("portable", "cpu")
    for name in ("avx512", "avx2"):
        if not cpu._cpu_missing(name):  # a better ISA this CPU has, skipped with the build error
            assert f"skipped {name}: building the {name} CPU kernel failed" in summary, summary


@pytest.mark.parametrize("scheme", ["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_casts_agree_with_a_half_precision_matmul_at_every_batch(scheme, rows):
    """Batches from 16 rows widen the weight tile by tile where the CPU has no half GEMM: the same
    rounded inputs and products, float32 sums."""
    mod = _layer(scheme, 300, 70, seed=12)
    kernels.assign(mod)
    x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(rows))
    w = mod.qweight.float()
    want = (x.to(mod.qweight.dtype).float() @ w.t()).to(mod.qweight.dtype).float() + mod.bias
    ulp = torch.finfo(mod.qweight.dtype).eps * float(want.abs().max())  # one rounding of the output
    assert float((mod(x) - want).abs().max()) <= ulp


def _build_and_run_portable_check(cc: list[str], run: list[str], tmp_path) -> str:
    import subprocess
    from pathlib import Path

    root = Path(__file__).parent.parent
    exe = tmp_path / "portable_check"
    build = subprocess.run([*cc, "-O3", "-fopenmp", "-I", str(root / "src/lowbit/kernels/csrc"),
                            str(root / "tests/csrc/portable_check.c"), "-o", str(exe), "-lm"],
                           capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    p = subprocess.run([*run, str(exe)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "all passed (portable)" in p.stdout, p.stdout + p.stderr
    return p.stdout


def test_portable_kernel_standalone_check_here(tmp_path):
    """The C check that the emulator test runs, natively: it must pass (and fail on bad kernels).
    Tiled weight-only cases and any-format (row layout: int3, tables, odd groups) cases."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler here")
    out = _build_and_run_portable_check([cc], [], tmp_path)
    assert out.count("ok   lb_linear ") == 6 and out.count("ok   lb_linear_rows ") == 6


def test_portable_kernel_on_aarch64_under_qemu(tmp_path):
    """ARM (aarch64, NEON): the portable kernel cross-compiled and run under qemu-user."""
    import shutil
    from pathlib import Path

    missing = [t for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64") if shutil.which(t) is None]
    if not Path("/usr/aarch64-linux-gnu/include/stdlib.h").exists():
        missing.append("aarch64 C library headers")
    if missing:
        pytest.skip(f"no {' or '.join(missing)} here (make armtools: qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    out = _build_and_run_portable_check(["aarch64-linux-gnu-gcc"], ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"],
                                        tmp_path)  # fmt: skip
    assert out.count("ok   lb_linear ") == 6 and out.count("ok   lb_linear_rows ") == 6


@pytest.mark.parametrize("scheme", ["w4g64-asym", "w2g32-asym", "w8g128-asym", "w4-asym-tensor", "w2-asym"])
@pytest.mark.parametrize("m,k,n", SHAPES[:5])
def test_fractional_zero_points_on_the_packed_kernel_match_reference(scheme, m, k, n, isa):
    from lowbit.qweight import QWeight

    s = parse_scheme(scheme)
    if s.group_size is not None and s.group_size > k:
        pytest.skip("group wider than the row")
    base = _layer(scheme, k, n, seed=m + k)
    qw = base.qw.to_layout("rows")
    frac = (qw.zero_points() + torch.rand(qw.zero_points().shape, generator=torch.Generator().manual_seed(n))).half()
    mod = QuantLinear(QWeight(qw.scheme, qw.shape, qw.data, qw.scale, frac.contiguous()), base.bias)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 2
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod)
    assert mod.kernel == "cpu" and mod.layout == "tiled", mod.kernel_note
    got = mod(x)
    tol = _activation_bound(mod, x, cpu._block(mod)) * 1.001 + 1e-5 * ref.abs().amax() + 1e-6
    assert bool(((got - ref).abs() <= tol).all()), float(((got - ref).abs() - tol).max())
    assert torch.equal(mod.qw.to_layout("rows").zero, frac)  # the tiled layout keeps them exactly


@pytest.mark.parametrize("scheme", ["w4g64", "int8", "w8a8", "w2g32-asym"])
def test_nan_and_inf_inputs_come_out_as_the_reference_gives_them(scheme, isa):
    mod = _layer(scheme, 256, 4, seed=3)
    x = torch.randn(3, 256)
    x[0, 5], x[1, 7] = float("nan"), float("inf")
    kernels.assign(mod, "reference")
    ref = mod(x)
    kernels.assign(mod)
    got = mod(x)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.allclose(got[2], ref[2], rtol=1e-3, atol=1e-3)


def test_a_layer_group_gives_nan_and_inf_inputs_to_the_reference(isa):
    """lb_linear_many refuses NaN/inf inputs (-3); the group then runs each module, whose
    kernel hands them to the reference."""
    from lowbit.kernels.cpu import LinearGroup

    mods = [_layer("w4g64", 128, n, seed=n) for n in (16, 24)]
    for mod in mods:
        kernels.assign(mod)
    group = LinearGroup.of(mods)
    assert group is not None
    x = torch.randn(1, 128)
    x[0, 9] = float("-inf")
    got = group(x)
    for mod in mods:
        kernels.assign(mod, "reference")
    ref = torch.cat([mod(x) for mod in mods], -1)
    assert bool(ref.isnan().any() | ref.isinf().any())
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())


def test_a_bad_lowbit_isa_fails_before_quantize_works():
    code = "import torch, lowbit; lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), 'w4g32', method='hqq')"
    p = _run_py(code, LOWBIT_ISA="sse9")
    assert p.returncode != 0 and "IsaError: LOWBIT_ISA=sse9" in p.stderr
    assert "kernels.cpu.load_library()" in p.stderr  # raised at quantize's first step, before any weight
    assert "algorithms" not in p.stderr  # no quantization method ran
