"""AWQ: activation-aware weight quantization — per-channel scaling and clipping searched against
the layer's real inputs.

Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024. Weight channels that meet large activations matter
most; scaling them up before quantization (``W' = W diag(s)``) and the activations down
(``x' = x / s``, folded into the previous operation) shrinks their relative rounding error.
The scale is ``s = mean|x|^alpha`` (normalised by ``sqrt(max s * min s)``), ``alpha`` chosen on a
grid to minimise the output error ``||Q(W diag(s)) (x / s) - W x||^2``. A second search shrinks
each group's range (clipping) to minimise the same output error per output channel and group.

Pure math: tensors in, scales or :class:`~lowbit.primitives.QParams` out. Where ``1/s`` is folded
(a norm's weight, the previous linear's output rows) is the driver's business.
Shapes: weights ``(N, K)``; activations ``x (T, K)`` (a sample of calibration tokens).
"""

from __future__ import annotations

import torch

from ..primitives import QParams, choose_qparams, clip_search, dequantize_codes, grouped, quantize_codes
from ..scheme import Scheme

__all__ = ["search_scales", "search_clip", "ALPHA_GRID", "CLIP_GRID"]

ALPHA_GRID = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1
CLIP_GRID = tuple(1.0 - i / 40 for i in range(21))  # 1.0, 0.975, ..., 0.5


def _rtn(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    qp = choose_qparams(w, scheme)
    return dequantize_codes(quantize_codes(w, qp, scheme), qp, scheme)


@torch.no_grad()
def search_scales(
    weights: list[torch.Tensor], x: torch.Tensor, scheme: Scheme, grid: tuple[float, ...] = ALPHA_GRID
) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scales ``s (K,)`` for linears ``weights`` sharing the input ``x``.

    Returns ``(s, alpha)``; ``alpha = 0`` (``s = 1``) is in the grid, so the result is never
    worse than plain quantization on ``x``. Channels whose sampled inputs are all zero get
    ``s = 1``.
    """
    x = _unit(x.float())  # the search is scale-free; unit range keeps the squares in float32
    mean_abs = x.abs().mean(0)  # (K,)
    # Channels the calibration never exercised keep s = 1: their inputs are unknown, and a tiny
    # s would shrink their weights to nothing while 1/s blew up their real inputs.
    live = mean_abs > 0
    weights = [_unit(w.float()) for w in weights]
    ref = [x @ w.t() for w in weights]
    best = (torch.ones_like(mean_abs), float("inf"), 0.0)
    if not bool(live.any()):
        return best[0], 0.0
    for alpha in grid:
        s = mean_abs.clamp_min(1e-8).pow(alpha)
        s = s / (s[live].max() * s[live].min()).sqrt()
        s = torch.where(live, s, torch.ones_like(s))
        loss = 0.0
        for w, r in zip(weights, ref):
            wq = _rtn(w * s, scheme) / s  # effective weight seen by x
            loss += float(((x @ wq.t()) - r).pow(2).mean())
        if loss < best[1]:
            best = (s, loss, alpha)
    return best[0], best[2]


@torch.no_grad()
def search_clip(
    w: torch.Tensor, x: torch.Tensor, scheme: Scheme, grid: tuple[float, ...] = CLIP_GRID
) -> QParams:
    """Per (row, group) range shrink from ``grid`` minimising ``sum_t (x_t,g . (q(w)_g - w_g))^2``.

    Returns parameters shaped like :func:`lowbit.primitives.choose_qparams` (``(N, ng)``).
    """
    if scheme.per_tensor:
        return choose_qparams(w, scheme)
    w = w.float()
    n, k = w.shape
    gs = k if scheme.group_size is None else scheme.group_size
    x = _unit(x.float())
    mw = float(w.abs().max()) or 1.0  # errors in units of the weight's range: no float32 underflow
    xg = grouped(x, gs)  # (T, ng, G)
    # Columns whose sampled inputs are all zero would count for nothing, and the clip could
    # then wreck them; they count as a column of average input energy instead.
    energy = x.pow(2).mean(0)  # (K,)
    live = energy > 0
    fill = float(energy[live].mean()) if bool(live.any()) else 1.0
    dead = grouped(torch.where(live, 0.0, fill * x.shape[0]).unsqueeze(0), gs)  # (1, ng, G)

    def error(deq: torch.Tensor) -> torch.Tensor:
        d = grouped((deq - w) / mw, gs)  # (N, ng, G)
        return torch.einsum("tgk,ngk->ntg", xg, d).pow(2).sum(1) + (d.pow(2) * dead).sum(-1)

    return clip_search(w, scheme, grid, error)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """``t`` divided by its largest magnitude (unchanged if all zero)."""
    m = float(t.abs().max()) if t.numel() else 0.0
    return t / m if m > 0 else t
