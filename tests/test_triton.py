"""The GPU kernels (lowbit.kernels.triton) against the reference, on odd shapes.

On a machine with a CUDA GPU the tests run there; elsewhere Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before Triton is imported) runs the same kernels on CPU tensors, so CI checks
the kernels' math (unpacking, groups, zero points, tables, masking of ragged tiles) without a GPU.
Triton's interpreter multiplies bfloat16 tiles wrongly (its tl.dot), so bf16 GEMMs run on GPUs only.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401  (installed by `make setup`: the tests must not skip for want of it)

import lowbit
from lowbit import kernels
from lowbit.kernels import KernelError, reference
from lowbit.kernels import triton as tk
from lowbit.nn import QuantLinear
from lowbit.scheme import parse_scheme

from .conftest import tied_quantized_pair

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# every stored format and granularity: one-group blocks (groups a multiple of the block),
# looked-up groups (g48, int3's g32/g64 in the GEMM), per-channel, per-tensor, zero points
SCHEMES = ["int8", "w8g128", "w8-asym", "w8-tensor", "w4g32", "w4g128", "w4g64-asym", "w4-asym-tensor", "w4g48",
           "w3g64", "w3g32-asym", "w3g128", "w2g32-asym", "w2g64", "nf4g64", "nf4g32", "fp8", "w8a8", "w8a8g64"]  # fmt: skip
SHAPES = [(1, 64, 1), (3, 130, 7), (17, 576, 33), (1, 1000, 13), (20, 96, 5)]  # (rows M, K, N): GEMV and GEMM


@pytest.fixture
def device(monkeypatch):
    """"cuda" (first configurations only: tuning every shape would compile hundreds of kernels;
    test_tuning_on_a_gpu tunes), or "cpu" with Triton's interpreter (set by conftest)."""
    assert DEVICE == "cuda" or tk.interpreting(), "conftest sets TRITON_INTERPRET=1 on machines without a GPU"
    monkeypatch.setenv("LOWBIT_TRITON_TUNE", "0")
    return DEVICE


def _layer(scheme: str, k: int, n: int, seed: int, bias: bool = True, **kw) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, k))  # uneven columns, as in real layers
    return QuantLinear.from_float(lin, scheme, **kw)


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = (got.detach().float() - ref.detach().float()).abs().max()
    assert float(err) <= rtol * float(ref.detach().float().abs().max()) + 1e-6, float(err)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_triton_matches_reference(scheme, m, k, n, device):
    s = parse_scheme(scheme)
    if s.group_size is not None and s.group_size > k:
        pytest.skip("group wider than the row")
    mod = _layer(scheme, k, n, seed=m + k + n).to(device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(device) * 2
    x[:, 0] = 40.0  # an activation outlier channel
    ref = reference.linear(mod, x)
    kernels.assign(mod, "triton")
    assert mod.kernel == "triton" and mod.layout == "rows"
    _close(mod(x), ref, 2e-6)


@pytest.mark.parametrize("scheme", ["w4g64", "w3g64-asym", "nf4g64", "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 33])
def test_half_inputs_multiply_in_their_dtype(scheme, dtype, m, device):
    """fp16/bf16 activations: the GEMM's tiles are fp16/bf16 (tensor cores), sums float32; the
    output is rounded to the input dtype, so it is within a few of its ulps of the reference."""
    if device == "cpu" and dtype == torch.bfloat16 and m >= tk.GEMM_ROWS:
        pytest.skip("Triton's interpreter multiplies bfloat16 tiles wrongly; bf16 GEMMs are checked on GPUs")
    mod = _layer(scheme, 256, 40, seed=m).to(device)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(device=device, dtype=dtype)
    ref = reference.linear(mod, x)
    kernels.assign(mod, "triton")
    _close(mod(x), ref, 2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_fractional_zero_points_from_hqq(device):
    model = torch.nn.Sequential(torch.nn.Linear(192, 48), torch.nn.ReLU(), torch.nn.Linear(48, 24))
    lowbit.quantize(model, "w4g64-asym", method="hqq", kernel="reference")
    assert model[0].zeros.dtype == torch.float16  # HQQ's zero points are not integers
    model.to(device)
    x = torch.randn(5, 192, device=device)
    ref = model(x)
    kernels.use_kernel(model, "triton")
    assert {model[0].kernel, model[2].kernel} == {"triton"}
    _close(model(x), ref, 2e-6)


@pytest.mark.parametrize("scheme,zero", [("w8a8", 0), ("w8a8-static", 0), ("w8a8-static", -127), ("w8a8-static", 51),
                                         ("w8a8-tensor", 0)])  # fmt: skip
@pytest.mark.parametrize("m", [1, 20, 65])
def test_w8a8_int_mm_matches_reference(scheme, zero, m, device):
    """cuda-a8: int8 x int8 in int32 through torch._int_mm, the same integers as the reference's
    float32 sums; up to INT_MM_ROWS rows it hands the batch to the weight-only kernel."""
    static = parse_scheme(scheme).act_static
    mod = _layer(scheme, 128, 40, seed=m, **({"act_scale": 0.05, "act_zero": zero} if static else {})).to(device)
    x = (torch.rand(m, 128, generator=torch.Generator().manual_seed(m)) * 10 - 4).to(device)
    x[:, 0] = 40.0  # clipped by the static scale
    ref = reference.linear(mod, x)
    kernels.assign(mod, "cuda-a8")
    assert mod.kernel == "cuda-a8"
    _close(mod(x), ref, 2e-6)


def test_w8a8_shapes_the_int8_gemm_cannot_take_go_to_triton(device):
    mod = _layer("w8a8", 100, 37, seed=0).to(device)  # K, N not multiples of 8
    assert "multiples of 8" in tk.supports_a8(mod)
    kernels.assign(mod, "auto" if device == "cuda" else "triton")
    assert mod.kernel == "triton"
    x = torch.randn(20, 100, device=device)
    _close(mod(x), reference.linear(mod, x), 2e-6)


def test_leading_dims_strides_bias_and_state(device):
    mod = _layer("w4g32", 96, 24, seed=1).to(device)
    kernels.assign(mod, "triton")
    x = torch.randn(2, 96, 9, device=device).transpose(1, 2)  # (2, 9, 96), not contiguous
    _close(mod(x), reference.linear(mod, x), 2e-6)
    # a replaced weight is read again (the launch state is keyed on the buffers)
    before = mod(x[0])
    mod.set_qweight(_layer("w4g32", 96, 24, seed=2).to(device).qw)
    after = mod(x[0])
    _close(after, reference.linear(mod, x[0]), 2e-6)
    assert not torch.allclose(after, before)
    mod.bias = None
    _close(mod(x[0]), reference.linear(mod, x[0]), 2e-6)


def test_a_model_runs_triton_end_to_end_after_load(tmp_path, device):
    """save -> load(device=...) -> the Triton kernel for every Linear (chosen automatically on a
    GPU, named on the CPU), the output as the reference's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 48), torch.nn.Linear(48, 96), torch.nn.GELU(),
                                torch.nn.Linear(96, 64))  # fmt: skip
    lowbit.quantize(model, "w4g16-asym", kernel="reference")
    ids = torch.randint(0, 64, (2, 7))
    ref = model(ids)
    lowbit.save(model, tmp_path / "m")
    skeleton = torch.nn.Sequential(torch.nn.Embedding(64, 48), torch.nn.Linear(48, 96), torch.nn.GELU(),
                                   torch.nn.Linear(96, 64))  # fmt: skip
    loaded = lowbit.load(tmp_path / "m", model=skeleton, device=device, kernel="auto" if device == "cuda" else "triton")
    assert [loaded[i].kernel for i in (1, 3)] == ["triton", "triton"]
    assert loaded[1].qweight.device.type == device and loaded[1].qweight.dtype == torch.uint8
    _close(loaded(ids.to(device)).cpu(), ref, 2e-6)


def test_cpu_weights_get_gpu_kernels_only_when_named_under_the_interpreter(monkeypatch):
    mod = _layer("w4g64", 128, 16, seed=0)
    kernels.assign(mod)  # auto on the CPU, interpreter or not: the CPU kernels, and no word about GPUs
    assert mod.kernel in ("cpu", "float-copy") and "triton" not in mod.kernel_note
    a8 = _layer("w8a8", 128, 16, seed=0)
    kernels.assign(a8)
    assert a8.kernel != "cuda-a8" and "cuda" not in a8.kernel_note
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelError, match="not a CUDA GPU"):
        kernels.assign(mod, "triton")
    with pytest.raises(KernelError, match="not a CUDA GPU"):
        kernels.assign(a8, "cuda-a8")


def test_a_device_the_kernels_do_not_run_on_gets_the_reference_and_the_reason():
    """meta stands in for any device without GPU kernels (a GPU without Triton, an old GPU): the
    reference kernel, which runs wherever torch does, with the reason the GPU kernel gave."""
    mod = _layer("w4g64", 128, 16, seed=0).to("meta")
    kernels.assign(mod)
    assert mod.kernel == "reference"
    assert "triton: the weight is on the meta device (triton runs on cuda)" in mod.kernel_note
    with pytest.raises(KernelError, match="cpu runs on cpu"):
        kernels.assign(mod, "cpu")


def test_a_move_keeps_tied_weights_one_tensor_in_the_stored_layout():
    """model.to(device) moves the packed tensors (never a float copy), comes back to the row
    layout from a CPU kernel's tiled one, keeps a tied embedding / LM head one tensor there, and
    chooses kernels again."""
    model = tied_quantized_pair()
    model[1](torch.randn(2, 32))  # the CPU kernel (or the float copy) in place
    assert model[0].qweight is model[1].qweight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (2, 5))
    want = model[1](model[0](x))
    model.to("meta")
    assert model[0].qweight is model[1].qweight and model[0].scales is model[1].scales
    assert model[1].layout == "rows" and model[1].qweight.dtype == torch.uint8
    assert model[1].kernel == "unassigned" and "meta" in model[1].kernel_note
    # back on the CPU (to_empty, then the values), the pair chooses its kernels together at the
    # first call: the head's layout conversion is the embedding's too, one tensor still
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    assert model[0].qweight is model[1].qweight
    torch.testing.assert_close(model[1](model[0](x)), want)
    assert model[0].qweight is model[1].qweight and model[0].layout == model[1].layout


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_reference_kernel_builds_nothing_on_the_cpu(scheme):
    """The fallback on any device (no Triton, an old GPU; an empty batch or a gradient on every
    device): meta stands for a GPU, where a CPU tensor in the arithmetic is an error. (Static
    activation schemes read their zero point as a number, which meta tensors cannot give.)"""
    mod = _layer(scheme, 96, 8, seed=0).to("meta")
    assert reference.linear(mod, torch.randn(2, 96, device="meta")).shape == (2, 8)
    if parse_scheme(scheme).act_bits is None:
        emb = lowbit.nn.QuantEmbedding.from_float(torch.nn.Embedding(10, 96), scheme).to("meta")
        assert reference.embedding(emb, torch.tensor([[1, 2]], device="meta")).shape == (1, 2, 96)


def test_a_kernel_asked_for_that_does_not_run_on_the_new_device_gives_way_to_auto():
    mod = _layer("w4g32", 64, 16, seed=0)
    kernels.assign(mod, "cpu-any")
    mod.to("meta")
    assert mod.kernel_pref == "auto" and "cpu-any, asked for before, does not run there" in mod.kernel_note
    kernels.assign_at_first_call(mod)
    assert mod.kernel == "reference"


@pytest.mark.parametrize("dev", ["gpu0", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_load_refuses_a_bad_device_before_reading(tmp_path, dev):
    with pytest.raises(ValueError, match=f"device '{dev}'"):
        lowbit.load(tmp_path / "nothing-here", device=dev)  # (no such directory: the device fails first)


@pytest.mark.parametrize("dev,want", [(DEVICE, "triton" if DEVICE == "cuda" else None), ("meta", "reference")])
def test_inspect_shows_the_kernels_of_a_device(tmp_path, digits, dev, want):
    """`lowbit inspect --device`: the kernel each layer gets there; where the GPU kernels cannot
    run (meta stands for any such device), the reference and why."""
    import copy

    model = lowbit.quantize(copy.deepcopy(digits[0].model), "w4g16")
    lowbit.save(model, tmp_path / "d", source="digits-cnn")
    want = want or model.fc2.kernel  # on the CPU: what the CPU gets
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "inspect", str(tmp_path / "d"), "--device", dev],
                       capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("fc2 "))
    assert f" {want} " in line
    if dev == "meta":
        assert "runs on cuda" in line


@pytest.mark.skipif(DEVICE != "cuda", reason="tuning times configurations on a GPU")
def test_tuning_on_a_gpu_keeps_the_fastest_configuration():
    mod = _layer("w4g128", 4096, 1024, seed=0).cuda()
    kernels.assign(mod, "triton")
    for m in (1, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        _close(mod(x), reference.linear(mod, x), 3e-3)
    assert len(tk._TUNED) >= 2


def test_the_gpu_benchmark_script_runs(tmp_path):
    """benchmarks/gpu.py --smoke: the device run's script, on tiny shapes under the interpreter
    (its figures mean nothing; this keeps the one-shot GPU run from failing on a script error)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root / "src"), PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path / "g.json")],
                       capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    res = json.loads((tmp_path / "g.json").read_text())
    assert {r["variant"] for r in res["layers"]} >= {"lowbit w4g128 (triton)", "lowbit w8a8 (cuda-a8)"}
    assert all(r["max_rel_error"] < 3e-3 for r in res["layers"] if "max_rel_error" in r)  # fp16 outputs
    assert [r["kernels"] for r in res["decode"] if "kernels" in r] == [["triton"]] * 4


def test_lowbit_generate_runs_on_the_gpu_kernels(device):
    """lowbit's decoder places its KV cache, rotary tables and masks on the model's device; on
    the Triton kernels its greedy tokens are transformers' on the same quantized model."""
    from tests.test_generate import hf_greedy, tiny_llama

    m = lowbit.quantize(tiny_llama(), "w4g32").to(device)
    kernels.use_kernel(m, "auto" if device == "cuda" else "triton")
    assert {mod.kernel for mod in m.modules() if isinstance(mod, QuantLinear)} == {"triton"}
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    got = lowbit.generate(m, ids, 12, eos_token_id=[])
    assert torch.equal(got, hf_greedy(m, ids.to(device), 12).cpu())


@pytest.mark.parametrize("scheme", ["w4g48", "w3g64", "w4g32"])
@pytest.mark.parametrize("magnitude", [1e-6, 1e5])
def test_fp16_inputs_keep_the_range_of_far_from_unit_weights(scheme, magnitude, device):
    """Weights whose scales only float32 holds (lowbit stores float32 scales for them): fp16
    activations must not overflow or flush the decoded values, whichever GEMM path the group
    size takes (one scale per block: code - zero in fp16, scaled in float32; else float32 tiles)."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(192, 24)
    with torch.no_grad():
        lin.weight.mul_(magnitude / lin.weight.abs().max())
    mod = QuantLinear.from_float(lin, scheme).to(device)
    x = torch.randn(4, 192, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=torch.float16)
    x = x * (1e-3 if magnitude > 1 else 1.0)  # outputs inside fp16's range
    ref = reference.linear(mod, x)
    kernels.assign(mod, "triton")
    got = mod(x)
    assert torch.isfinite(got).all()
    _close(got, ref, 3e-3)


def test_pruning_masks_pack_and_unpack_off_the_cpu():
    """Pruned layers keep a bit mask, read by repr, sparsity, size and the state dict: its bit
    table is built on the mask's device (meta stands for a GPU; it cannot sum to a number, so
    the rest is checked through the shapes)."""
    from lowbit.sparse import pack_mask, unpack_mask

    mask = torch.rand(6, 21, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask.to("meta"))
    assert packed.device.type == "meta" and packed.shape == (6, 3) and packed.dtype == torch.uint8
    assert unpack_mask(packed, 21).shape == (6, 21)
    assert torch.equal(unpack_mask(pack_mask(mask), 21), mask)
