"""Low-rank approximation of a weight (or of its quantization error): ``W ~ A @ B`` with thin
``A (N, r)`` and ``B (r, K)``. Tensors only (DESIGN principle 2).

Without calibration statistics this is the truncated SVD, the best rank-``r`` approximation in
Frobenius norm (Eckart-Young). With the input Hessian ``H = X X^T`` the objective becomes the
layer's output error ``||(W - A B) X||_F``: with ``H = Q diag(l) Q^T`` and ``S = Q diag(sqrt l)``
(so ``S S^T = H``), the truncated SVD of ``W S`` gives ``A B S``, and ``B`` is mapped back by
``S^-1``; directions the inputs never take cost nothing, so the rank goes where the inputs are.
This is the eigenspace projection of EoRA (Liu et al., "EoRA: Training-free Compensation for
Compressed LLM with Eigenspace Low-Rank Approximation", 2024) and the activation-aware scaling of
ASVD / LQER (Yuan et al., 2023; Zhang et al., "LQER: Low-Rank Quantization Error Reconstruction
for LLMs", ICML 2024, whose diagonal scaling is the special case ``H`` diagonal). Applied to a
quantized layer's error ``E = W - deq(Q)`` it gives the low-rank correction ``deq(Q) + A B``.
"""

from __future__ import annotations

import torch

from ..primitives import check_finite

__all__ = ["LowRankError", "check_rank", "rank_for_energy", "low_rank"]


class LowRankError(ValueError):
    """A rank or energy the layer cannot take."""


def check_rank(rank, n: int, k: int, name: str = "weight") -> int:
    """``rank`` as an int in ``[1, min(N, K)]``; :class:`LowRankError` otherwise."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(n, k):
        raise LowRankError(f"{name}: rank must be an integer from 1 to min({n}, {k}) = {min(n, k)}, got {rank!r}")
    return rank


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose leading singular values hold ``energy`` (a fraction in (0, 1]) of
    the sum of their squares."""
    if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0 < energy <= 1:
        raise LowRankError(f"energy must be a fraction in (0, 1], got {energy!r}")
    e = singular_values.double().pow(2)
    total = float(e.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return min(int((cum < energy - 1e-12).sum()) + 1, len(e))


def _whitening(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``S (K, K)`` with ``S S^T = H + d I`` and its inverse, from the eigendecomposition (damped by
    ``damp`` times the mean diagonal so the inverse exists)."""
    hd = h.double()
    d = damp * float(torch.diag(hd).mean().clamp_min(1e-30))
    evals, evecs = torch.linalg.eigh(hd + d * torch.eye(hd.shape[0], dtype=hd.dtype))
    root = evals.clamp_min(d).sqrt()
    return evecs * root, (evecs / root).t()


def low_rank(
    w: torch.Tensor,
    h: torch.Tensor | None = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    damp: float = 0.01,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (N, r)``, ``B (r, K)`` float32 minimising ``||w - A B||_F`` or, given the input Hessian
    ``h (K, K)``, ``||(w - A B) X||_F``. Exactly one of ``rank`` (an int in ``[1, min(N, K)]``) or
    ``energy`` (the fraction of the (weighted) squared singular values to keep; the rank is the
    smallest that holds it) is given. Raises :class:`LowRankError` for a bad rank or energy,
    :class:`~lowbit.primitives.NonFiniteError` for NaN/Inf in ``w`` or ``h``.
    """
    check_finite(w, name)
    n, k = w.shape
    if (rank is None) == (energy is None):
        raise LowRankError(f"{name}: give exactly one of rank or energy")
    if rank is not None:
        check_rank(rank, n, k, name)
    W = w.detach().double()
    if h is not None:
        check_finite(h, f"{name}'s input Hessian")
        if h.shape != (k, k):
            raise LowRankError(f"{name}: the input Hessian is {tuple(h.shape)}, the layer takes {k} inputs")
        s, s_inv = _whitening(h, damp)
        W = W @ s
    u, sv, vh = torch.linalg.svd(W, full_matrices=False)
    r = rank if rank is not None else rank_for_energy(sv, energy)
    a = u[:, :r] * sv[:r]
    b = vh[:r]
    if h is not None:
        b = b @ s_inv
    return a.float().contiguous(), b.float().contiguous()
