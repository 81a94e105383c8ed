"""Quantization primitives: choose scales and zero points, quantize, dequantize, fake-quantize.

All functions work on a 2-D weight ``w`` of shape ``(N, K)`` (output channels x input columns;
convolutions are flattened to ``(out, in*kh*kw)`` by the caller) and a :class:`Scheme`.
Groups run along ``K``: ``G = scheme.group_size`` (``K`` for per-channel), ``ng = ceil(K / G)``.
A short last group behaves as if zero-padded; zero is exactly representable in every format, so
padding changes neither the chosen parameters nor the error.

Affine formats map ``x ≈ s * (q - z)`` with unsigned codes ``q`` in ``[0, 2**b - 1]``:

* symmetric: ``z = 2**(b-1)``; the scale follows the format's ``sym_range``
  (:class:`~lowbit.formats.Format`): ``"full"``: ``s = m / -2**(b-1)`` where ``m`` is the group's
  value of largest magnitude, sign included, so that ``m`` itself is exact and all ``2**b``
  levels are used (the choice ggml makes for Q4_0, ``d = max / -8``; ``s`` may be negative);
  ``"restricted"``: ``s = max|x| / (2**(b-1) - 1)`` (Q8_0's choice).
* asymmetric: ``s = (hi - lo) / (2**b - 1)`` over ``[lo, hi] = [min(x, 0), max(x, 0)]`` and an
  integer ``z = round(-lo / s)``.

Scales are rounded to their storage dtype (away from zero, so the stored range still covers the
group's) *before* codes are computed, so what is stored dequantizes exactly as computed here. The
storage dtype is the format's ``scale_dtype`` (float16), or float32 for a weight whose scales
float16 cannot hold at full precision (:func:`round_scale`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .formats import Format
from .scheme import Scheme

__all__ = [
    "QParams",
    "grouped",
    "choose_qparams",
    "quantize_codes",
    "dequantize_codes",
    "quantize_values",
    "dequantize_values",
    "round_scale",
    "scale_storage_dtype",
    "quantize_float",
    "dequantize_float",
    "mse_clip_search",
    "clip_search",
    "fake_quantize",
    "check_finite",
    "NonFiniteError",
]

# A clip ratio grid for the MSE search: 1.00, 0.98, ..., 0.60.
DEFAULT_CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(21))


class NonFiniteError(ValueError):
    """A weight holds NaN or Inf."""


class QParams(NamedTuple):
    """Scales ``(R, ng)`` and zero points ``(R, ng)`` or ``None``, float32, ``R`` in ``{1, N}``."""

    scale: torch.Tensor
    zero: torch.Tensor | None


def check_finite(w: torch.Tensor, what: str = "weight") -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``w`` holds NaN or Inf; warn naming it if
    whole rows hold only float32 subnormals (no scale represents them: they are stored as 0)."""
    w = w.detach()
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise NonFiniteError(f"{what} has {bad} NaN/Inf value(s); lowbit quantizes finite weights only")
    if w.numel() and w.dim() >= 1 and w.shape[0]:
        rows = w.reshape(w.shape[0], -1).abs().amax(1)
        n = int(((rows > 0) & (rows < _TOO_SMALL)).sum())
        if n:
            warnings.warn(
                f"{what}: {n} row(s) hold only values below ~1e-35 (float32 subnormals); no scale can "
                "represent them and they are stored as zeros",
                stacklevel=3,
            )


def _flat(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, int]:
    """The 2-D view groups are taken along, and the group size: per-tensor schemes see one row."""
    flat = w.reshape(1, -1) if scheme.per_tensor else w
    return flat, max(flat.shape[1], 1) if scheme.group_size is None else scheme.group_size


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N, K)`` -> ``(N, ng, G)`` float32, the last group zero-padded."""
    n, k = w.shape
    pad = -k % group_size
    w = w.float()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, (k + pad) // group_size, group_size)


def scale_storage_dtype(s: torch.Tensor, fmt: Format) -> torch.dtype:
    """The dtype that stores scales ``s`` exactly: the format's ``scale_dtype`` (float16) when
    every value is representable there, else float32 (weights so small or large that float16
    scales would underflow to subnormals or overflow; :func:`round_scale` rounds to it)."""
    if fmt.scale_dtype is None or fmt.scale_dtype == torch.float32:
        return fmt.scale_dtype
    sf = s.float()
    return fmt.scale_dtype if torch.equal(sf.to(fmt.scale_dtype).float(), sf) else torch.float32


def _fits(s: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every non-zero ``|s|`` lies in ``dtype``'s normal range (full precision there)."""
    info = torch.finfo(dtype)
    a = s.abs()
    return bool(((a == 0) | ((a >= info.tiny) & (a <= info.max))).all())


def round_scale(s: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round scales to their storage dtype away from zero (never shrinking the covered range),
    keeping non-zero scales non-zero.

    The storage dtype is the format's ``scale_dtype`` (float16) when every scale lies in its
    normal range, else float32, so that a scheme's relative error does not depend on the
    weight's magnitude (a weight scaled by 1e-6 quantizes as well as the original). Raises
    :class:`NonFiniteError` if a scale is not finite in float32 either (``|w|`` near 3e38) or
    underflows it (``|w|`` below about 1e-36).
    """
    dtype = fmt.scale_dtype
    if dtype != torch.float32 and not _fits(s, dtype):
        dtype = torch.float32
    stored = s.to(dtype)
    shrunk = stored.float().abs() < s.abs()
    if shrunk.any():
        away = torch.copysign(torch.full_like(s, float("inf")), s).to(stored.dtype)
        stored = torch.where(shrunk, torch.nextafter(stored, away), stored)
    if not torch.isfinite(stored).all():
        raise NonFiniteError("a scale overflows float32: the weight's range is too large to quantize")
    if not _fits(stored.float(), torch.float32):
        raise NonFiniteError("a scale underflows float32: the weight's values are too small (below ~1e-36) to quantize")
    return stored.float()


def choose_qparams(w: torch.Tensor, scheme: Scheme, clip: torch.Tensor | float = 1.0) -> QParams:
    """Min/max scales (and zeros) for ``w`` ``(N, K)``; ``clip`` shrinks the range, scalar or ``(R, ng)``.

    Per-tensor schemes return ``(1, 1)`` parameters; others ``(N, ng)``.
    """
    fmt = scheme.fmt
    if scheme.is_cast:
        raise TypeError(f"{scheme} is a cast and has no quantization parameters")
    g = grouped(*_flat(w, scheme))
    tiny = g.abs().amax(-1, keepdim=True) < _TOO_SMALL
    if bool(tiny.any()):  # groups that are zero for every purpose: scale 0, stored as zero
        g = torch.where(tiny, torch.zeros_like(g), g)  # (check_finite warns when whole rows are)
    if fmt.kind == "float":  # scaled float (fp8): absmax onto the format's largest value
        s = g.abs().amax(-1) * clip / fmt.max_value
        return QParams(round_scale(s, fmt), None)
    if fmt.kind == "codebook":  # codebook levels span [-1, 1]
        return QParams(round_scale(g.abs().amax(-1) * clip, fmt), None)
    if scheme.symmetric:
        if fmt.sym_range == "restricted":  # max|x| onto +-(2**(b-1) - 1)
            return QParams(round_scale(g.abs().amax(-1) * clip / fmt.sym_qmax, fmt), None)
        idx = g.abs().argmax(-1, keepdim=True)
        m = g.gather(-1, idx).squeeze(-1)  # signed value of largest magnitude
        return QParams(round_scale(m * clip / -fmt.sym_zero, fmt), None)
    lo = g.amin(-1).clamp(max=0) * clip
    hi = g.amax(-1).clamp(min=0) * clip
    s = round_scale((hi - lo) / fmt.qmax, fmt)
    z = torch.round(-lo / torch.where(s == 0, 1.0, s)).clamp(0, fmt.qmax)
    return QParams(s, z)


# Below this largest magnitude a group's scale (max / 448 for fp8, max / 2 for int2) would be a
# float32 subnormal or zero.
_TOO_SMALL = torch.finfo(torch.float32).tiny * 512


def _codebook(fmt: Format, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(fmt.codebook, dtype=torch.float32, device=device)


def quantize_values(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Codes (uint8, ``x``'s shape) of values ``x`` under ``scale``/``zero`` broadcastable to ``x``.

    Affine: ``clamp(round(x / s + z), 0, 2**b - 1)`` (``z`` may be fractional, e.g. from HQQ);
    codebook: the index of the nearest level of ``x / s``.
    """
    fmt = scheme.fmt
    safe = torch.where(scale == 0, 1.0, scale)
    if fmt.kind == "codebook":
        cb = _codebook(fmt, x.device)
        return torch.bucketize((x / safe).contiguous(), (cb[1:] + cb[:-1]) / 2).to(torch.uint8)
    if fmt.kind != "affine":
        raise TypeError(f"{fmt.name} is not an integer-code format")
    z = zero if zero is not None else fmt.sym_zero
    return (torch.round(x / safe + z)).clamp(0, fmt.qmax).to(torch.uint8)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Inverse of :func:`quantize_values`: float32 values of ``codes``."""
    fmt = scheme.fmt
    if fmt.kind == "codebook":
        return _codebook(fmt, codes.device)[codes.long()] * scale
    z = zero if zero is not None else float(fmt.sym_zero)
    return (codes.float() - z) * scale


def quantize_codes(w: torch.Tensor, qp: QParams, scheme: Scheme) -> torch.Tensor:
    """Codes ``(N, K)`` uint8 for an affine or codebook scheme, given its parameters."""
    flat, gs = _flat(w, scheme)
    if flat.shape[0] == 0:
        return torch.zeros(w.shape, dtype=torch.uint8)
    g = grouped(flat, gs)
    zero = qp.zero.unsqueeze(-1) if qp.zero is not None else None
    q = quantize_values(g, qp.scale.unsqueeze(-1), zero, scheme)
    return q.reshape(flat.shape[0], -1)[:, : flat.shape[1]].reshape(w.shape)


def dequantize_codes(codes: torch.Tensor, qp: QParams, scheme: Scheme) -> torch.Tensor:
    """``(N, K)`` uint8 codes -> ``(N, K)`` float32."""
    flat, gs = _flat(codes, scheme)
    if flat.shape[0] == 0:
        return torch.zeros(codes.shape)
    pad = -flat.shape[1] % gs
    c = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    c = c.reshape(flat.shape[0], -1, gs)
    zero = qp.zero.unsqueeze(-1) if qp.zero is not None else None
    v = dequantize_values(c, qp.scale.unsqueeze(-1), zero, scheme)
    return v.reshape(flat.shape[0], -1)[:, : flat.shape[1]].reshape(codes.shape)


def quantize_float(w: torch.Tensor, qp: QParams | None, scheme: Scheme) -> torch.Tensor:
    """Float formats: ``w / scale`` (scaled) or ``w`` cast to the storage dtype, shape kept."""
    fmt = scheme.fmt
    if qp is None:
        return w.to(fmt.torch_dtype)
    s = qp.scale if qp.scale.shape[1] == 1 else None
    if s is None:
        raise ValueError("scaled float formats use one scale per channel")
    x = w.float() / torch.where(s == 0, 1.0, s)
    return x.clamp(-fmt.max_value, fmt.max_value).to(fmt.torch_dtype)


def dequantize_float(data: torch.Tensor, qp: QParams | None) -> torch.Tensor:
    """Inverse of :func:`quantize_float`, float32."""
    x = data.float()
    return x if qp is None else x * qp.scale


def _roundtrip(w: torch.Tensor, scheme: Scheme, qp: QParams) -> torch.Tensor:
    if scheme.fmt.kind == "float":
        return dequantize_float(quantize_float(w, qp, scheme), qp)
    return dequantize_codes(quantize_codes(w, qp, scheme), qp, scheme)


def mse_clip_search(
    w: torch.Tensor,
    scheme: Scheme,
    grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
    weight: torch.Tensor | None = None,
) -> QParams:
    """Per-group clip ratio from ``grid`` that minimises ``||w - deq(q(w))||^2`` in each group,
    or with ``weight`` (``(K,)`` per column, or ``w``'s shape; >= 0) ``sum weight * (w - deq)^2``.

    Returns the parameters of the best ratio per group (same shapes as :func:`choose_qparams`).
    """
    flat, gs = _flat(w, scheme)
    ref = grouped(flat, gs)
    wt = 1.0 if weight is None else grouped(_flat(weight.float().expand(w.shape).reshape(w.shape), scheme)[0], gs)
    return clip_search(w, scheme, grid, lambda deq: (((grouped(deq.reshape(flat.shape), gs) - ref) ** 2) * wt).sum(-1))


def clip_search(w: torch.Tensor, scheme: Scheme, grid: tuple[float, ...], error) -> QParams:
    """Per-group clip ratio from ``grid`` minimising ``error(deq)``: ``deq`` is ``w``'s round trip
    (``w``'s shape) under one ratio, ``error`` returns one value per (row, group) ``(R, ng)``.

    Returns the parameters of the best ratio per group (same shapes as :func:`choose_qparams`).
    """
    best_err = None
    best: QParams | None = None
    for ratio in grid:
        qp = choose_qparams(w, scheme, clip=ratio)
        err = error(_roundtrip(w, scheme, qp))
        if best is None:
            best_err, best = err, qp
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(
            torch.where(better, qp.scale, best.scale),
            None if qp.zero is None else torch.where(better, qp.zero, best.zero),
        )
    assert best is not None
    return best


class _FakeQuantSTE(torch.autograd.Function):
    """Round trip forward; the incoming gradient passes to ``w`` unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, w, deq):  # type: ignore[override]
        return deq

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def fake_quantize(w: torch.Tensor, scheme: Scheme, qp: QParams | None = None) -> torch.Tensor:
    """``deq(q(w))`` with a straight-through gradient to ``w``; shape ``(N, K)`` kept."""
    if scheme.is_cast:
        deq = w.detach().to(scheme.fmt.torch_dtype).float()
    else:
        qp = qp if qp is not None else choose_qparams(w.detach(), scheme)
        deq = _roundtrip(w.detach(), scheme, qp)
    return _FakeQuantSTE.apply(w, deq)
