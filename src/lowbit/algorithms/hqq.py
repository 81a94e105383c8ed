"""HQQ: calibration-free half-quadratic optimisation of each group's scale and zero point.

Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). Instead
of the squared error, HQQ minimises a sparsity-promoting ``l_p`` norm (``p < 1``) of the weight
error, so that a few large errors are tolerated in exchange for many small ones; the
non-convex problem is split with an auxiliary error variable ``W_e`` and solved by alternating:

1. ``W_e = shrink_p(W - deq(q(W)), beta)`` where
   ``shrink_p(x, beta) = sign(x) * relu(|x| - |x|^(p-1) / beta)`` (the generalised soft threshold);
2. the format's free parameters in closed form for the quadratic part
   ``||W - W_e - deq(q(W))||^2`` with the codes fixed: the zero point as the mean of
   ``q - (W - W_e) / s`` over the group (the paper's update), and, as an extension here, the
   scale by least squares ``s = <W - W_e, q - z> / <q - z, q - z>``;
3. ``beta *= kappa``;

keeping the parameters of the iteration with the lowest ``l_p`` error. Symmetric schemes have
no zero point to move, so only their scale is optimised. Zero points come out fractional and
are stored as float16 (rounded before the final codes are computed).

Extension: each weight's error is weighted by ``|w|^importance`` (0 is the paper's objective).
Unweighted, the ``l_p`` optimum clips each group's largest weights, and on SmolLM2 that costs
more perplexity than it saves. Measured on 2,048 held-out tokens (RTN / importance 0 / 0.5 /
1.5): w4g64 9.33 / 9.9 / 9.40 / 9.20, w3g64 25.4 / 66.7 / 22.2 / 22.1, w4g64-asym 9.80 / 8.99 /
9.10 / -, w3g64-asym 23.8 / 26.2 / 21.8 / -, w2g32-asym 56,277 / 18,656 / 15,459 / -. Hence the
defaults: 1.5 for symmetric schemes (the scale is the only lever; keep the large weights), 0.5
for asymmetric ones. Those figures are the first 2,048 tokens of the eval split, where the
defaults were chosen; the same sweep on the disjoint train split confirms them (BENCHMARKS.md,
``python benchmarks/run_all.py --sections sweeps``). The weighting needs no data; ``importance``
is an option of ``method="hqq"`` (CLI ``--importance``).

Speed: integer schemes with float16 scales run the same iteration fused in C
(``kernels/csrc/hqq.h``, :func:`lowbit.kernels.cpu.hqq_affine`): each group's 20 iterations run
while it sits in L1, vectorised, with ``|x|^p`` by polynomials; 15-60x faster than the torch
operations here and equal to them at float32 rounding level (the weighted l_p objective within
0.1%, identical bytes on every CPU ISA: sums run in 16 fixed lanes). The torch version below is
the reference (``fused=False``, and what runs without the CPU library).

Input ``w (N, K)``; output a :class:`~lowbit.qweight.QWeight`. No data needed.
"""

from __future__ import annotations

import inspect
import math

import torch

from ..primitives import QParams, check_finite, choose_qparams, grouped, quantize_values, round_scale
from ..qweight import QWeight
from ..scheme import Scheme

__all__ = ["quantize_weight", "optimize_qparams", "default_importance"]


def _shrink(x: torch.Tensor, beta: float, p: float, weight: torch.Tensor) -> torch.Tensor:
    """Proximal step of ``weight * |x|^p`` with quadratic coupling ``beta``: a soft threshold."""
    return torch.sign(x) * torch.relu(x.abs() - weight * x.abs().clamp_min(1e-12).pow(p - 1) / beta)


BLOCK_ELEMENTS = 1 << 18  # weights optimised together (rows of one block): ~1 MiB of float32

# A group stops after this many iterations without a lower error. On SmolLM2's layers most groups
# last improve around iteration 3 (under 10% after iteration 10), and stopping after 3 idle ones
# keeps 97-100% of the 20 iterations' objective gain (w4g128 0.0184 vs 0.0190, w4g64-asym 0.2759
# vs 0.2759, w3g64-asym 0.0662 vs 0.0663, one down_proj) at about a third of the work. The
# reference implementation stops the whole tensor at its first iteration without a gain.
PATIENCE = 3


def default_importance(scheme: Scheme) -> float:
    """The error weighting exponent used when none is given (see the module docstring)."""
    return 1.5 if scheme.symmetric else 0.5


def optimize_qparams(
    w: torch.Tensor,
    scheme: Scheme,
    *,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    optimize_scale: bool = True,
    importance: float | None = None,
    patience: int = PATIENCE,
) -> QParams:
    """Half-quadratic optimised parameters for ``w`` ``(N, K)``: shapes as :func:`choose_qparams`.

    ``importance``: each weight's error counts ``|w|^importance`` times (normalised per group);
    0 gives the paper's unweighted objective; ``None`` picks :func:`default_importance`.
    ``patience``: a group stops after that many iterations without a lower error (0: all
    ``iters``; see :data:`PATIENCE`).
    """
    fmt = scheme.fmt
    if fmt.kind != "affine" or scheme.per_tensor:
        raise ValueError(f"HQQ optimises per-channel or per-group integer formats, not {scheme}")
    if importance is None:
        importance = default_importance(scheme)
    # rows are independent: a block of rows at a time keeps the ~20 elementwise temporaries of
    # each iteration in cache (6x faster than the whole weight at once; the same numbers)
    rows = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
    if w.shape[0] > rows:
        parts = [optimize_qparams(w[i : i + rows], scheme, p=p, beta=beta, kappa=kappa, iters=iters,
                                  optimize_scale=optimize_scale, importance=importance, patience=patience)
                 for i in range(0, w.shape[0], rows)]  # fmt: skip
        return QParams(torch.cat([q.scale for q in parts]),
                       None if parts[0].zero is None else torch.cat([q.zero for q in parts]))  # fmt: skip
    qp = choose_qparams(w, scheme)
    gs = w.shape[1] if scheme.group_size is None else scheme.group_size
    g = grouped(w.float(), gs)  # (N, ng, G), zero-padded
    real = grouped(torch.ones_like(w, dtype=torch.float32), gs)  # 1 on real columns, 0 on padding
    count = real.sum(-1, keepdim=True)
    omega = g.abs().pow(importance) * real
    omega = omega / (omega.sum(-1, keepdim=True) / count).clamp_min(1e-12)  # mean 1 per group
    s = qp.scale.unsqueeze(-1)
    z = (qp.zero if qp.zero is not None else torch.full_like(qp.scale, float(fmt.sym_zero))).unsqueeze(-1)

    def lp_error(s_: torch.Tensor, z_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(error (N, ng, 1), the codes it was measured with: the next iteration's codes)"""
        q = quantize_values(g, s_, z_, scheme).float()
        return ((g - (q - z_) * s_).abs().pow(p) * omega).sum(-1, keepdim=True), q

    best_err, q = lp_error(s, z)
    best_s, best_z = s.clone(), z.clone()
    stale = torch.zeros_like(best_err)  # iterations since each group's error last fell
    live = torch.ones_like(best_err, dtype=torch.bool)  # groups still iterating
    for _ in range(iters):
        we = _shrink(g - (q - z) * s, beta, p, omega) * real
        target = (g - we) * real  # what deq(q) should reproduce
        if not scheme.symmetric:  # weighted mean of the codes' offsets
            safe = torch.where(s == 0, 1.0, s)
            z = ((q - target / safe) * omega).sum(-1, keepdim=True) / omega.sum(-1, keepdim=True).clamp_min(1e-12)
        if optimize_scale:  # weighted least squares
            d = (q - z) * real
            denom = (omega * d * d).sum(-1, keepdim=True)
            s_new = (omega * target * d).sum(-1, keepdim=True) / torch.where(denom == 0, 1.0, denom)
            s = torch.where(denom == 0, s, s_new)
        beta *= kappa
        err, q = lp_error(s, z)
        better = (err < best_err) & live
        if patience > 0:
            stale = torch.where(better, 0.0, stale + 1)
            live &= stale < patience
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        if not bool(live.any()):
            break
    scale = round_scale(best_s.squeeze(-1), fmt)
    if scheme.symmetric:
        return QParams(scale, None)
    return QParams(scale, best_z.squeeze(-1).to(torch.float16).float())


# The shrinkage threshold |x|^(p-1)/beta is not scale-free: beta (the paper's 10) assumes weights
# of LLM magnitude. A tensor whose RMS lies more than 2^8 away from REFERENCE_RMS is optimised
# rescaled by a power of two (exact in floating point) into that band, so that weights of 1e-20
# or 1e20 are optimised as well as ordinary ones instead of falling back to round to nearest.
REFERENCE_RMS = 2.0**-6
_BAND = 8


def _magnitude_shift(w: torch.Tensor) -> int:
    """The power of two that brings ``w``'s RMS within 2^8 of :data:`REFERENCE_RMS` (0 if it is)."""
    rms = float(torch.linalg.vector_norm(w, dtype=torch.float64)) / math.sqrt(max(1, w.numel()))
    if rms == 0.0:
        return 0
    e = math.log2(rms / REFERENCE_RMS)
    return 0 if abs(e) <= _BAND else -round(e)


# optimize_qparams' keyword defaults, which the fused C iteration receives explicitly
_DEFAULTS = {k: v.default for k, v in inspect.signature(optimize_qparams).parameters.items()
             if v.kind is inspect.Parameter.KEYWORD_ONLY}  # fmt: skip


def quantize_weight(w: torch.Tensor, scheme: Scheme, *, name: str = "weight", fused: bool = True, **options) -> QWeight:
    """HQQ-quantize ``w`` ``(N, ...)`` (float32, bfloat16 or float16; flattened to ``(N, K)``);
    options as :func:`optimize_qparams`. Integer schemes with float16 scales run fused in C when
    the CPU library is loaded (:func:`lowbit.kernels.cpu.hqq_affine`: each group's iterations in
    L1, 15-60x faster than the torch operations, equal to them at float32 rounding level;
    ``fused=False`` runs the torch version). Raises
    :class:`lowbit.primitives.NonFiniteError` for NaN/Inf weights, ``ValueError`` for a scheme
    HQQ cannot optimise."""
    w2 = w.detach().reshape(w.shape[0], -1)
    if fused and w2.numel():  # (schemes the C code cannot hold: None, then optimize_qparams refuses or runs)
        from ..kernels import cpu

        opts = {**_DEFAULTS, **options}
        if opts.get("importance") is None:
            opts["importance"] = default_importance(scheme)
        # (the C iteration's exponents stay in float32's range for 0 < p < 1, the l_p norms HQQ uses)
        got = cpu.hqq_affine(w2, scheme, name, shift=_magnitude_shift(w2), **opts) if 0 < opts["p"] < 1 else None
        if got is not None:
            from .rtn import from_fused

            return from_fused(got, w, w2, scheme, name)
    check_finite(w, name)
    w2 = w2.float()
    shift = _magnitude_shift(w2)
    if shift == 0:
        return QWeight.from_float(w, scheme, optimize_qparams(w2, scheme, **options), name=name, check=False)
    qp = optimize_qparams(torch.ldexp(w2, torch.tensor(shift)), scheme, **options)
    # scales back to the weight's magnitude (a power of two: exact unless float16 scales can no
    # longer hold them, which round_scale handles), zero points unchanged
    scale = round_scale(torch.ldexp(qp.scale.double(), torch.tensor(-shift)).float(), scheme.fmt)
    return QWeight.from_float(w, scheme, QParams(scale, qp.zero), name=name, check=False)
