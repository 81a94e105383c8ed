"""GPU kernels: lowbit's packed weights multiplied on NVIDIA GPUs, from the stored codes.

Kernels (registered in :mod:`lowbit.kernels`):

``triton`` (linear)
    Weight-only GEMV (decode: one input row) and GEMM (from :data:`GEMM_ROWS` rows: batched
    decode, prefill) in
    Triton over the stored row layout (:mod:`lowbit.packing`: nothing is converted, nothing
    dequantized to memory): int2, int3, int4 and int8 codes with per-group, per-channel or
    per-tensor scales, symmetric or with integer or fractional (HQQ) zero points; NF4 and FP8
    E4M3 through a table of their codes' values. The GEMM decodes each tile in registers to the
    activations' dtype and multiplies on the tensor cores with float32 sums (AWQ's and
    Marlin's weight-only design: Lin et al. 2024, Frantar et al. 2024). Activation-quantized
    schemes are rounded to their grid first (:func:`lowbit.kernels.reference.linear_input`),
    so this kernel also runs any scheme ``cuda-a8`` cannot.
``cuda-a8`` (linear)
    W8A8: per-channel symmetric int8 weights times per-token dynamic (or static) int8
    activations through ``torch._int_mm`` (cuBLASLt int8 GEMM, int32 sums), rescaled in float32;
    batches of at most :data:`INT_MM_ROWS` rows go to ``triton`` instead.

Block sizes are chosen per shape: on a GPU, the first call for a (kernel, format, rows
bucket, N, K, dtype) times a bounded set of configurations (at most eight, with
``triton.testing.do_bench``) and keeps the fastest for the process; with
``LOWBIT_TRITON_TUNE=0`` the first configuration is taken, under the interpreter the largest.

Where they run: CUDA tensors on GPUs of compute capability :data:`MIN_CAPABILITY` or newer, with
the ``triton`` package installed (``pip install 'lowbit[gpu]'``). ``TRITON_INTERPRET=1`` runs
the same kernels on CPU tensors through Triton's interpreter when they are named (``kernel=
"triton"``; "auto" never picks them for CPU weights): slow, what the tests use on machines
without a GPU. Triton reads that variable when it is imported, so it must be set before. Elsewhere ``supports`` returns the reason and the registry falls back
to the reference kernel, which dequantizes on the device.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from .. import packing
from . import reference

__all__ = ["linear", "linear_a8", "supports", "supports_a8", "interpreting", "MIN_CAPABILITY", "GEMM_ROWS", "INT_MM_ROWS"]

MIN_CAPABILITY = (8, 0)  # Ampere and newer: bf16 tensor-core dots, the GPUs 7B-70B models are served on
# From 2 input rows the tensor-core GEMM runs (tiles of at least 16 rows, the ragged ones masked):
# it reads each weight tile once for all rows, where the GEMV would read the weight once per row.
GEMM_ROWS = 2
INT_MM_ROWS = 16  # W8A8 batches of at most this many rows run the weight-only kernel (decode)

_TUNED: dict[tuple, tuple] = {}


def interpreting() -> bool:
    """Whether Triton's interpreter is asked for (``TRITON_INTERPRET=1``): the kernels then run
    on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'lowbit[gpu]'"
    return None


def _jit():
    """The kernel module, :mod:`lowbit.kernels._triton_jit` (imported at first use, so that
    importing lowbit never imports Triton). Triton decides at its own import whether it
    interprets, so ``TRITON_INTERPRET=1`` must be set before anything imports it."""
    import triton

    from . import _triton_jit

    if interpreting() != (type(triton.language.zeros).__name__ == "InterpretedFunction"):
        raise RuntimeError(
            "TRITON_INTERPRET changed after triton was imported: set it before anything imports triton "
            "(Triton chooses interpreted or compiled kernels at its import)"
        )
    return _triton_jit


def _device_reason(t: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on ``t``'s device (``None``: they can)."""
    if t.device.type == "cuda":
        if torch.version.hip is not None:
            return "ROCm GPUs: the Triton kernels are tested on NVIDIA GPUs only"
        cc = torch.cuda.get_device_capability(t.device)
        if cc < MIN_CAPABILITY:
            return (f"compute capability {cc[0]}.{cc[1]}; the Triton kernels need "
                    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere, Ada, Hopper, Blackwell)")  # fmt: skip
        return None
    if t.device.type == "cpu" and interpreting():
        return None
    return (f"the weight is on the {t.device.type} device, not a CUDA GPU "
            "(TRITON_INTERPRET=1 runs these kernels on the CPU, slowly, for tests, when named)")  # fmt: skip


def supports(mod) -> str | None:
    """``None`` if the ``triton`` kernel runs ``mod``, else the reason: Triton missing, a weight
    not on a supported GPU, a plain bf16/fp16 cast (``cast`` runs those) or zero points of an
    unexpected dtype."""
    s = mod.scheme
    if s.is_cast:
        return "a bf16/fp16 cast (the cast kernel runs it)"
    kind = s.fmt.kind
    if kind == "affine" and s.bits not in packing.PACKABLE_BITS:
        return f"{s.bits}-bit codes"
    if kind == "float" and s.fmt.name != "fp8_e4m3":
        return f"{s.fmt.name} weights"
    if mod.zeros is not None and mod.zeros.dtype not in (torch.uint8, torch.float16):
        return f"{mod.zeros.dtype} zero points"
    return _device_reason(mod.qweight) or _triton_reason()


def _table(mod, device) -> torch.Tensor | None:
    """The values of the codes of table formats, float32: NF4's 16 levels; FP8 E4M3's 256 bytes."""
    fmt = mod.scheme.fmt
    if fmt.kind == "codebook":
        return torch.tensor(fmt.codebook, dtype=torch.float32, device=device)
    if fmt.kind == "float":
        return torch.arange(256, dtype=torch.uint8).view(fmt.torch_dtype).float().to(device)
    return None


def _state(mod) -> dict:
    """What the launches need, derived once from ``mod``'s buffers (rebuilt when one is
    replaced): the codes as bytes, scales with their row stride, zero points unpacked to one
    byte per group (integer) or as stored (float16), the value table, the bias."""
    buffers = mod._buffers
    key = (buffers["qweight"], buffers["scales"], buffers["zeros"], mod.bias)
    st = mod._kernel_state
    if st is not None and all(a is b for a, b in zip(st["key"], key)):
        return st
    if mod.layout != "rows":
        raise RuntimeError("the Triton kernels read the row layout; assign them with lowbit.kernels.assign()")
    s = mod.scheme
    qw = mod.qweight
    dev = qw.device
    n, k = mod.weight_shape[0], math.prod(mod.weight_shape[1:])
    scales = mod.scales.contiguous()
    ng = scales.shape[1]
    zeros = mod.zeros
    if zeros is not None and zeros.dtype == torch.uint8:  # bit-packed integer zero points: one byte each
        zeros = packing.unpack(zeros.cpu(), s.bits, ng).to(dev)
    kind = s.fmt.kind
    bits, nb, per = (8, 1, 1) if kind == "float" else (s.bits, 3, 8) if s.bits == 3 else (s.bits, 1, 8 // s.bits)
    st = {
        "key": key, "n": n, "k": k, "ng": ng,
        "q": qw.view(torch.uint8) if qw.dtype != torch.uint8 else qw,
        "s": scales, "s_stride": ng if scales.shape[0] > 1 else 0,
        "z": zeros.contiguous() if zeros is not None else None,
        "z_stride": (ng if zeros.shape[0] > 1 else 0) if zeros is not None else 0,
        "lut": _table(mod, dev),
        "bias": None if mod.bias is None else mod.bias.detach().float().contiguous(),
        "group": k if ng == 1 else (s.group_size or k),
        "const": {"KIND": 0 if kind == "affine" else 1, "HAS_ZERO": zeros is not None,
                  "SYM_ZERO": s.fmt.sym_zero if kind == "affine" else 0, "BITS": bits, "NB": nb, "PER": per},
    }  # fmt: skip
    mod._kernel_state = st
    return st


def _block_ks(st: dict, least: int, most: int) -> list[tuple[int, bool]]:
    """K blocks (columns, a multiple of the codes per unit, at least ``least`` units, at most
    ``most`` columns unless ``least`` units need more) with whether every block lies in one scale
    group; largest first, at most three."""
    per, group, k = st["const"]["PER"], st["group"], st["k"]
    top = max(least * per, min(most, 1 << max(0, (k - 1).bit_length())))  # no block much wider than the row
    out = [(bk, True) for bk in (512, 256, 128, 64, 32, 16, 8)
           if bk % per == 0 and bk // per >= least and bk <= top and (st["ng"] == 1 or group % bk == 0)]  # fmt: skip
    if not out:  # groups smaller than any block (or of odd size): each element's group is looked up
        out = [(max(128, least * per), False)]
    return out[:3]


def _configs(st: dict, rows: int, gemm: bool) -> list[dict]:
    """The bounded set of launch configurations tried for a shape."""
    if not gemm:
        return [{"BLOCK_N": bn, "BLOCK_U": bk // st["const"]["PER"], "ONE_GROUP": one, "num_warps": 4}
                for bk, one in _block_ks(st, 1, 512)[:2] for bn in (8, 16, 32)][:8]  # fmt: skip
    # GEMM: K blocks of at most 128 columns (fp16 tiles of x and of the decoded weight are staged
    # in shared memory, num_stages deep), at least 16 units (tl.dot's smallest K)
    bk, one = _block_ks(st, 16, 128)[0]
    bu = bk // st["const"]["PER"]
    tiles = [(16, 64, 4), (32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8), (128, 256, 8)]
    most = max(16, 1 << (rows - 1).bit_length())
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_U": bu, "ONE_GROUP": one, "GROUP_M": 8, "num_warps": w,
             "num_stages": 3} for bm, bn, w in tiles if bm <= most][:8]  # fmt: skip


def _launch(st: dict, x2: torch.Tensor, y: torch.Tensor, cfg: dict, gemm: bool) -> None:
    jit = _jit()
    m = x2.shape[0]
    dummy = st["s"]  # an unused pointer argument still needs a tensor on the device
    args = (x2, st["q"], st["s"], st["z"] if st["z"] is not None else dummy,
            st["lut"] if st["lut"] is not None else dummy, st["bias"] if st["bias"] is not None else dummy, y)  # fmt: skip
    const = dict(st["const"], HAS_BIAS=st["bias"] is not None, **cfg)
    shape = (st["n"], st["k"], st["q"].shape[1], st["group"], x2.stride(0), y.stride(0), st["s_stride"], st["z_stride"])
    # fp16 tiles hold ``code - zero`` exactly when one scale covers the block; scaled values of
    # far-from-unit weights (float32 scales) would overflow or lose their digits in fp16
    ieee = x2.dtype == torch.float32 or (x2.dtype == torch.float16 and not cfg["ONE_GROUP"])
    with torch.cuda.device(x2.device) if x2.device.type == "cuda" else contextlib.nullcontext():  # the weight's GPU
        if gemm:
            grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(st["n"], cfg["BLOCK_N"]),)
            jit.gemm[grid](*args, m, *shape, IEEE=ieee, **const)
        else:
            jit.gemv[(triton_cdiv(st["n"], cfg["BLOCK_N"]), m)](*args, *shape, **const)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tuned(st: dict, x2: torch.Tensor, y: torch.Tensor, gemm: bool) -> dict:
    """The configuration to launch with: the fastest of :func:`_configs` on this GPU for this
    shape (timed once per process); the first with ``LOWBIT_TRITON_TUNE=0`` or while a CUDA graph
    is captured; under the interpreter the one with the fewest programs."""
    rows = x2.shape[0]
    configs = _configs(st, rows, gemm)
    if x2.device.type != "cuda":  # the interpreter runs programs one after another: fewest programs
        return max(configs, key=lambda c: (c.get("BLOCK_M", 1) * c["BLOCK_N"], c["BLOCK_U"]))
    if len(configs) == 1 or os.environ.get("LOWBIT_TRITON_TUNE") == "0" or torch.cuda.is_current_stream_capturing():
        return configs[0]  # (no timing inside a CUDA graph's capture)
    bucket = 1 << (rows - 1).bit_length()
    key = (gemm, bucket, st["n"], st["k"], st["q"].shape[1], st["group"], x2.dtype, tuple(st["const"].items()),
           st["bias"] is not None, torch.cuda.get_device_name(x2.device))  # fmt: skip
    best = _TUNED.get(key)
    if best is None:
        from triton.testing import do_bench

        times, error = [], None
        for cfg in configs:
            try:
                times.append((do_bench(lambda c=cfg: _launch(st, x2, y, c, gemm), warmup=5, rep=20), cfg))
            except Exception as e:  # a configuration this GPU cannot compile (shared memory): not a candidate
                error = e
        if not times:
            raise RuntimeError(f"no Triton configuration compiled for {st['n']}x{st['k']} on this GPU") from error
        best = _TUNED[key] = min(times, key=lambda t: t[0])[1]
    return best


def linear(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` -> ``(..., N)`` in ``x``'s dtype. float16/bfloat16/float32 inputs are
    multiplied in their dtype (float32: IEEE, not TF32) with float32 sums, except fp16 GEMMs
    whose groups do not align with the K block (float32 tiles: fp16's range); others as float32.
    Activation-quantized schemes round ``x`` to their grid first (then float32)."""
    st = _state(mod)
    xf = reference.linear_input(mod, x) if mod.scheme.act_bits else x
    if xf.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        xf = xf.float()
    x2 = xf.reshape(-1, st["k"])
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != st["k"]):
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], st["n"], dtype=x2.dtype, device=x2.device)
    gemm = x2.shape[0] >= GEMM_ROWS
    _launch(st, x2, y, _tuned(st, x2, y, gemm), gemm)
    return y.reshape(*x.shape[:-1], st["n"]).to(x.dtype)


def supports_a8(mod) -> str | None:
    """``None`` if ``cuda-a8`` runs ``mod``: int8 per-channel (or per-tensor) symmetric weights,
    8-bit per-token or static activations, N and K multiples of 8 (cuBLASLt's int8 GEMM), on a
    supported GPU (or CPU tensors under the interpreter)."""
    s = mod.scheme
    if s.act_bits != 8:
        return "not an int8-activation (W8A8) scheme"
    if s.fmt.name != "int8" or not s.symmetric or (s.group_size is not None and not s.per_tensor):
        return f"{s} (needs int8 per-channel symmetric weights)"
    if s.act_group is not None:
        return f"activation groups of {s.act_group} (needs one scale per token)"
    n, k = mod.weight_shape[0], math.prod(mod.weight_shape[1:])
    if n % 8 or k % 8:
        return f"shape {n}x{k} (the int8 GEMM needs multiples of 8)"
    return _device_reason(mod.qweight) or _triton_reason()


def _act_zero(mod) -> int:
    """The static activation zero point as a Python int, read from the GPU once per buffer."""
    memo = getattr(mod, "_act_zero_read", None)
    if memo is None or memo[0] is not mod.act_zero:
        memo = mod._act_zero_read = (mod.act_zero, int(mod.act_zero))
    return memo[1]


def linear_a8(mod, x: torch.Tensor) -> torch.Tensor:
    """W8A8 ``x (..., K)`` -> ``(..., N)`` in ``x``'s dtype: the activations quantized per token
    (``s = absmax / 127``) or with the calibrated scale and zero point, ``torch._int_mm`` with
    the weight's signed codes (``code - 128``, made from the stored bytes each call: a temporary
    of the weight's size, no copy kept), then ``y = s_x * s_w * (sum - zero * sum_k w)`` in float32 plus the bias. The same
    integers as :func:`reference.linear`'s float32 sums of the rounded values."""
    n, k = mod.weight_shape[0], math.prod(mod.weight_shape[1:])
    x2 = x.reshape(-1, k).float()
    rows = x2.shape[0]
    if rows <= INT_MM_ROWS and supports(mod) is None:
        return linear(mod, x)
    if mod.scheme.act_static:
        sx = mod.act_scale.float()
        z = int(mod.act_zero) if mod.act_zero.device.type == "cpu" else _act_zero(mod)
        q = (torch.round(x2 / sx) + z).clamp_(-127, 127)
    else:
        sx = x2.abs().amax(-1, keepdim=True) / 127.0
        z = 0
        q = torch.round(x2 / torch.where(sx == 0, 1.0, sx)).clamp_(-127, 127)
    q = q.to(torch.int8)
    if rows <= 16:  # torch._int_mm needs more than 16 rows
        q = torch.nn.functional.pad(q, (0, 0, 0, 17 - rows))
    w = torch.bitwise_xor(mod.qweight.view(torch.int8), -128)  # code - 128: uint8 codes -> int8, exact
    acc = torch._int_mm(q, w.t())[:rows].float()
    if z:
        acc -= z * w.sum(1, dtype=torch.int32).float()
    y = acc * sx * mod.scales.float().reshape(1, -1)
    if mod.bias is not None:
        y += mod.bias.float()
    return y.reshape(*x.shape[:-1], n).to(x.dtype)
