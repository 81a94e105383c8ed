"""Round-to-nearest (RTN): weight-only, data-free, seconds for a whole model.

Scales come from each group's min/max (see :mod:`lowbit.primitives`), or, with
``clip="mse"``, from a per-group search over shrunken ranges that minimises the group's squared
rounding error (trading clipped outliers for finer steps; the same idea as the clipping searches
of AWQ and of llama.cpp's quantizers).
"""

from __future__ import annotations

import torch

from ..primitives import QParams, check_finite, choose_qparams, mse_clip_search
from ..qweight import QWeight
from ..scheme import Scheme

CLIP_CHOICES = ("minmax", "mse")


def from_fused(fused: tuple, w: torch.Tensor, w2: torch.Tensor, scheme: Scheme, name: str) -> QWeight:
    """The :class:`QWeight` of a fused C quantizer's ``(codes, scales, zero points)`` for ``w``
    (``w2``: its ``(N, K)`` view); rows the C code stored as zero (only subnormals) get the torch
    path's warning."""
    codes, scales, zeros = fused
    empty = (scales == 0).all(1)
    if bool(empty.any()):
        check_finite(w2[empty], name)  # warns about rows of subnormals, as the torch path does
    return QWeight.from_codes(tuple(w.shape), scheme, codes, QParams(scales, zeros), packed=scheme.fmt.bits in (2, 4, 8))


def quantize_weight(w: torch.Tensor, scheme: Scheme, *, name: str = "weight", clip: str = "minmax") -> QWeight:
    """``w`` ``(N, ...)`` float (float32, bfloat16, float16) -> :class:`QWeight` by round-to-nearest.

    Min/max integer schemes with float16 scales run fused in C when the CPU library is loaded
    (:func:`lowbit.kernels.cpu.rtn_affine`: the same bytes, one pass over the weight, reading
    bf16/fp16 without a float32 copy); everything else runs the torch operations.
    Raises :class:`lowbit.primitives.NonFiniteError` for NaN/Inf weights."""
    if scheme.is_cast:
        return QWeight.from_float(w, scheme, name=name)
    if clip == "minmax" and w.dim() >= 1 and w.shape[0]:
        from ..kernels import cpu

        w2 = w.detach().reshape(w.shape[0], -1)
        fused = cpu.rtn_affine(w2, scheme, name)
        if fused is not None:
            return from_fused(fused, w, w2, scheme, name)
    check_finite(w, name)  # before the clip search, which would otherwise see NaNs
    w2 = w.detach().reshape(w.shape[0], -1).float()
    qp = mse_clip_search(w2, scheme) if clip == "mse" else choose_qparams(w2, scheme)
    return QWeight.from_float(w, scheme, qp, name=name, check=False)
