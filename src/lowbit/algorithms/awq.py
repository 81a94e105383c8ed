"""AWQ: activation-aware weight quantization — per-channel scaling and clipping searched against
the layer's real inputs.

Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024. Weight channels that meet large activations matter
most; scaling them up before quantization (``W' = W diag(s)``) and the activations down
(``x' = x / s``, folded into the previous operation) shrinks their relative rounding error.
The scale is ``s = mean|x|^alpha`` (normalised by ``sqrt(max s * min s)``), ``alpha`` chosen on a
grid to minimise the output error ``||Q(W diag(s)) (x / s) - W x||^2``. A second search shrinks
each group's range (clipping) to minimise the same output error per output channel and group.
Both errors are quadratic forms in the weight error, scored through the input's second moment
``E[x x^T]`` over every calibration token (the paper scores a small sample of rows; the moment
is the same objective on all of the data, at the cost of one ``K x K`` matrix per input).

Pure math: tensors in, scales or :class:`~lowbit.primitives.QParams` out. Where ``1/s`` is folded
(a norm's weight, the previous linear's output rows) is the driver's business.
Shapes: weights ``(N, K)``; ``hessian (K, K)``; ``mean_abs (K,)``.
"""

from __future__ import annotations

import torch

from ..primitives import QParams, choose_qparams, clip_search, dequantize_codes, grouped, quantize_codes
from ..scheme import Scheme
from .gptq import HessianError

__all__ = ["search_scales", "search_clip", "ALPHA_GRID", "CLIP_GRID"]

ALPHA_GRID = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1
CLIP_GRID = tuple(1.0 - i / 40 for i in range(21))  # 1.0, 0.975, ..., 0.5


def _rtn(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    qp = choose_qparams(w, scheme)
    return dequantize_codes(quantize_codes(w, qp, scheme), qp, scheme)


@torch.no_grad()
def search_scales(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    mean_abs: torch.Tensor,
    scheme: Scheme,
    grid: tuple[float, ...] = ALPHA_GRID,
) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scales ``s (K,)`` for linears ``weights`` (each ``(N_i, K)``) sharing
    one input ``x``.

    ``hessian (K, K)``: a positive multiple of ``E[x x^T]`` over every calibration token;
    ``mean_abs (K,)``: ``E|x|`` per channel. The output error of an effective weight error ``D``
    is ``E||D x||^2 = sum_n D_n E[x x^T] D_n^T``, so the search scores every token of the
    calibration set exactly, not a sample of rows (a sample drawn from a few sequences fits those
    sequences' channel statistics and scores worse on text from other sources).

    Returns ``(s, alpha)``; ``alpha = 0`` (``s = 1``) is in the grid, so the result is never
    worse than plain quantization on the calibration inputs. Channels that never saw a non-zero
    input get ``s = 1``.
    """
    mean_abs = mean_abs.float()
    live = mean_abs > 0
    # Channels the calibration never exercised keep s = 1: their inputs are unknown, and a tiny
    # s would shrink their weights to nothing while 1/s blew up their real inputs.
    if not bool(live.any()):
        return torch.ones_like(mean_abs), 0.0
    if not bool(torch.isfinite(hessian).all()):
        raise HessianError("the input's second moment E[x x^T] has NaN/Inf (activations too large for float32?)")
    h = _unit(hessian.float())  # the search is scale-free; unit range keeps the sums in float32
    # One common unit for every linear: their errors add up in the output's real units (each
    # divided by its own range would weight a small-valued linear's error up by 1/max|W|^2).
    unit = max((float(w.abs().max()) for w in weights if w.numel()), default=0.0) or 1.0
    weights = [w.float() / unit for w in weights]
    best = (torch.ones_like(mean_abs), float("inf"), 0.0)
    for alpha in grid:
        s = mean_abs.clamp_min(1e-8).pow(alpha)
        s = s / (s[live].max() * s[live].min()).sqrt()
        s = torch.where(live, s, torch.ones_like(s))
        loss = 0.0
        for w in weights:
            d = _rtn(w * s, scheme) / s - w  # effective weight error seen by x
            loss += float(((d @ h) * d).sum())
        if loss < best[1]:
            best = (s, loss, alpha)
    return best[0], best[2]


@torch.no_grad()
def search_clip(
    w: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, grid: tuple[float, ...] = CLIP_GRID
) -> QParams:
    """Per (row, group) range shrink from ``grid`` minimising the group's output error
    ``d_g^T H_gg d_g`` (``d_g``: the group's rounding error, ``H_gg``: the group's diagonal block
    of ``hessian (K, K)``, a positive multiple of ``E[x x^T]`` over the calibration tokens).

    Returns parameters shaped like :func:`lowbit.primitives.choose_qparams` (``(N, ng)``).
    """
    if scheme.per_tensor:
        return choose_qparams(w, scheme)
    if not bool(torch.isfinite(hessian).all()):
        raise HessianError("the input's second moment E[x x^T] has NaN/Inf (activations too large for float32?)")
    w = w.float()
    k = w.shape[1]
    gs = k if scheme.group_size is None else scheme.group_size
    h = _unit(hessian.float())
    # Columns that never saw a non-zero input would count for nothing, and the clip could then
    # wreck them; they count as a column of average input energy instead.
    diag = h.diagonal()
    live = diag > 0
    fill = float(diag[live].mean()) if bool(live.any()) else 1.0
    h = h + torch.diag(torch.where(live, 0.0, fill))
    ng, pad = -(-k // gs), -k % gs
    if pad:
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
    idx = torch.arange(ng)
    blocks = h.reshape(ng, gs, ng, gs)[idx, :, idx, :]  # (ng, G, G) diagonal blocks
    mw = float(w.abs().max()) or 1.0  # errors in units of the weight's range: no float32 underflow

    def error(deq: torch.Tensor) -> torch.Tensor:
        d = grouped((deq - w) / mw, gs)  # (N, ng, G)
        return torch.einsum("ngi,gij,ngj->ng", d, blocks, d)

    return clip_search(w, scheme, grid, error)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """``t`` divided by its largest magnitude (unchanged if all zero)."""
    m = float(t.abs().max()) if t.numel() else 0.0
    return t / m if m > 0 else t
