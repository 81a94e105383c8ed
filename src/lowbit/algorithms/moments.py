"""Estimating the input's second moment ``E[x x^T]`` (GPTQ's Hessian, AWQ's output-error metric)
from a finite calibration set.

Pure math: a ``(K, K)`` sample moment and its token count in, a ``(K, K)`` estimate out.
"""

from __future__ import annotations

import torch

__all__ = ["shrink_to_diagonal"]


@torch.no_grad()
def shrink_to_diagonal(hessian: torch.Tensor, tokens: int) -> torch.Tensor:
    """The second moment estimated from ``tokens`` calibration tokens, shrunk toward its diagonal.

    ``hessian (K, K)``: a positive multiple of the sample moment ``S = E[x x^T]``. Returns
    ``(1 - d) S + d diag(S)`` (same shape, float32) with the intensity ``d`` in ``[0, 1]`` of
    Schaefer & Strimmer, "A shrinkage approach to large-scale covariance matrix estimation"
    (Stat. Appl. Genet. Mol. Biol. 4(1), 2005; target "D", diagonal with unequal variances):
    ``d = sum_{i!=j} Var(s_ij) / sum_{i!=j} s_ij^2``, the sampling variance of each entry taken
    from its Gaussian value ``(s_ii s_jj + s_ij^2) / n`` (Isserlis). With fewer tokens than
    channels ``S`` is singular and its off-diagonal entries mostly noise: ``d`` goes to 1 and a
    search scored through the result weighs each channel by its energy alone, instead of fitting
    the few directions the calibration happened to cover; with thousands of tokens ``d`` is a few
    thousandths and the moment is kept. (Tokens of one sequence are correlated, so ``d`` errs
    small.) ``tokens < 1``: the diagonal.
    """
    s = hessian.float()
    diag = s.diagonal()
    if tokens < 1:
        return torch.diag(diag)
    off2 = float(s.pow(2).sum() - diag.pow(2).sum())  # sum_{i!=j} s_ij^2
    if off2 <= 0.0:
        return s
    var = float(diag.sum() ** 2 - diag.pow(2).sum()) + off2  # sum_{i!=j} (s_ii s_jj + s_ij^2)
    d = min(1.0, var / (tokens * off2))
    return (1.0 - d) * s + d * torch.diag(diag)
