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


def linear(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` -> ``(..., N)`` in ``x``'s dtype, computed in float32."""
    w = mod.qw.dequantize(torch.float32)
    xf = x.float()
    if mod.scheme.act_bits:
        xf = quantize_static(xf, mod.act_scale, mod.act_zero) if mod.scheme.act_static else quantize_activations(xf, mod.scheme.act_group)
    return F.linear(xf, w, _bias(mod)).to(x.dtype)


def conv2d(mod, x: torch.Tensor) -> torch.Tensor:
    """``x (B, C, H, W)`` -> conv2d output, computed in float32 (static schemes first round the
    input to int8 steps of ``mod.act_scale`` around ``mod.act_zero``)."""
    xf = x.float()
    if mod.scheme.act_static:
        xf = quantize_static(xf, mod.act_scale, mod.act_zero)
    return mod.conv(xf, mod.qw.dequantize(torch.float32), _bias(mod)).to(x.dtype)


def embedding(mod, idx: torch.Tensor) -> torch.Tensor:
    """``idx (...)`` long -> ``(..., dim)`` float32; dequantizes only the gathered rows."""
    flat = idx.reshape(-1)
    return mod.rows(flat).dequantize(torch.float32).reshape(*idx.shape, mod.embedding_dim)


def linear_cast(mod, x: torch.Tensor) -> torch.Tensor:
    """Plain-cast formats (bf16/fp16): the matmul runs in the stored dtype, output back in ``x``'s.

    Float32 accumulation is torch's choice for these dtypes on CPU; ``bias`` is added in float32.
    """
    w = mod.qweight  # (N, K) in bf16/fp16
    y = F.linear(x.to(w.dtype), w)
    y = y.float()
    if mod.bias is not None:
        y = y + mod.bias.float()
    return y.to(x.dtype)
