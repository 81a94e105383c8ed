"""Estimating the input's second moment ``E[x x^T]`` (GPTQ's Hessian, AWQ's output-error metric)
from a finite calibration set.

Pure math: a ``(K, K)`` sample moment and its token count in, a ``(K, K)`` estimate out.
"""

from __future__ import annotations

import operator

import torch

__all__ = ["shrink_to_diagonal"]


@torch.no_grad()
def shrink_to_diagonal(hessian: torch.Tensor, tokens: int) -> torch.Tensor:
    """The second moment estimated from ``tokens`` calibration tokens, shrunk toward its diagonal.

    ``hessian (K, K)``: a positive multiple of the sample moment ``S = E[x x^T]`` (any float
    dtype). Returns ``(1 - d) S + d diag(S)`` (float32, ``(K, K)``) with the intensity ``d`` in
    ``[0, 1]`` of Schaefer & Strimmer, "A shrinkage approach to large-scale covariance matrix
    estimation and implications for functional genomics" (Stat. Appl. Genet. Mol. Biol. 4(1),
    Article 32, 2005), target "D" (diagonal, unequal variances), which is computed on the
    standardized scale so that a few loud channels (LLMs' massive activations) do not decide it:
    ``d = sum_{i!=j} Var(r_ij) / sum_{i!=j} r_ij^2`` with ``r_ij = s_ij / sqrt(s_ii s_jj)`` and each
    entry's sampling variance from its Gaussian value, ``Var(r_ij) = (1 + r_ij^2) / n``
    (Isserlis). When the off-diagonal entries are mostly sampling noise (few tokens for the
    channels' real correlation), ``d`` goes to 1 and a search scored through the result weighs
    each channel by its energy alone instead of fitting the directions the calibration happened to
    cover; with thousands of tokens ``d`` is about a hundredth or less (SmolLM2-135M, 16k tokens)
    and the moment is kept. Tokens of one sequence are correlated, so ``d`` errs small.
    ``tokens == 0``: the diagonal. Channels with no energy (``s_ii <= 0``) take no part in ``d``.

    Raises ``ValueError`` for a matrix that is not square or a token count that is not a
    non-negative integer.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the second moment must be a square (K, K) matrix, got shape {tuple(hessian.shape)}")
    try:
        n = operator.index(tokens)
    except TypeError:
        raise ValueError(f"tokens must be an integer, got {tokens!r}") from None
    if n < 0:
        raise ValueError(f"tokens must be >= 0, got {n}")
    s = hessian.float()
    diag = s.diagonal()
    if n == 0:
        return torch.diag(diag)
    live = diag > 0
    inv = torch.where(live, diag.clamp_min(torch.finfo(torch.float32).tiny).rsqrt(), 0.0)
    r2 = (s * inv.unsqueeze(1) * inv.unsqueeze(0)).pow(2)  # r_ij^2 (0 for dead channels)
    off2 = float(r2.sum() - r2.diagonal().sum())  # sum_{i!=j} r_ij^2
    pairs = float(live.sum()) * (float(live.sum()) - 1.0)
    if not off2 > 0.0:  # nothing off the diagonal (or not a finite number: the caller checks)
        return s
    d = min(1.0, max(0.0, (pairs + off2) / (n * off2)))
    return (1.0 - d) * s + d * torch.diag(diag)
