"""The CPU kernels (``csrc/``): build, choose, load, and call them.

One C source per instruction-set family, each built into its own library with the same entry
points and reading the same packed layouts: ``avx512`` (AVX-512 VNNI), ``avx2`` (AVX2 + FMA +
F16C) and ``portable`` (plain C compiled with ``-march=native``, so ARM/NEON and any other CPU
multiply from the packed codes too). The best one this CPU runs is chosen on first use; the
environment variable ``LOWBIT_ISA`` (``avx512|avx2|portable|reference``) or :func:`use_isa`
forces one, so any AVX-512 machine can run and test the narrower paths. Naming an ISA the CPU
lacks, or an unknown one, raises :class:`IsaError`. A library whose build fails (no compiler, a
compiler without the flags) is skipped with its reason (:func:`fallback_notes`), and the next
ISA runs.

Libraries are compiled with the system C compiler into the cache directory (named by a hash of
the sources, flags and, for ``portable``, the CPU's features) and opened with ctypes. They read
lowbit's packed storage as it is: no second copy of the weights exists at run time.

``supports(module)`` returns ``None`` when these kernels can run the module, else the reason
they cannot (shown by ``lowbit inspect``); the registry then falls back to the reference kernel.
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

__all__ = ["rtn_affine", "hqq_affine", "count_nonfinite", "supports", "linear", "supports_rows", "linear_rows", "load_library", "unavailable_reason", "isa", "use_isa", "available_isas",
           "isa_reason", "fallback_notes", "IsaError", "ISAS"]  # fmt: skip

COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
# name -> (compiler flags, /proc/cpuinfo features those flags let the compiler use), best first.
ISAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512dq", "-mf16c", "-mfma"),
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512dq", "f16c", "fma"),
    ),
    "avx2": (("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
    "portable": (("-march=native",), ()),
}
_SOURCES = ("common.h", "driver.h", "rows_avx2.h", "quantize.h", "hqq.h")
NONFINITE = -3  # what the C entry points that round their inputs return for NaN/inf inputs
_ABI = 17  # lb_abi_version() of the C sources this wrapper calls
ENV = "LOWBIT_ISA"


class IsaError(ValueError):
    """``LOWBIT_ISA`` (or :func:`use_isa`) names an unknown ISA, or one this CPU cannot run."""


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
        ("s32", ctypes.c_int32),
        ("zf", ctypes.c_void_p),
        ("ldsrb", ctypes.c_int64), ("ldzrb", ctypes.c_int64),
    ]  # fmt: skip


class _Rows(ctypes.Structure):
    """The C ``rdesc`` (same field order): one weight in the stored row layout, any format."""

    _fields_ = [
        ("w", ctypes.c_void_p), ("ldw", ctypes.c_int64), ("bits", ctypes.c_int32),
        ("lut", ctypes.c_void_p),
        ("sw", ctypes.c_void_p), ("lds", ctypes.c_int64), ("s32", ctypes.c_int32),
        ("ztype", ctypes.c_int32), ("zw", ctypes.c_void_p), ("ldz", ctypes.c_int64), ("zconst", ctypes.c_int32),
        ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("G", ctypes.c_int64),
        ("bias", ctypes.c_void_p), ("e4m3", ctypes.c_int32),
    ]  # fmt: skip


class _LayerDesc(ctypes.Structure):
    """The C ``layer_desc`` (same field order): one Llama-family decoder layer for lb_decode_layer."""

    _W = ctypes.POINTER(_Weights)
    _fields_ = [
        ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64), ("length", ctypes.c_int64),
        ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("qkv", _W * 3), ("o", _W), ("gate_up", _W * 2), ("down", _W),
        ("kcache", ctypes.c_void_p), ("vcache", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
    ]  # fmt: skip


_libs: dict[str, ctypes.CDLL | str] = {}  # ISA -> loaded library, or why it cannot load
_lib: ctypes.CDLL | None = None  # the active library (None: the reference kernels run)
_isa: str | None = None  # the active ISA name, or None before the first choice
_lib_error: str | None = None  # why no CPU kernel runs, when _lib is None
_notes: list[str] = []  # better ISAs skipped by the automatic choice, with their reasons
_chosen_by = ""  # how the active ISA was chosen (for summary())


def cpu_features() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86, ARM
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_missing(name: str) -> list[str]:
    need = ISAS[name][1]
    if not need:
        return []
    have = cpu_features()
    if not have:
        return ["/proc/cpuinfo (not Linux)"]
    return [f for f in need if f not in have]


def _source(name: str) -> bytes:
    return resources.files("lowbit.kernels").joinpath(f"csrc/{name}").read_bytes()


def _compile(cc: str, flags: tuple[str, ...], files: dict[str, bytes], out: Path) -> str | None:
    """Compile ``files`` (the first is the .c) into ``out``; the compiler's error, or None."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for name, text in files.items():
            Path(tmp, name).write_bytes(text)
        so = Path(tmp, out.name)
        c = Path(tmp, next(iter(files)))
        proc = subprocess.run([cc, *COMMON_FLAGS, *flags, "-o", str(so), str(c), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            return proc.stderr.strip()[-2000:] or f"{cc} exited with {proc.returncode}"
        os.replace(so, out)  # atomic: a concurrent builder writes the same bytes
    return None


def build(name: str = "avx512", force: bool = False) -> Path:
    """Compile ISA ``name``'s library if needed; return its path. Raises ``RuntimeError`` on failure."""
    if name not in ISAS:
        raise IsaError(f"unknown ISA {name!r}; choose from {', '.join(ISAS)}")
    files = {f"{name}.c": _source(f"{name}.c"), **{h: _source(h) for h in _SOURCES}}
    cc = os.environ.get("CC", "cc")
    flag_sets = [ISAS[name][0]]
    if name == "portable":
        flag_sets.append(())  # a compiler without -march=native still builds plain C
    errors = []
    for flags in flag_sets:
        ident = b"".join(files.values()) + " ".join((cc,) + COMMON_FLAGS + flags).encode()
        if name == "portable":  # -march=native code is for this CPU only
            ident += " ".join(sorted(cpu_features())).encode()
        out = cache_dir("kernels") / f"lowbit_{name}-{hashlib.sha256(ident).hexdigest()[:16]}.so"
        if out.exists() and not force:
            return out
        if shutil.which(cc) is None:
            raise RuntimeError(f"no C compiler ({cc!r}) to build the CPU kernels; install gcc or set CC")
        err = _compile(cc, flags, files, out)
        if err is None:
            return out
        errors.append(err)
    lines = [ln.strip() for ln in errors[0].splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no output")
    raise RuntimeError(f"building the {name} CPU kernel failed: {first[:300]}")


def _open(name: str) -> ctypes.CDLL | str:
    """ISA ``name``'s library, or the reason it cannot run here (cached per process)."""
    if name in _libs:
        return _libs[name]
    missing = _cpu_missing(name)
    if missing:
        _libs[name] = f"CPU lacks {', '.join(missing)}"
        return _libs[name]
    try:
        lib = ctypes.CDLL(str(build(name)))
    except (RuntimeError, OSError) as e:
        _libs[name] = str(e)
        return _libs[name]
    if lib.lb_abi_version() != _ABI:
        _libs[name] = f"kernel library ABI {lib.lb_abi_version()} != {_ABI}"
        return _libs[name]
    c64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32, ctypes.c_float
    lib.lb_isa.restype = ctypes.c_char_p
    lib.lb_linear.restype = ctypes.c_int
    lib.lb_linear.argtypes = [ctypes.POINTER(_Weights), ptr, c64, ptr, ctypes.c_int]
    lib.lb_linear_a8.restype = ctypes.c_int
    lib.lb_linear_a8.argtypes = [ctypes.POINTER(_Weights), ptr, c64, ptr, f32, ctypes.c_int]
    lib.lb_dwconv_a8.restype = ctypes.c_int
    lib.lb_dwconv_a8.argtypes = [ptr, c64, c64, c64, c64, ptr, ptr, ptr, ptr] + [i32] * 6 + [f32, i32, ptr, c64, c64, ctypes.c_int]
    lib.lb_linear_many.restype = ctypes.c_int
    lib.lb_linear_many.argtypes = [ctypes.POINTER(ctypes.POINTER(_Weights)), ctypes.c_int, ptr, c64,
                                   ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]  # fmt: skip
    lib.lb_decode_layer.restype = ctypes.c_int
    lib.lb_decode_layer.argtypes = [ctypes.POINTER(_LayerDesc), ptr, c64, ptr, ctypes.c_int]
    lib.lb_rtn_affine.restype = ctypes.c_int
    lib.lb_rtn_affine.argtypes = [ptr, i32, c64, c64, c64, i32, i32, f32, f32, i32, ptr, ptr, ptr, i32]
    lib.lb_count_nonfinite.restype = ctypes.c_int64
    lib.lb_count_nonfinite.argtypes = [ptr, i32, c64, i32]
    lib.lb_hqq_affine.restype = ctypes.c_int
    lib.lb_hqq_affine.argtypes = lib.lb_rtn_affine.argtypes + [f32, ctypes.c_double, ctypes.c_double, i32, f32, i32, f32, i32]
    lib.lb_linear_rows.restype = ctypes.c_int
    lib.lb_linear_rows.argtypes = [ctypes.POINTER(_Rows), ptr, c64, ptr, ctypes.c_int]
    lib.lb_dequant_rows.restype = ctypes.c_int
    lib.lb_dequant_rows.argtypes = [ctypes.POINTER(_Rows), c64, c64, ptr, ctypes.c_int]
    _libs[name] = lib
    return lib


def isa_reason(name: str) -> str | None:
    """Why ISA ``name``'s kernels cannot run on this machine (CPU features, compiler), or None."""
    if name == "reference":
        return None
    if name not in ISAS:
        raise IsaError(f"unknown ISA {name!r}; choose from {', '.join(ISAS)}, reference")
    got = _open(name)
    return got if isinstance(got, str) else None


def available_isas() -> list[str]:
    """The ISAs whose kernels run here, best first (``reference`` always last)."""
    return [n for n in ISAS if isa_reason(n) is None] + ["reference"]


def use_isa(name: str | None) -> str:
    """Make ISA ``name`` the one every CPU kernel call uses (``None``: ``LOWBIT_ISA``, else the
    best this CPU runs). Returns the ISA now active. Modules need no re-assignment: every ISA
    reads the same layouts. Raises :class:`IsaError` for an unknown ISA or one that cannot run
    here (naming the missing CPU features or the build error)."""
    global _lib, _isa, _lib_error, _notes
    notes: list[str] = []
    if name is None:
        name = os.environ.get(ENV) or None
        source = f"{ENV}={name}"
    else:
        source = f"ISA {name!r}"
    if name is not None:
        name = name.strip().lower()
        if name not in (*ISAS, "reference"):
            raise IsaError(f"{source}: unknown ISA; choose from {', '.join(ISAS)}, reference")
        reason = isa_reason(name)
        if reason is not None:
            raise IsaError(f"{source}: this machine cannot run it ({reason}); it runs: {', '.join(available_isas())}")
        chosen = name
    else:
        chosen = "reference"
        for n in ISAS:
            reason = isa_reason(n)
            if reason is None:
                chosen = n
                break
            if not reason.startswith("CPU lacks"):
                notes.append(f"{n}: {reason.splitlines()[0]}")
    if chosen == "reference":
        _lib = None
        _lib_error = f"{source} chose the reference kernels" if name else "no CPU kernel could be built: " + "; ".join(notes)
    else:
        _lib, _lib_error = _libs[chosen], None
    global _chosen_by
    _isa, _notes = chosen, notes
    _chosen_by = source if name is not None else "best this CPU runs"
    return chosen


def load_library() -> ctypes.CDLL | None:
    """The active library, choosing it on first use (see :func:`use_isa`), or ``None`` (then
    :func:`unavailable_reason` says why)."""
    if _isa is None:
        use_isa(None)
    return _lib


def isa() -> str:
    """The active ISA: ``avx512``, ``avx2``, ``portable`` or ``reference``."""
    load_library()
    return _isa


def fallback_notes() -> list[str]:
    """Better ISAs this CPU has whose library could not be built, each with its reason."""
    load_library()
    return list(_notes)


def unavailable_reason() -> str | None:
    load_library()
    return _lib_error


def summary() -> str:
    """One line: the ISA the CPU kernels run, why that one, and better ones skipped (with why)."""
    active = isa()
    line = f"CPU kernels: {active} ({_chosen_by}; this CPU runs {', '.join(available_isas())})"
    if _lib_error and active == "reference":
        line += f"; {_lib_error}"
    for note in fallback_notes():
        line += f"; skipped {note}"
    return line


def _block(mod) -> int | None:
    """Activation block (columns per int16 activation scale, one float epilogue per block) for
    this module's grouping: the widest of 256, 128, 64, 32 that divides the group size (256 for a
    group that spans the row), or None if none does. 256 keeps each int32 sum exact: at most
    256 products of a code < 256 and |q| <= 32767, below 2^31."""
    k = mod.in_features
    g = k if (mod.scheme.group_size is None or mod.scheme.per_tensor) else mod.scheme.group_size
    if g >= k:
        return 256 if k > 128 else 64
    return next((b for b in (256, 128, 64, 32) if g % b == 0), None)


def _scales_reason(mod) -> str | None:
    """Why the GEMM kernels cannot read ``mod``'s scales (they read float16 or float32), or None."""
    if mod.scales is not None and mod.scales.dtype not in (torch.float16, torch.float32):
        return f"{str(mod.scales.dtype).replace('torch.', '')} scales (the kernels read float16 or float32)"
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
    return None if reason is None else f"CPU kernel unavailable: {reason}"


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
    return None if reason is None else f"CPU kernel unavailable: {reason}"


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
    if (x.requires_grad and torch.is_grad_enabled()) or x.numel() == 0 or _lib is None:
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
        return f"{s.fmt.name} weights (the CPU kernel runs int2/int4/int8 codes)"
    if s.act_bits is not None:
        return "activation-quantized scheme (weight-only kernel)"
    if mod.zeros is not None and mod.zeros.dtype not in (torch.uint8, torch.float16):
        return f"{mod.zeros.dtype} zero points"
    if _scales_reason(mod):
        return _scales_reason(mod)
    if _block(mod) is None:
        return f"group size {s.group_size} (needs a multiple of 32)"
    reason = unavailable_reason()
    return None if reason is None else f"CPU kernel unavailable: {reason}"


def _describe(mod) -> tuple[_Weights, torch.Tensor | None]:
    """The C descriptor of ``mod``'s tiled weight (pointers into its buffers, no copy), and the
    float32 bias it points to (a copy only if the model was cast to another dtype)."""
    if mod.layout not in ("tiled", "tiled4"):
        raise RuntimeError("the CPU kernels read a tiled layout; assign them with lowbit.kernels.assign()")
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
    if scales.dtype not in (torch.float16, torch.float32):
        raise RuntimeError(f"the CPU kernel reads float16 or float32 scales, got {scales.dtype}")
    k = mod.in_features
    whole = s.group_size is None or s.per_tensor
    # row-block-major parameters (qweight.py): group g of row block rb at g * 16 + rb * (ng * 16)
    zf, ldzrb = None, 0
    if zeros is None:
        zw, ldz, zconst = None, 0, s.fmt.sym_zero
    elif zeros.dtype == torch.float16:  # fractional (HQQ): laid out like the scales
        zw, ldz, zconst, zf = None, 0, 0, zeros.data_ptr()
    elif s.per_tensor:  # one integer zero point for the whole tensor
        zw, ldz, zconst = None, 0, int(mod.qw.zero_points().item())
    else:  # each group's 16 codes bit-packed: 2 * bits bytes
        zw, ldz, zconst, ldzrb = zeros.data_ptr(), 2 * s.bits, 0, zeros.shape[1]
    desc = _Weights(
        qweight.data_ptr(),
        scales.data_ptr(), 0 if s.per_tensor else 16,
        zw, ldz, zconst, s.bits,
        mod.out_features, k, k if whole else s.group_size,
        _block(mod) or 0, s.act_group or 0,
        None if bias is None else bias.data_ptr(),
        int(scales.dtype == torch.float32), zf,
        0 if s.per_tensor else scales.shape[1], ldzrb,
    )  # fmt: skip
    return desc, bias


def _call(mod, x: torch.Tensor | None, fn, *extra) -> torch.Tensor | None:
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
    return _run_desc(mod, state[5], x, fn, extra)


def _state(mod) -> _Weights:
    """``mod``'s C descriptor, rebuilt when a buffer was replaced or moved (see :func:`_call`)."""
    _call(mod, None, None)
    return mod._kernel_state[5]


def _run_desc(mod, desc, x, fn, extra) -> torch.Tensor:
    if x is None:
        return None
    x2 = x if (x.dtype is torch.float32 and x.is_contiguous()) else x.float().contiguous()
    if x2.shape[-1] != mod.in_features:
        raise ValueError(f"input has {x2.shape[-1]} features, the layer takes {mod.in_features}")
    out = torch.empty(x2.shape[:-1] + (mod.out_features,), dtype=torch.float32)
    m = x2.numel() // mod.in_features
    rc = fn(ctypes.byref(desc), x2.data_ptr(), m, out.data_ptr(), *extra, torch.get_num_threads())
    if rc == NONFINITE:  # integer activations cannot carry NaN/inf: the reference propagates them
        from . import reference

        return reference.linear(mod, x)
    if rc != 0:
        raise RuntimeError(f"lowbit CPU kernel rejected its arguments (code {rc}) for {mod.extra_repr()}")
    return out if x.dtype is torch.float32 else out.to(x.dtype)


def linear(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` -> ``(..., N)``: packed weights x int16 activations (csrc/: avx512.c, avx2.c, portable.c)."""
    if (x.requires_grad and torch.is_grad_enabled()) or _lib is None:
        from . import reference

        return reference.linear(mod, x)  # the C kernel has no backward; or use_isa("reference")
    return _call(mod, x, _lib.lb_linear)


def linear_a8(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` -> ``(..., N)``: int8 weights x int8 activations (W8A8): dynamic, one
    scale per token or per token and ``scheme.act_group`` columns, or static (``mod.act_scale``)."""
    if (x.requires_grad and torch.is_grad_enabled()) or _lib is None:
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
    if (x.requires_grad and torch.is_grad_enabled()) or x.numel() == 0 or _lib is None:
        from . import reference

        return reference.conv2d(mod, x)
    sh, sw = mod.stride
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    b, c, h, w = x.shape
    y = linear_a8(mod, x.permute(0, 2, 3, 1).reshape(b * h * w, c))
    return y.reshape(b, h, w, mod.out_features).permute(0, 3, 1, 2)


# ---- any format, row layout (csrc/driver.h: lb_linear_rows) -----------------------------------
ROWS_GEMM_MIN = 16  # from this many input rows, decode tiles of rows and let torch's GEMM run them


def supports_rows(mod) -> str | None:
    """The any-format kernel: every weight format lowbit stores as codes or FP8 (int2/3/4/8,
    NF4, FP8; any group size; integer, fractional or no zero points; float16/float32 scales).
    Activation-quantized schemes round their inputs first, exactly as the reference does."""
    s = mod.scheme
    if s.is_cast:
        return "a bf16/fp16 cast (the cast kernel runs it)"
    if s.fmt.kind == "float":
        if mod.scales is None or s.fmt.torch_dtype != torch.float8_e4m3fn:
            return f"{s.fmt.name} weights"
    elif s.fmt.kind not in ("affine", "codebook") or s.bits not in (2, 3, 4, 8):
        return f"{s.fmt.name} weights"
    if _scales_reason(mod):
        return _scales_reason(mod)
    if mod.zeros is not None and mod.zeros.dtype not in (torch.uint8, torch.float16):
        return f"{mod.zeros.dtype} zero points"
    reason = unavailable_reason()
    return None if reason is None else f"CPU kernel unavailable: {reason}"


_LUTS: dict[str, torch.Tensor] = {}


def _lut(fmt) -> torch.Tensor | None:
    """The float32 value of each code, or None when the codes are their own values (integers)."""
    if fmt.kind == "affine":
        return None
    if fmt.name not in _LUTS:
        if fmt.kind == "codebook":
            _LUTS[fmt.name] = torch.tensor(fmt.codebook, dtype=torch.float32)
        else:  # FP8: every byte pattern's value (NaN patterns stay NaN)
            _LUTS[fmt.name] = torch.arange(256, dtype=torch.uint8).view(fmt.torch_dtype).float()
    return _LUTS[fmt.name]


def _rows_state(mod) -> tuple:
    """(descriptor, tensors it points into), cached on the module and rebuilt when a buffer is
    replaced (as for the tiled kernels)."""
    buffers = mod._buffers
    key = (buffers["qweight"], buffers["scales"], buffers["zeros"], mod._parameters["bias"])
    state = mod._kernel_state
    if state is not None and all(a is b for a, b in zip(state[0], key)) and state[1] == key[0].data_ptr():
        return state[2], state[3]
    if mod.layout != "rows":
        raise RuntimeError("the any-format kernel reads the row layout; assign it with lowbit.kernels.assign()")
    s = mod.scheme
    qweight, scales, zeros = mod.qweight, mod.scales, mod.zeros
    for t in (qweight, scales, zeros):
        if t is not None and (not t.is_contiguous() or t.device.type != "cpu"):
            raise RuntimeError("the CPU kernel needs contiguous CPU buffers")
    data = qweight.view(torch.uint8) if qweight.dtype != torch.uint8 else qweight
    bias = None if mod.bias is None else mod.bias.detach().float().contiguous()
    lut = _lut(s.fmt)
    k = mod.in_features
    bits = 8 if s.fmt.kind == "float" else s.bits
    g = k if (s.group_size is None or s.per_tensor) else s.group_size
    lds = 0 if s.per_tensor else scales.shape[1]
    if zeros is None:
        ztype, zconst, zw, ldz = 0, (s.fmt.sym_zero if s.fmt.kind == "affine" else 0), None, 0
    else:
        ztype, zconst, zw, ldz = (1 if zeros.dtype == torch.uint8 else 2), 0, zeros.data_ptr(), zeros.shape[1]
    desc = _Rows(
        data.data_ptr(), data.shape[1], bits, None if lut is None else lut.data_ptr(),
        scales.data_ptr(), lds, int(scales.dtype == torch.float32),
        ztype, zw, ldz, zconst, mod.out_features, k, g,
        None if bias is None else bias.data_ptr(), int(s.fmt.kind == "float"),
    )  # fmt: skip
    keep = (data, lut, bias)
    mod._kernel_state = (key, key[0].data_ptr(), desc, keep)
    return desc, keep


def linear_rows(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` -> ``(..., N)`` float32 (then ``x``'s dtype) for any stored format: below
    :data:`ROWS_GEMM_MIN` input rows, decode each weight row once and take float dot products
    (``lb_linear_rows``); from there on, decode tiles of rows to float32 and run torch's GEMM on
    each, so the decoding is amortised over the batch and no float copy of the weight exists."""
    from . import reference

    if (x.requires_grad and torch.is_grad_enabled()) or _lib is None:
        return reference.linear(mod, x)
    if x.shape[-1] != mod.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer takes {mod.in_features}")
    x2 = reference.linear_input(mod, x).reshape(-1, mod.in_features).contiguous()  # the reference's own rounding
    desc, keep = _rows_state(mod)
    m, n, k = x2.shape[0], mod.out_features, mod.in_features
    out = torch.empty(m, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    if m < ROWS_GEMM_MIN:
        rc = _lib.lb_linear_rows(ctypes.byref(desc), x2.data_ptr(), m, out.data_ptr(), threads)
    else:
        tile = max(16, (1 << 20) // max(k, 1))  # rows per tile: 4 MiB of float32
        buf = torch.empty(min(tile, n), k, dtype=torch.float32)
        rc = 0
        for n0 in range(0, n, tile):
            n1 = min(n, n0 + tile)
            rc = rc or _lib.lb_dequant_rows(ctypes.byref(desc), n0, n1, buf.data_ptr(), threads)
            out[:, n0:n1] = x2 @ buf[: n1 - n0].t()
        if keep[2] is not None:
            out += keep[2]
    if rc != 0:
        raise RuntimeError(f"lowbit CPU kernel rejected its arguments (code {rc}) for {mod.extra_repr()}")
    out = out.reshape(*x.shape[:-1], n)
    return out if x.dtype is torch.float32 else out.to(x.dtype)


def _share_input(mods: list) -> bool:
    """Whether ``cpu``-kernel modules can run on one quantization of their common input
    (``lb_linear_many``): the same input width and activation block."""
    return len({m.in_features for m in mods}) == 1 and len({_block(m) for m in mods}) == 1


class LinearGroup:
    """Several ``cpu``-kernel linear modules that read the same input, run in one C call
    (``lb_linear_many``): the input is quantized once and one thread team covers all outputs.

    ``LinearGroup.of(mods)`` returns None unless every module runs the ``cpu`` kernel with the
    same input width and activation block (then call them one by one). Calling the group on
    ``x (M, K)`` float32 returns ``(M, sum N_i)``: the outputs side by side, module order. For one
    input row the result is written into a buffer the group keeps and reuses on its next call (a
    decoder consumes it first); larger inputs get a new tensor. The descriptors are taken when the
    group is made: re-make it after replacing a module's weights.
    """

    def __init__(self, mods: list) -> None:
        self.mods = mods
        self.descs = [_state(m) for m in mods]
        self._arr = (ctypes.POINTER(_Weights) * len(mods))(*[ctypes.pointer(d) for d in self.descs])
        self.n = [m.out_features for m in mods]
        self.k = mods[0].in_features
        self._ptrs = (ctypes.c_void_p * len(mods))()
        self._one = torch.empty(1, sum(self.n))
        self._one_ptrs = self._pointers(self._one)

    def _pointers(self, out: torch.Tensor):
        ptrs = (ctypes.c_void_p * len(self.n))()
        col, base = 0, out.data_ptr()
        for i, n in enumerate(self.n):  # column blocks of a row-major (M, sum N) output
            ptrs[i] = base + 4 * col
            col += n
        return ptrs

    @classmethod
    def of(cls, mods: list) -> LinearGroup | None:
        if _lib is None or not mods or any(getattr(m, "kernel", None) != "cpu" for m in mods):
            return None
        return cls(mods) if _share_input(mods) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if (x.dtype is torch.float32 and x.is_contiguous()) else x.float().contiguous()
        m = x2.numel() // self.k
        if m == 1:
            out, ptrs = self._one, self._one_ptrs
        else:
            out = torch.empty(m, sum(self.n))
            ptrs = self._pointers(out)
        # the C kernel writes output i with row stride N_i: only one row, or one module, keeps
        # the blocks side by side; otherwise run each module into its own tensor
        if m != 1 and len(self.n) > 1:
            return torch.cat([self.mods[i](x2.reshape(m, self.k)) for i in range(len(self.n))], -1)
        rc = _lib.lb_linear_many(self._arr, len(self.n), x2.data_ptr(), m, ptrs, torch.get_num_threads())
        if rc == NONFINITE:  # NaN/inf in x: each module's kernel runs the reference, which propagates them
            return torch.cat([mod(x2.reshape(m, self.k)) for mod in self.mods], -1)
        if rc != 0:
            raise RuntimeError(f"lowbit CPU kernel rejected a group of {len(self.n)} layers (code {rc})")
        return out


class DecodeLayer:
    """One Llama-family decoder layer for batch-1 decode steps in a single C call
    (``lb_decode_layer``: norms, the seven projections on the packed kernel, rotary embedding,
    cache write, grouped-query attention, SiLU gate, residuals). ``DecodeLayer.of(...)`` returns
    None unless every projection runs the ``cpu`` kernel, q/k/v and gate/up can share their
    input's quantization, and the caches are float32; the caller then runs the layer in torch.
    The tensors handed in (caches, rotary tables, norm weights) must outlive it."""

    def __init__(self, mods: dict, norms: tuple, eps: float, arch, kcache, vcache, cos, sin, scale: float) -> None:
        self.keep = [n.detach().float().contiguous() for n in norms]
        self.desc = _LayerDesc()
        d = self.desc
        d.hidden, d.heads, d.kv_heads, d.head_dim = mods["q"].in_features, arch.heads, arch.kv_heads, arch.head_dim
        d.inter, d.length = mods["gate"].out_features, kcache.shape[1]
        d.norm1, d.norm2 = self.keep[0].data_ptr(), self.keep[1].data_ptr()
        d.eps, d.scale = eps, scale
        self.descs = {k: _state(m) for k, m in mods.items()}  # kept alive with the struct's pointers
        ptr = lambda k: ctypes.pointer(self.descs[k])  # noqa: E731
        d.qkv[0], d.qkv[1], d.qkv[2] = ptr("q"), ptr("k"), ptr("v")
        d.o, d.down = ptr("o"), ptr("down")
        d.gate_up[0], d.gate_up[1] = ptr("gate"), ptr("up")
        d.kcache, d.vcache, d.cos, d.sin = kcache.data_ptr(), vcache.data_ptr(), cos.data_ptr(), sin.data_ptr()
        n = 2 * d.hidden + (d.heads + 2 * d.kv_heads) * d.head_dim + d.heads * d.head_dim + 3 * d.inter + d.length
        self.scratch = torch.empty(n)

    @classmethod
    def of(cls, mods: dict, norms: tuple, eps, arch, kcache, vcache, cos, sin, scale) -> DecodeLayer | None:
        if _lib is None or kcache.dtype != torch.float32 or eps is None:
            return None
        if any(getattr(m, "kernel", None) != "cpu" for m in mods.values()):
            return None
        if not (_share_input([mods[k] for k in ("q", "k", "v")]) and _share_input([mods["gate"], mods["up"]])):
            return None
        if any(not isinstance(n, torch.Tensor) for n in norms):
            return None
        return cls(mods, norms, eps, arch, kcache, vcache, cos, sin, scale)

    def __call__(self, x: torch.Tensor, pos: int) -> bool:
        """Update ``x (hidden,)`` float32 contiguous in place for the token at ``pos``; False (``x``
        unchanged) when NaN or inf reached a projection's input: run the layer in float instead."""
        rc = _lib.lb_decode_layer(ctypes.byref(self.desc), x.data_ptr(), pos, self.scratch.data_ptr(),
                                  torch.get_num_threads())  # fmt: skip
        if rc == NONFINITE:
            return False
        if rc != 0:
            raise RuntimeError(f"lowbit CPU kernel rejected a decoder layer (code {rc})")
        return True


_RTN_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def rtn_affine(w: torch.Tensor, scheme, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Round-to-nearest of ``w`` ``(N, K)`` (float32, bfloat16 or float16) under an affine,
    grouped or per-channel ``scheme`` with float16 scales, fused in C (``lb_rtn_affine``):
    ``(codes, scales (N, ng) float32, zero points (N, ng) float32 or None)``, the codes already
    packed (:func:`lowbit.packing.pack`) for 2, 4 and 8 bits and ``(N, K)`` uint8 for 3 bits; bit
    for bit what :func:`lowbit.primitives.choose_qparams` and :func:`~lowbit.primitives.quantize_codes`
    give. ``None`` when it does not apply (no library, another format, a scale outside float16's
    normal range: the caller runs the torch path). Raises ``ValueError`` (via
    :func:`lowbit.primitives.check_finite`, naming ``name``) for NaN/Inf weights."""
    return _affine(w, scheme, name, None)


def count_nonfinite(t: torch.Tensor) -> int | None:
    """How many values of float tensor ``t`` (float32, bfloat16 or float16, contiguous) are NaN or
    infinite, by their exponent bits in C (``lb_count_nonfinite``: no converted copy, both
    threads); ``None`` when it does not apply (no library, another dtype, not contiguous)."""
    lib = load_library()
    if lib is None or t.dtype not in _RTN_DTYPES or not t.is_contiguous():
        return None
    return int(lib.lb_count_nonfinite(t.data_ptr(), _RTN_DTYPES[t.dtype], t.numel(), torch.get_num_threads()))


def hqq_affine(w: torch.Tensor, scheme, name: str, *, p: float, beta: float, kappa: float, iters: int,
               importance: float, optimize_scale: bool, shift: int, patience: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:  # fmt: skip
    """:func:`lowbit.algorithms.hqq.optimize_qparams` and the codes of its parameters, fused in C
    (``lb_hqq_affine``: each group optimised while it sits in L1; the torch version's iteration,
    at float32 rounding level, see ``csrc/hqq.h``), for ``w * 2**shift`` (``shift``: the
    magnitude band's power of two; the scales come back divided by it). Returns and refuses as
    :func:`rtn_affine`; scales and zero points are float16 values."""
    return _affine(w, scheme, name, (p, beta, kappa, iters, importance, int(optimize_scale), 2.0**shift, patience))


def _affine(w: torch.Tensor, scheme, name: str, hqq: tuple | None):
    from .. import packing

    fmt = scheme.fmt
    lib = load_library()
    if (lib is None or fmt.kind != "affine" or scheme.per_tensor or scheme.is_cast or fmt.scale_dtype != torch.float16
            or w.dim() != 2 or w.dtype not in _RTN_DTYPES or fmt.qmax > 255):  # fmt: skip
        return None
    w = w.contiguous()
    n, k = w.shape
    g = k if scheme.group_size is None else scheme.group_size
    ng = -(-k // g) if k else 0
    pack_bits = fmt.bits if fmt.bits in (2, 4) else 0
    out = torch.empty(n, packing.packed_row_bytes(k, fmt.bits) if pack_bits else k, dtype=torch.uint8)
    scales = torch.empty(n, ng, dtype=torch.float32)
    zeros = None if scheme.symmetric else torch.empty(n, ng, dtype=torch.float32)
    mode = 0 if not scheme.symmetric else (1 if fmt.sym_range == "full" else 2)
    args = (w.data_ptr(), _RTN_DTYPES[w.dtype], n, k, g, fmt.qmax, mode, float(fmt.sym_zero), float(fmt.sym_qmax),
            pack_bits, out.data_ptr(), scales.data_ptr(), zeros.data_ptr() if zeros is not None else None,
            torch.get_num_threads())  # fmt: skip
    rc = lib.lb_rtn_affine(*args) if hqq is None else lib.lb_hqq_affine(*args, *hqq)
    if rc == NONFINITE:
        from ..primitives import check_finite

        check_finite(w, name)  # raises, naming what is wrong
    if rc != 0:
        return None  # (1: a scale outside float16's normal range; -2: no memory) the torch path decides
    return out, scales, zeros
