"""The AVX-512 VNNI CPU kernel (``csrc/lowbit_cpu.c``): build, load, and call it.

The C library is compiled on first use with the system C compiler into the cache directory
(named by a hash of its source and flags, so an edited source rebuilds) and opened with ctypes.
It reads lowbit's packed storage as it is: no second copy of the weights exists at run time.

``supports(module)`` returns ``None`` when this kernel can run the module, else the reason it
cannot (shown by ``lowbit inspect``); the registry then falls back to the reference kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

from ..cache import cache_dir

__all__ = ["supports", "linear", "load_library", "unavailable_reason", "CFLAGS"]

CFLAGS = (
    "-O3",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512vnni",
    "-mavx512dq",
    "-mf16c",
    "-mfma",
)
# /proc/cpuinfo names of the instruction sets the flags above let the compiler use.
_REQUIRED_CPU = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512dq", "f16c", "fma")
_ABI = 7  # lb_abi_version() of the C source this wrapper calls


class _Weights(ctypes.Structure):
    """The C ``wdesc`` (same field order): one layer's tiled weight as the kernel reads it."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("sw", ctypes.c_void_p), ("ldsw", ctypes.c_int64),
        ("zw", ctypes.c_void_p), ("ldz", ctypes.c_int64),
        ("zconst", ctypes.c_int32), ("bits", ctypes.c_int32),
        ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("G", ctypes.c_int64),
        ("B", ctypes.c_int32), ("A", ctypes.c_int32),
        ("bias", ctypes.c_void_p),
    ]  # fmt: skip


_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


def _cpu_missing() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ["/proc/cpuinfo (not Linux)"]
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return [f for f in _REQUIRED_CPU if f not in flags]


def _source() -> bytes:
    return resources.files("lowbit.kernels").joinpath("csrc/lowbit_cpu.c").read_bytes()


def build(force: bool = False) -> Path:
    """Compile the library if needed; return its path. Raises ``RuntimeError`` on failure."""
    src = _source()
    cc = os.environ.get("CC", "cc")
    tag = hashlib.sha256(src + " ".join((cc,) + CFLAGS).encode()).hexdigest()[:16]
    out = cache_dir("kernels") / f"lowbit_cpu-{tag}.so"
    if out.exists() and not force:
        return out
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r}) to build the CPU kernel; install gcc or set CC")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        c = Path(tmp, "lowbit_cpu.c")
        c.write_bytes(src)
        so = Path(tmp, out.name)
        proc = subprocess.run([cc, *CFLAGS, "-o", str(so), str(c), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the CPU kernel failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(so, out)  # atomic: a concurrent builder writes the same bytes
    return out


def load_library() -> ctypes.CDLL | None:
    """The loaded library, or ``None`` (then :func:`unavailable_reason` says why)."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    missing = _cpu_missing()
    if os.environ.get("LOWBIT_DISABLE_CPU_KERNEL"):
        _lib_error = "disabled by LOWBIT_DISABLE_CPU_KERNEL"
    elif missing:
        _lib_error = f"CPU lacks {', '.join(missing)}"
    else:
        try:
            lib = ctypes.CDLL(str(build()))
        except (RuntimeError, OSError) as e:
            _lib_error = str(e)
        else:
            if lib.lb_abi_version() != _ABI:
                _lib_error = f"kernel library ABI {lib.lb_abi_version()} != {_ABI}"
                return None
            lib.lb_linear.restype = ctypes.c_int
            lib.lb_linear.argtypes = [
                ctypes.POINTER(_Weights), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
            ]
            lib.lb_linear_a8.restype = ctypes.c_int
            lib.lb_linear_a8.argtypes = [
                ctypes.POINTER(_Weights), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
            ]
            c64, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.lb_dwconv_a8.restype = ctypes.c_int
            lib.lb_dwconv_a8.argtypes = [ptr, c64, c64, c64, c64, ptr, ptr, ptr, ptr] + [ctypes.c_int32] * 6 + [
                ctypes.c_float, ctypes.c_int32, ptr, c64, c64, ctypes.c_int
            ]
            _lib = lib
    return _lib


def unavailable_reason() -> str | None:
    load_library()
    return _lib_error


def _block(mod) -> int | None:
    """Activation block (32 or 64 columns) for this module's grouping, or None if none fits."""
    k = mod.in_features
    g = k if (mod.scheme.group_size is None or mod.scheme.per_tensor) else mod.scheme.group_size
    if g >= k or g % 64 == 0:
        return 64
    return 32 if g % 32 == 0 else None


def _scales_reason(mod) -> str | None:
    """Why the GEMM kernels cannot read ``mod``'s scales (they read float16), or None."""
    if mod.scales is not None and mod.scales.dtype != torch.float16:
        return f"{str(mod.scales.dtype).replace('torch.', '')} scales (the weight's range does not fit float16 scales)"
    return None


def _int8_codes_reason(mod) -> str | None:
    """Why ``mod``'s weight is not integer codes minus integer zero points at 8 bits (or None)."""
    s = mod.scheme
    if s.fmt.kind != "affine" or s.bits != 8:
        return f"{s.fmt.name} weights (the int8-activation kernels run int8 codes)"
    if mod.zeros is not None and mod.zeros.dtype != torch.uint8:
        return "fractional zero points"
    return None


def supports_a8(mod) -> str | None:
    """The int8-activation kernel: 8-bit integer weights (integer zeros), dynamic activations."""
    s = mod.scheme
    if s.act_bits != 8:
        return "weight-only scheme (this kernel quantizes activations to int8)"
    reason = _int8_codes_reason(mod) or _scales_reason(mod)
    if reason is not None:
        return reason
    k = mod.in_features
    g = k if (s.group_size is None or s.per_tensor) else s.group_size
    seg = min(g, k, s.act_group or k)
    if seg > (1 << 14):
        return f"groups of {seg} columns (the kernel's int32 sums take up to 16384)"
    reason = unavailable_reason()
    return None if reason is None else f"VNNI kernel unavailable: {reason}"


def supports_conv_a8(mod) -> str | None:
    """Pointwise (1x1) convolutions with static int8 activations and int8 weights: a GEMM over the
    pixels, ``(B*H*W, C) x (C, O)``, on the W8A8 kernel."""
    if not mod.scheme.act_static:
        return "dynamic or no activation quantization (convolutions take static int8 activations)"
    if mod.groups != 1:
        return "grouped/depthwise convolution (no GEMM form)"
    if tuple(mod.weight_shape[2:]) != (1, 1):
        return f"{mod.weight_shape[2]}x{mod.weight_shape[3]} kernel (the int8 path takes 1x1 convolutions)"
    if mod.padding not in ((0, 0), "valid"):
        return f"padding {mod.padding} on a 1x1 convolution"
    return supports_a8(mod)


def supports_dwconv_a8(mod) -> str | None:
    """Depthwise convolutions (one filter per channel) with static int8 activations and 8-bit
    per-channel (or per-tensor) integer weights."""
    s = mod.scheme
    if not s.act_static:
        return "dynamic or no activation quantization (convolutions take static int8 activations)"
    reason = _int8_codes_reason(mod)
    if reason is not None:
        return reason
    if not (s.group_size is None or s.per_tensor):
        return f"weight groups of {s.group_size} (per channel or per tensor only)"
    if mod.groups != mod.weight_shape[0] or mod.weight_shape[1] != 1:
        return "not depthwise (one filter per input channel)"
    if isinstance(mod.padding, str) or tuple(mod.dilation) != (1, 1):
        return f"padding {mod.padding!r} / dilation {mod.dilation}"
    reason = unavailable_reason()
    return None if reason is None else f"VNNI kernel unavailable: {reason}"


def _dw_state(mod) -> tuple:
    """(integer weights (KH*KW, C) int32, per-channel scales (C,) float32, bias or None), cached
    on the module like the GEMM descriptor and rebuilt when a buffer is replaced."""
    buffers = mod._buffers
    key = (buffers["qweight"], buffers["scales"], buffers["zeros"], mod._parameters["bias"])
    state = mod._kernel_state
    if state is None or any(a is not b for a, b in zip(state[0], key)):
        qw = mod.qw
        c = mod.weight_shape[0]
        scale = qw.qparams().scale.float().reshape(-1)
        scale = scale.expand(c).contiguous() if scale.numel() == 1 else scale.contiguous()
        w = qw.dequantize(torch.float32).reshape(c, -1)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # (scales may be negative)
        codes = torch.round(w / safe[:, None]).to(torch.int32)  # code - zero, exactly
        bias = None if mod.bias is None else mod.bias.detach().float().contiguous()
        state = mod._kernel_state = (key, codes.t().contiguous(), scale, bias)
    return state[1:]


def dwconv2d_a8(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (B, C, H, W)`` (any strides) -> ``(B, C, OH, OW)``, a channels-last view: depthwise
    convolution on int8-rounded inputs and integer weights (:func:`supports_dwconv_a8`), exactly
    the reference's arithmetic done in integers (C source: ``lb_dwconv_a8``)."""
    if (x.requires_grad and torch.is_grad_enabled()) or x.numel() == 0:
        from . import reference

        return reference.conv2d(mod, x)
    xf = x if x.dtype is torch.float32 else x.float()
    b, c, h, w = xf.shape
    if c != mod.weight_shape[0]:
        raise ValueError(f"input has {c} channels, the layer takes {mod.weight_shape[0]}")
    codes, scale, bias = _dw_state(mod)
    kh, kw = mod.weight_shape[2:]
    (sh, sw), (ph, pw) = mod.stride, mod.padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = torch.empty(b, oh, ow, c, dtype=torch.float32)
    strides = torch.tensor(xf.stride(), dtype=torch.int64)
    rc = _lib.lb_dwconv_a8(
        xf.data_ptr(), b, c, h, w, strides.data_ptr(), codes.data_ptr(), scale.data_ptr(),
        None if bias is None else bias.data_ptr(), kh, kw, sh, sw, ph, pw,
        float(mod.act_scale), int(mod.act_zero), y.data_ptr(), oh, ow, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"lowbit CPU kernel rejected its arguments (code {rc}) for {mod.extra_repr()}")
    return y.permute(0, 3, 1, 2).to(x.dtype)


def supports(mod) -> str | None:
    s = mod.scheme
    if s.fmt.kind != "affine" or s.bits not in (2, 4, 8):
        return f"{s.fmt.name} weights (the VNNI kernel runs int2/int4/int8 codes)"
    if s.act_bits is not None:
        return "activation-quantized scheme (weight-only kernel)"
    if mod.zeros is not None and mod.zeros.dtype != torch.uint8:
        return "fractional zero points (the VNNI kernel takes integer zeros)"
    if _scales_reason(mod):
        return _scales_reason(mod)
    if _block(mod) is None:
        return f"group size {s.group_size} (needs a multiple of 32)"
    reason = unavailable_reason()
    return None if reason is None else f"VNNI kernel unavailable: {reason}"


def _describe(mod) -> tuple[_Weights, torch.Tensor | None]:
    """The C descriptor of ``mod``'s tiled weight (pointers into its buffers, no copy), and the
    float32 bias it points to (a copy only if the model was cast to another dtype)."""
    if mod.layout not in ("tiled", "tiled4"):
        raise RuntimeError("the VNNI kernels read a tiled layout; assign them with lowbit.kernels.assign()")
    s = mod.scheme
    qweight, scales, zeros, bias = mod.qweight, mod.scales, mod.zeros, mod.bias
    if bias is not None:
        bias = bias.detach().float().contiguous()
    z = int(mod.act_zero) if s.act_static and mod.act_zero is not None else 0
    if z:  # static activations with a zero point: see linear_a8
        w = mod.qw.to_layout("rows").dequantize(torch.float32)
        corr = (-z * float(mod.act_scale)) * w.reshape(w.shape[0], -1).sum(1, dtype=torch.float64).float()
        bias = (corr if bias is None else bias + corr).contiguous()
    for t in (qweight, scales, zeros):
        if t is not None and (not t.is_contiguous() or t.device.type != "cpu"):
            raise RuntimeError("the CPU kernel needs contiguous CPU buffers")
    if scales.dtype != torch.float16:
        raise RuntimeError(f"the CPU kernel reads float16 scales, got {scales.dtype}")
    k = mod.in_features
    whole = s.group_size is None or s.per_tensor
    if zeros is None:
        zw, ldz, zconst = None, 0, s.fmt.sym_zero
    elif s.per_tensor:  # one integer zero point for the whole tensor
        zw, ldz, zconst = None, 0, int(mod.qw.zero_points().item())
    else:
        zw, ldz, zconst = zeros.data_ptr(), zeros.shape[1], 0
    desc = _Weights(
        qweight.data_ptr(),
        scales.data_ptr(), 0 if s.per_tensor else scales.shape[1],
        zw, ldz, zconst, s.bits,
        mod.out_features, k, k if whole else s.group_size,
        _block(mod) or 0, s.act_group or 0,
        None if bias is None else bias.data_ptr(),
    )  # fmt: skip
    return desc, bias


def _call(mod, x: torch.Tensor, fn, *extra) -> torch.Tensor:
    """Run C entry ``fn`` on ``x (..., K)`` -> ``(..., N)`` float32 (then ``x``'s dtype)."""
    # The descriptor holds raw pointers: rebuild it whenever a buffer was replaced or moved.
    # (This runs per call and per layer in decoding, hence the plain code.)
    buffers = mod._buffers  # direct dict access: nn.Module.__getattr__ costs microseconds per call
    qweight, scales, zeros, bias = buffers["qweight"], buffers["scales"], buffers["zeros"], mod._parameters["bias"]
    state = mod._kernel_state
    if (
        state is None
        or state[0] is not qweight
        or state[1] != qweight.data_ptr()
        or state[2] is not scales
        or state[3] is not zeros
        or state[4] is not bias
    ):
        state = mod._kernel_state = (qweight, qweight.data_ptr(), scales, zeros, bias, *_describe(mod))
    x2 = x if (x.dtype is torch.float32 and x.is_contiguous()) else x.float().contiguous()
    if x2.shape[-1] != mod.in_features:
        raise ValueError(f"input has {x2.shape[-1]} features, the layer takes {mod.in_features}")
    out = torch.empty(x2.shape[:-1] + (mod.out_features,), dtype=torch.float32)
    m = x2.numel() // mod.in_features
    rc = fn(ctypes.byref(state[5]), x2.data_ptr(), m, out.data_ptr(), *extra, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"lowbit CPU kernel rejected its arguments (code {rc}) for {mod.extra_repr()}")
    return out if x.dtype is torch.float32 else out.to(x.dtype)


def linear(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` -> ``(..., N)``: packed weights x int16 activations on VNNI (see the C file)."""
    if x.requires_grad and torch.is_grad_enabled():
        from . import reference

        return reference.linear(mod, x)  # the C kernel has no backward
    return _call(mod, x, _lib.lb_linear)


def linear_a8(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` -> ``(..., N)``: int8 weights x int8 activations (W8A8, vpdpbusd): dynamic, one
    scale per token or per token and ``scheme.act_group`` columns, or static (``mod.act_scale``)."""
    if x.requires_grad and torch.is_grad_enabled():
        from . import reference

        return reference.linear(mod, x)
    if not mod.scheme.act_static:
        return _call(mod, x, _lib.lb_linear_a8, 0.0)
    # The C kernel rounds x / s to -127..127. A zero point z shifts the input by z steps,
    # x' = x + z s, so that its codes are q = clamp(round(x / s) + z, -127, 127); the kernel's
    # bias (built in _describe) carries -z s rowsum(W), which takes the shift back out.
    s, z = float(mod.act_scale), int(mod.act_zero)
    return _call(mod, x if z == 0 else x + z * s, _lib.lb_linear_a8, s)


def conv2d_a8(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (B, C, H, W)`` -> ``(B, O, H', W')`` for a 1x1 convolution (:func:`supports_conv_a8`):
    the pixels as rows of a W8A8 GEMM. The result is a channels-last view (NHWC memory, NCHW
    shape), so the next layer's pixel rows need no copy when it is one too."""
    if (x.requires_grad and torch.is_grad_enabled()) or x.numel() == 0:
        from . import reference

        return reference.conv2d(mod, x)
    sh, sw = mod.stride
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    b, c, h, w = x.shape
    y = linear_a8(mod, x.permute(0, 2, 3, 1).reshape(b * h * w, c))
    return y.reshape(b, h, w, mod.out_features).permute(0, 3, 1, 2)
