"""GPTQ: quantize a weight column by column, each rounding error compensated by the columns
not yet quantized, using the inverse Hessian of the layer's inputs.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (Algorithm 1). For a linear layer ``y = W x`` the layer-wise
objective ``||W X - Q X||^2`` has Hessian ``H = 2 X X^T``; quantizing column ``i`` to ``q_i``
with error ``e = (w_i - q_i) / [H^-1]_ii`` updates the remaining columns by ``-e [H^-1]_i,i:``.
The paper's implementation choices are kept: the upper Cholesky factor of ``H^-1`` replaces the
sequential inverse updates, errors are applied lazily per block of 128 columns, ``H`` is damped
by a fraction of its mean diagonal. Columns whose input was always zero keep their
round-to-nearest value (with a warning) instead of the paper's zero: calibration says nothing
about them, and real inputs may use them.

Groups: scales (and zeros) of a group are chosen when its first column is reached, from the
columns as updated so far. With ``act_order`` (columns in order of decreasing Hessian diagonal,
the paper's "act-order"), group parameters are computed up front from the original weight
("static groups"), so groups stay contiguous in storage and no column permutation is stored.
How a group's range is chosen (``clip``): ``"minmax"`` (the paper's), ``"mse"`` (the clip
ratio minimising the group's squared rounding error), or ``"hessian"`` (the default: the same
search with each column's error weighted by its Hessian diagonal, i.e. by the energy of its
input, the diagonal part of the layer objective). Min/max ranges let one outlier weight set a
group's step for all 64 or 128; GPTQ's error feedback cannot undo a step that is too coarse.
The clip search is the one of the GPTQ authors' code (a grid of range shrinks, error norm
minimised per group) with the layer objective's diagonal as the norm's weights.

Input ``w (N, K)``, ``h (K, K)``; output a :class:`~lowbit.qweight.QWeight`.
"""

from __future__ import annotations

import warnings

import torch

from ..primitives import (
    QParams,
    check_finite,
    choose_qparams,
    dequantize_values,
    mse_clip_search,
    quantize_values,
)
from ..qweight import QWeight
from ..scheme import Scheme

__all__ = ["quantize_weight", "group_qparams", "group_buffers", "open_group", "HessianError", "DAMP_STEPS", "CLIP_CHOICES"]

# Damping tried in turn (fraction of the mean Hessian diagonal) until H is positive definite.
DAMP_STEPS = (0.01, 0.1, 1.0)
CLIP_CHOICES = ("hessian", "mse", "minmax")


class HessianError(ValueError):
    """The Hessian stays singular even after the strongest damping."""


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + d I)^-1``, escalating ``d`` through DAMP_STEPS from ``damp``."""
    mean_diag = float(torch.diag(h).mean())
    steps = [damp] + [d for d in DAMP_STEPS if d > damp]
    for d in steps:
        hd = h + d * mean_diag * torch.eye(h.shape[0], dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise HessianError(
        f"{name}: the input Hessian is not positive definite even with damping {steps[-1]} x mean diagonal "
        "(are the calibration inputs degenerate, e.g. all zero or far too few tokens?)"
    )


def group_qparams(w: torch.Tensor, hdiag: torch.Tensor, scheme: Scheme, clip: str = "hessian") -> QParams:
    """Group parameters for the columns ``w (N, K')`` whose Hessian diagonal is ``hdiag (K',)``.

    ``clip``: ``"minmax"``, ``"mse"`` or ``"hessian"`` (see the module docstring)."""
    if clip == "minmax":
        return choose_qparams(w, scheme)
    if clip == "mse":
        return mse_clip_search(w, scheme)
    if clip == "hessian":
        d = hdiag.float().clamp_min(0)
        live = d > 0
        # a column calibration never fed counts as an average one: its error is unknown, not free
        d = torch.where(live, d, d[live].mean() if bool(live.any()) else torch.ones(()))
        return mse_clip_search(w, scheme, weight=d)
    raise ValueError(f"clip={clip!r}: choose from {CLIP_CHOICES}")


def group_buffers(n: int, k: int, gs: int, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zeroed scales ``(R, ceil(K / gs))`` (``R`` = 1 per tensor, else ``n``) and zero points of the
    same shape (``None`` for symmetric and codebook schemes), filled as each group is opened."""
    scale = torch.zeros(n if not scheme.per_tensor else 1, -(-k // gs))
    return scale, (None if scheme.symmetric or scheme.fmt.kind != "affine" else torch.zeros_like(scale))


def open_group(W: torch.Tensor, w1: torch.Tensor, i1: int, i2: int, col: int, gs: int, hdiag: torch.Tensor,
               scheme: Scheme, clip: str, scale: torch.Tensor, zero: torch.Tensor | None,
               keep: torch.Tensor | None = None) -> None:  # fmt: skip
    """At the first column ``col`` of a group of ``gs`` columns, inside the block ``[i1, i2)``
    being quantized: choose the group's parameters from its columns as updated so far (within the
    block: ``w1``; beyond it: ``W``), times ``keep`` (bool ``(N, K)``) where given, and write them
    into column ``col // gs`` of ``scale`` and ``zero`` (in place)."""
    hi = min(col + gs, W.shape[1])
    i = col - i1
    cur = torch.cat([w1[:, i : min(hi, i2) - i1], W[:, i2:hi]], dim=1) if hi > i2 else w1[:, i : hi - i1]
    if keep is not None:
        cur = cur * keep[:, col:hi]
    qp = group_qparams(cur, hdiag[col:hi], scheme, clip)  # at most one group's columns: one group
    scale[:, col // gs] = qp.scale[:, 0]
    if zero is not None:
        zero[:, col // gs] = qp.zero[:, 0]


def quantize_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: Scheme,
    *,
    name: str = "weight",
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    qparams: QParams | None = None,
    clip: str = "hessian",
) -> QWeight:
    """GPTQ-quantize ``w`` ``(N, K)`` given the input Hessian ``h`` ``(K, K)`` (any positive scale).

    ``qparams`` fixes the group parameters in advance (e.g. from an AWQ clip search); by default
    they are chosen by ``clip`` from the (updated) columns, or from the original weight with
    ``act_order``. Raises ``ValueError`` for a format GPTQ cannot round or an unknown ``clip``,
    :class:`HessianError` for a non-finite or singular Hessian.
    """
    if clip not in CLIP_CHOICES:
        raise ValueError(f"clip={clip!r}: choose from {CLIP_CHOICES}")
    check_finite(w, name)
    if scheme.fmt.kind not in ("affine", "codebook"):
        raise ValueError(f"GPTQ quantizes integer or codebook formats, not {scheme}")
    if not torch.isfinite(h).all():
        raise HessianError(f"{name}: the input Hessian has NaN/Inf (non-finite calibration activations?)")
    n, k = w.shape
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    # Columns whose input was always zero in calibration: the Hessian says nothing about them.
    # They decouple from the rest (zero rows/columns of H), so they keep their round-to-nearest
    # value; zeroing them (the paper's choice) would be wrong on inputs that do use them.
    hdiag = torch.diag(H).clone()  # original column order, before the dead columns' fix below
    dead = hdiag == 0
    H[dead, dead] = 1.0
    n_dead = int(dead.sum())
    if n_dead:
        warnings.warn(
            f"{name}: {n_dead} of {k} input columns were always zero in the calibration data; "
            "GPTQ rounds those weight columns to nearest",
            stacklevel=2,
        )
    gs = k if scheme.group_size is None or scheme.per_tensor else scheme.group_size

    static = qparams
    if static is None and (act_order or scheme.per_tensor):
        static = group_qparams(W, hdiag, scheme, clip)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W = W[:, perm]
    H = H[perm][:, perm]
    hinv = _inverse_cholesky(H, damp, name)

    codes = torch.zeros(n, k, dtype=torch.uint8)
    scale, zero = group_buffers(n, k, gs, scheme)
    if static is not None:
        scale, zero = static.scale.clone(), (None if static.zero is None else static.zero.clone())

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # original column index
            g = col // gs
            if static is None and col % gs == 0:  # without act_order: col is the position i1 + i
                open_group(W, w1, i1, i2, col, gs, hdiag, scheme, clip, scale, zero)
            s = scale[:, g] if not scheme.per_tensor else scale[0, 0].expand(n)
            z = None if zero is None else (zero[:, g] if not scheme.per_tensor else zero[0, 0].expand(n))
            x = w1[:, i]
            q = quantize_values(x, s, z, scheme)
            codes[:, col] = q
            e = (x - dequantize_values(q, s, z, scheme)) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    return QWeight.from_codes(w.shape, scheme, codes, QParams(scale, zero))

