"""Reference kernels: dequantize the stored weight, then run the float op (any CPU, any format).

These define what every fast path must compute; tests compare each fast kernel against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _bias(mod) -> torch.Tensor | None:
    return None if mod.bias is None else mod.bias.float()


def quantize_static(x: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | int | None = 0) -> torch.Tensor:
    """Static int8 activations (one calibrated scale and zero point for the tensor):
    ``q = clamp(round(x / scale) + zero, -127, 127)``; returns ``(q - zero) * scale``."""
    # a float32 tensor divisor (not a Python float): QAT's fake quantization divides by its
    # float32 step the same way, so both round every value identically
    s = torch.as_tensor(scale, dtype=torch.float32)
    z = 0 if zero is None else int(zero)
    return (torch.round(x / s).add_(z).clamp_(-127, 127).sub_(z)) * s


def quantize_activations(x: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Dynamic int8 activations, the W8A8 schemes' semantics: per row (token) of ``x (..., K)``,
    or per block of ``group`` columns of each row (the last block may be shorter),
    ``q = clamp(round(x / s), -127, 127)`` with ``s = absmax / 127``; returns ``q * s``."""
    k = x.shape[-1]
    if group is not None and group < k:
        pad = -k % group
        xp = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], (k + pad) // group, group)
        return quantize_activations(xp).reshape(*x.shape[:-1], k + pad)[..., :k]
    s = x.abs().amax(-1, keepdim=True) / 127.0
    q = torch.round(x / torch.where(s == 0, 1.0, s)).clamp(-127, 127)
    return q * s


def linear_input(mod, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's input as float32, rounded to the scheme's activation grid when it
    quantizes activations (static: ``mod.act_scale``/``act_zero``; dynamic: per token or group).
    Every linear kernel that takes float inputs starts from this."""
    xf = x.float()
    if mod.scheme.act_bits:
        xf = quantize_static(xf, mod.act_scale, mod.act_zero) if mod.scheme.act_static else quantize_activations(xf, mod.scheme.act_group)
    return xf


def conv_input(mod, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input as float32; static schemes round it to int8 steps of
    ``mod.act_scale`` around ``mod.act_zero``."""
    xf = x.float()
    return quantize_static(xf, mod.act_scale, mod.act_zero) if mod.scheme.act_static else xf


def linear(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` -> ``(..., N)`` in ``x``'s dtype, computed in float32."""
    return F.linear(linear_input(mod, x), mod.qw.dequantize(torch.float32), _bias(mod)).to(x.dtype)


def conv2d(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (B, C, H, W)`` -> conv2d output, computed in float32 (input as :func:`conv_input`)."""
    return mod.conv(conv_input(mod, x), mod.qw.dequantize(torch.float32), _bias(mod)).to(x.dtype)


def embedding(mod, idx: torch.Tensor) -> torch.Tensor:
    """``idx (...)`` long -> ``(..., dim)`` float32; dequantizes only the gathered rows."""
    flat = idx.reshape(-1)
    return mod.rows(flat).dequantize(torch.float32).reshape(*idx.shape, mod.embedding_dim)


_NATIVE_HALF: bool | None = None


def _native_half() -> bool:
    """Whether this CPU multiplies bf16/fp16 natively (AVX-512 BF16/FP16, AMX, ARM's bf16);
    without it torch's half-precision GEMM runs several times slower than float32."""
    global _NATIVE_HALF
    if _NATIVE_HALF is None:
        from .cpu import cpu_features

        _NATIVE_HALF = bool(cpu_features() & {"avx512_bf16", "amx_bf16", "avx512_fp16", "bf16"})
    return _NATIVE_HALF


CAST_TILE_ROWS = 16  # from this many input rows, widen the weight in tiles on CPUs without half GEMMs


def linear_cast(mod, x: torch.Tensor) -> torch.Tensor:
    """Plain-cast formats (bf16/fp16): the inputs are rounded to the stored dtype and multiplied
    with the stored weights, accumulating in float32; the product is rounded to the stored dtype
    (as torch's half GEMM returns it), then ``bias`` is added in float32; output in ``x``'s dtype.

    Batch 1 runs torch's half-precision GEMV (it reads half the bytes of float32). On CPUs without
    native half-precision arithmetic, from :data:`CAST_TILE_ROWS` input rows the weight is widened
    to float32 a tile of rows at a time and multiplied in float32: the same products (exact in
    float32) and float32 sums, at float32 GEMM speed, with no float32 copy of the whole weight.
    """
    w = mod.qweight  # (N, K) in bf16/fp16
    xh = x.to(w.dtype)
    rows = xh.numel() // max(xh.shape[-1], 1)
    if rows >= CAST_TILE_ROWS and w.device.type == "cpu" and not _native_half():
        x2 = xh.reshape(-1, xh.shape[-1]).float()
        y = torch.empty(rows, w.shape[0])
        tile = max(16, (1 << 20) // max(w.shape[1], 1))
        for n0 in range(0, w.shape[0], tile):
            y[:, n0 : n0 + tile] = x2 @ w[n0 : n0 + tile].float().t()
        y = y.reshape(*x.shape[:-1], w.shape[0]).to(w.dtype)  # rounded like the half GEMM's output
    else:
        y = F.linear(xh, w)
    y = y.float()
    if mod.bias is not None:
        y = y + mod.bias.float()
    return y.to(x.dtype)


def _cached_weight(mod) -> torch.Tensor:
    """``mod``'s dequantized float32 weight, made on first use and kept on the module (rebuilt
    when a buffer is replaced, like the C kernels' descriptors)."""
    buffers = mod._buffers
    key = (buffers["qweight"], buffers["scales"], buffers["zeros"])
    state = mod._kernel_state
    if state is None or any(a is not b for a, b in zip(state[0], key)):
        state = mod._kernel_state = (key, mod.qw.dequantize(torch.float32))
    return state[1]


def supports_cached(mod) -> str | None:
    """The no-compiler fallback: only when no C kernel library runs here (no compiler, a build
    that failed, or LOWBIT_ISA=reference); the C kernels are faster and keep the weight packed."""
    from . import cpu

    if mod.scheme.is_cast:
        return "a bf16/fp16 cast (the cast kernel runs it)"
    if cpu.unavailable_reason() is None:
        return "the C kernels run here"
    return None


def linear_cached(mod, x: torch.Tensor) -> torch.Tensor:
    """As :func:`linear`, with the dequantized weight kept after the first call: where no C
    kernel can be built, dequantizing on every call costs 20-50x FP32's time at batch 1; this
    costs FP32's time and FP32's memory for the layer (``lowbit inspect`` says so)."""
    if x.requires_grad and torch.is_grad_enabled():
        return linear(mod, x)
    return F.linear(linear_input(mod, x), _cached_weight(mod), _bias(mod)).to(x.dtype)


def conv2d_cached(mod, x: torch.Tensor) -> torch.Tensor:
    """As :func:`conv2d`, with the dequantized weight kept after the first call (see
    :func:`linear_cached`)."""
    if x.requires_grad and torch.is_grad_enabled():
        return conv2d(mod, x)
    return mod.conv(conv_input(mod, x), _cached_weight(mod).reshape(mod.weight_shape), _bias(mod)).to(x.dtype)
