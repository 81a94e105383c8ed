"""Estimating the input's second moment ``E[x x^T]`` (GPTQ's Hessian, AWQ's output-error metric)
from a finite calibration set.

Pure math: a ``(K, K)`` sample moment and its token count in, a ``(K, K)`` estimate out.
"""

from __future__ import annotations

import operator

import torch

__all__ = ["FOURTH_MOMENT_CHANNELS", "cokurtosis", "fourth_moment_channels", "shrink_to_diagonal"]

FOURTH_MOMENT_CHANNELS = 256  # channels whose pairwise fourth moments estimate the entries' variance


def fourth_moment_channels(k: int) -> torch.Tensor:
    """The input channels whose pairwise fourth moments ``E[x_i^2 x_j^2]`` calibration gathers:
    ``min(k, 256)`` evenly spaced indices (int64, ``(m,)``); all of them for ``k <= 256``. Their
    ``m (m - 1)`` pairs estimate the mean sampling variance of the moment's off-diagonal entries
    (:func:`shrink_to_diagonal`) at ``(m, m)`` memory, whatever ``k``."""
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"a layer needs at least one input channel, got {k}")
    m = min(k, FOURTH_MOMENT_CHANNELS)
    return torch.arange(m, dtype=torch.int64) * k // m


@torch.no_grad()
def cokurtosis(fourth: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``E[z_i^2 z_j^2]`` of the standardized inputs ``z_i = x_i / sqrt(E[x_i^2])``, ``(m, m)``
    float32, from ``fourth (m, m) = E[x_i^2 x_j^2]`` and ``second (m,) = E[x_i^2]`` over the same
    channels and tokens (means, not sums: scaling ``x`` per channel leaves the result unchanged). 1 for
    independent channels, ``1 + 2 r_ij^2`` for Gaussian ones; heavier tails and tokens of unequal
    loudness make it larger. Channels with no energy give 0."""
    second = second.double()
    inv = torch.where(second > 0, 1.0 / second.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return (fourth.double() * inv.unsqueeze(1) * inv.unsqueeze(0)).float()


@torch.no_grad()
def shrink_to_diagonal(hessian: torch.Tensor, tokens: int, kurtosis: torch.Tensor | None = None,
                       channels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The second moment estimated from ``tokens`` calibration tokens, shrunk toward its diagonal.

    ``hessian (K, K)``: a positive multiple of the sample moment ``S = E[x x^T]`` (any float
    dtype). Returns ``(1 - d) S + d diag(S)`` (float32, ``(K, K)``) with the intensity ``d`` in
    ``[0, 1]`` of Schaefer & Strimmer, "A shrinkage approach to large-scale covariance matrix
    estimation and implications for functional genomics" (Stat. Appl. Genet. Mol. Biol. 4(1),
    Article 32, 2005), target "D" (diagonal, unequal variances), computed on the standardized
    scale so that a few loud channels (LLMs' massive activations) do not decide it:
    ``d = sum_{i!=j} Var(r_ij) / sum_{i!=j} r_ij^2`` with ``r_ij = s_ij / sqrt(s_ii s_jj)``.

    Each entry's sampling variance is estimated from the data, as the paper does:
    ``Var(r_ij) = n^2 / (n - 1)^3 (E[z_i^2 z_j^2] - r_ij^2)``, the paper's
    ``n / (n - 1)^3 sum_k (w_kij - mean w_ij)^2`` for the products ``w_kij = z_ki z_kj`` of
    standardized inputs (its small-sample factor matters: at 2 tokens it is 8x the plain
    ``1 / n`` variance of a mean), with
    ``kurtosis (m, m) = E[z_i^2 z_j^2]`` (:func:`cokurtosis`) over the channels ``channels (m,)``
    (int64 indices into ``K``; :func:`fourth_moment_channels`): the mean over their pairs, times
    the number of pairs, stands for the sum over all. The Gaussian value
    ``E[z_i^2 z_j^2] = 1 + 2 r_ij^2`` (Isserlis) is the floor, and all there is without
    ``kurtosis``: activations with heavy tails or tokens of unequal loudness (LLMs') make the real
    variance larger, while ``n`` tokens cannot show a kurtosis above about ``n``, so with few
    tokens the data's estimate is itself biased low (lowbit's departure from the paper).
    Two more departures: the moment is not centred (GPTQ's and AWQ's objectives are
    uncentred), and tokens of one sequence are correlated, which neither form counts (``d`` errs
    small). When the off-diagonal entries are mostly sampling noise (few tokens for the channels'
    real correlation), ``d`` goes to 1 and a search scored through the result weighs each channel
    by its energy alone instead of fitting the directions the calibration happened to cover; with
    thousands of tokens ``d`` is a few hundredths or less and the moment is kept (BENCHMARKS.md).
    ``tokens == 0``: the diagonal. Channels with no energy (``s_ii <= 0``) take no part in ``d``.

    Raises ``ValueError`` for a matrix that is not square, a token count that is not a
    non-negative integer (``bool`` included), or ``kurtosis``/``channels`` of mismatched shapes.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the second moment must be a square (K, K) matrix, got shape {tuple(hessian.shape)}")
    if isinstance(tokens, bool):
        raise ValueError(f"tokens must be an integer, got {tokens!r}")
    try:
        n = operator.index(tokens)
    except TypeError:
        raise ValueError(f"tokens must be an integer, got {tokens!r}") from None
    if n < 0:
        raise ValueError(f"tokens must be >= 0, got {n}")
    if (kurtosis is None) != (channels is None):
        raise ValueError("kurtosis and channels come together (both or neither)")
    k = hessian.shape[0]
    if kurtosis is not None:
        m = channels.numel()
        if (channels.dim() != 1 or kurtosis.shape != (m, m) or m == 0 or channels.is_floating_point()
                or int(channels.min()) < 0 or int(channels.max()) >= k):  # fmt: skip
            raise ValueError(f"kurtosis must be (m, m) over m channel indices in [0, {k}), got kurtosis "
                             f"{tuple(kurtosis.shape)} and channels {tuple(channels.shape)}")  # fmt: skip
    s = hessian.float()
    diag = s.diagonal()
    if n == 0:
        return torch.diag(diag)
    live = diag > 0
    inv = torch.where(live, diag.clamp_min(torch.finfo(torch.float32).tiny).rsqrt(), 0.0)
    r2 = (s * inv.unsqueeze(1) * inv.unsqueeze(0)).pow_(2)  # r_ij^2 (0 for dead channels), float32: K x K
    r2.diagonal().zero_()
    off2 = float(r2.sum(dtype=torch.float64))  # sum_{i!=j} r_ij^2
    nlive = float(live.sum())
    pairs = nlive * (nlive - 1.0)
    if not off2 > 0.0:  # nothing off the diagonal (or not a finite number: the caller checks)
        return s
    var = pairs + off2  # sum_{i!=j} (1 + r_ij^2): n Var(r_ij) at the Gaussian value
    if kurtosis is not None and n >= 2:  # (one token: the Gaussian d is already 1)
        on = live[channels]
        sampled = on.unsqueeze(1) & on.unsqueeze(0)
        sampled.fill_diagonal_(False)
        if bool(sampled.any()):
            sub = r2[channels][:, channels]
            v = (kurtosis.double() - sub)[sampled].clamp_min(0.0)  # products' (biased) sample variance
            # the paper's n/(n-1)^3 sum_k (w_k - mean w)^2, times n; never below the Gaussian value
            var = max(var, float(v.mean()) * pairs * n**3 / (n - 1) ** 3)
    d = min(1.0, max(0.0, var / (n * off2)))
    return (1.0 - d) * s + d * torch.diag(diag)
