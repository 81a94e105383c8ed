"""Pruning masks and SparseGPT: which weights of a layer to set to zero, and how to move the
others to make up for them. Tensors only (DESIGN principle 2); the driver gathers the input
statistics and applies the results.

Conventions: a weight ``w`` is ``(N, K)`` (output rows, input columns); a mask is bool ``(N, K)``,
``True`` where the weight is kept. ``sparsity`` is the fraction of weights removed, in ``[0, 1)``.
N:M ("2:4") keeps ``n`` of every ``m`` consecutive weights along the input dimension of each row,
the pattern sparse tensor cores run (Mishra et al., "Accelerating Sparse Deep Neural Networks",
2021).

Structured pruning removes whole channels: output rows of the layers that produce a channel and
the input columns of the layer that reads it (:func:`channel_scores`); the tensors shrink, no
mask is needed. A channel's score is the output energy its removal takes from the reading layer,
``sum over its columns j of ||W[:, j]||^2 * E[x_j^2]`` (the Wanda score of the whole column group,
squared and summed, assuming independent inputs; Sun et al. 2024, and the structured variants
of An et al., "Fluctuation-based Adaptive Structured Pruning for LLMs" (FLAP), AAAI 2024, which
also weigh columns by input statistics). Without calibration ``E[x_j^2]`` is replaced by the
squared norm of the producing rows, ``||W_prod[c, :]||^2``: a channel's input and output weights
both small.

Scores (higher = kept):

* **magnitude** ``|W_ij|`` (Han et al., "Learning both Weights and Connections", 2015).
* **Wanda** ``|W_ij| * ||X_j||_2``: the weight times the norm of its input over the calibration
  tokens, compared within each output row (Sun, Liu, Bair, Kolter, "A Simple and Effective
  Pruning Approach for Large Language Models", ICLR 2024, eq. 1 and its per-output comparison
  group).
* **SparseGPT** (Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", ICML 2023, Algorithm 1): columns are visited left to right with the upper Cholesky
  factor ``U`` of ``H^-1`` (``H = X X^T``); the mask of each block of columns is chosen when the
  block is reached, keeping the weights with the largest ``w^2 / U_jj^2`` (the OBS saliency) in
  each row of the block (the paper compares over all rows of the block; per row, every row keeps
  the same count, so the kept codes pack as a dense matrix, and Wanda found per-output comparison
  groups the better choice for LLMs); each
  removed weight's error ``w / U_jj`` is spread over the columns not yet visited, as GPTQ does with
  rounding errors. With a ``scheme`` the kept weights are quantized in the same pass (the paper's
  joint sparsification and quantization, section 3.5), the group parameters chosen from the
  updated kept weights when a group is reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..primitives import QParams, check_finite, dequantize_values, quantize_values
from ..qweight import QWeight
from ..scheme import Scheme
from .gptq import CLIP_CHOICES, HessianError, _inverse_cholesky, group_buffers, group_qparams, open_group

__all__ = ["PruningError", "check_sparsity", "check_nm", "magnitude_scores", "wanda_scores", "unstructured_mask",
           "nm_mask", "SparseGPTResult", "sparsegpt", "channel_scores", "channels_kept"]  # fmt: skip


class PruningError(ValueError):
    """A sparsity, N:M pattern or layer that pruning cannot take."""


def check_sparsity(sparsity) -> float:
    """``sparsity`` as a float in ``[0, 1)``; :class:`PruningError` otherwise."""
    ok = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0 <= sparsity < 1
    if not ok:
        raise PruningError(f"sparsity must be a fraction in [0, 1) (the share of weights removed), got {sparsity!r}")
    return float(sparsity)


def check_nm(n: int, m: int, k: int | None = None, name: str = "weight") -> None:
    """:class:`PruningError` unless ``0 < n < m`` are integers and ``m`` divides the input width ``k``."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 0 < n < m:
        raise PruningError(f"N:M sparsity keeps n of every m weights with 0 < n < m, got {n}:{m}")
    if k is not None and k % m:
        raise PruningError(f"{name}: {n}:{m} sparsity needs an input width divisible by {m}, got {k}")


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|w|`` as float32 ``(N, K)``."""
    return w.detach().float().abs()


def wanda_scores(w: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's ``|W_ij| * ||X_j||``: ``w (N, K)``, ``input_sq_norm (K,)`` the sum over calibration
    tokens of each input feature's square (the Hessian's diagonal ``diag(X X^T)``). float32 ``(N, K)``."""
    if input_sq_norm.shape != (w.shape[1],):
        raise PruningError(f"input norms of shape {tuple(input_sq_norm.shape)} do not match {w.shape[1]} inputs")
    return w.detach().float().abs() * input_sq_norm.detach().float().clamp_min(0).sqrt()


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Keep the highest scores: ``floor(sparsity * K)`` removed in each row (``per_row``, Wanda's
    comparison group; every row equally sparse) or ``floor(sparsity * N * K)`` over the whole
    tensor (up to 1e-9 below a whole count: ``1 - c / G`` removes exactly ``G - c``). Ties are
    broken by position, so the count removed is exact. bool ``(N, K)``."""
    sparsity = check_sparsity(sparsity)
    flat = scores if per_row else scores.reshape(1, -1)
    drop = math.floor(sparsity * flat.shape[1] + 1e-9)  # 1 - c/G removes exactly G - c
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        idx = torch.argsort(flat, dim=1, stable=True)[:, :drop]
        keep.scatter_(1, idx, False)
    return keep.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every ``m`` consecutive columns of each row. bool ``(N, K)``;
    :class:`PruningError` unless ``m`` divides ``K``."""
    check_nm(n, m, scores.shape[1])
    g = scores.reshape(scores.shape[0], -1, m)
    idx = torch.topk(g, n, dim=2, sorted=False).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(scores.shape)


@dataclass
class SparseGPTResult:
    """``weight`` float32 ``(N, K)``: the pruned weight (zeros where ``mask`` is False), dequantized
    when a scheme was given; ``mask`` bool ``(N, K)``; ``qweight`` the quantized kept weights (codes
    of removed weights are the codes of 0's nearest level; the mask is what makes them zero)."""

    weight: torch.Tensor
    mask: torch.Tensor
    qweight: QWeight | None = None


def sparsegpt(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    scheme: Scheme | None = None,
    name: str = "weight",
    damp: float = 0.01,
    block: int = 128,
    mask_block: int | None = None,
    clip: str = "hessian",
) -> SparseGPTResult:
    """SparseGPT-prune ``w`` ``(N, K)`` given the input Hessian ``h`` ``(K, K)`` (any positive scale).

    ``sparsity`` removes ``floor(sparsity * mask_block)`` weights of each row in each run of
    ``mask_block`` columns (default ``block``; it must divide ``block``; the last run: of its
    width), chosen when the run is reached; ``nm = (n, m)`` instead keeps ``n`` of every ``m`` consecutive weights per row.
    ``scheme`` (an integer or codebook format) quantizes the kept weights in the same pass, GPTQ's
    group parameters chosen by ``clip`` (see :mod:`lowbit.algorithms.gptq`). Raises
    :class:`PruningError` for a bad sparsity or N:M pattern, :class:`HessianError` for a singular
    or non-finite Hessian, ``ValueError`` for a scheme it cannot round.
    """
    check_finite(w, name)
    n_out, k = w.shape
    if nm is not None:
        check_nm(*nm, k, name)
    else:
        sparsity = check_sparsity(sparsity)
    if clip not in CLIP_CHOICES:
        raise ValueError(f"clip={clip!r}: choose from {CLIP_CHOICES}")
    mask_block = block if mask_block is None else mask_block
    if not isinstance(mask_block, int) or mask_block < 1 or block % mask_block:
        raise PruningError(f"mask_block must be a positive divisor of block={block}, got {mask_block!r}")
    if scheme is not None and scheme.fmt.kind not in ("affine", "codebook"):
        raise ValueError(f"SparseGPT quantizes integer or codebook formats, not {scheme}")
    if h.shape != (k, k) or not bool(torch.isfinite(h).all()):
        raise HessianError(f"{name}: the input Hessian must be a finite ({k}, {k}) matrix")
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    hdiag = torch.diag(H).clone()
    dead = hdiag == 0
    H[dead, dead] = 1.0  # an input calibration never fed decouples from the rest (as in GPTQ)
    U = _inverse_cholesky(H, damp, name)

    mask = torch.ones(n_out, k, dtype=torch.bool)
    gs = k if scheme is None or scheme.group_size is None or scheme.per_tensor else scheme.group_size
    codes = torch.zeros(n_out, k, dtype=torch.uint8) if scheme is not None else None
    scale = zero = None
    if scheme is not None:
        scale, zero = group_buffers(n_out, k, gs, scheme)
        if scheme.per_tensor:
            qp = group_qparams(W, hdiag, scheme, clip)
            scale, zero = qp.scale.clone(), None if qp.zero is None else qp.zero.clone()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if nm is None and sparsity > 0 and j % mask_block == 0:  # from the weights as updated so far
                width = min(mask_block, i2 - j)
                sal = w1[:, i : i + width].pow(2) / torch.diag(u1)[i : i + width].pow(2).unsqueeze(0)
                mask[:, j : j + width] = unstructured_mask(sal, sparsity, per_row=True)
            if nm is not None and j % nm[1] == 0:
                sal = w1[:, i : i + nm[1]].pow(2) / torch.diag(u1)[i : i + nm[1]].pow(2).unsqueeze(0)
                mask[:, j : j + nm[1]] = nm_mask(sal, *nm)
            x = w1[:, i]
            keep = mask[:, j]
            if scheme is None:
                new = torch.where(keep, x, torch.zeros_like(x))
            else:
                g = j // gs
                if not scheme.per_tensor and j % gs == 0:  # masks chosen so far; later ones count as kept
                    open_group(W, w1, i1, i2, j, gs, hdiag, scheme, clip, scale, zero, keep=mask)
                s = scale[:, g] if not scheme.per_tensor else scale[0, 0].expand(n_out)
                z = None if zero is None else (zero[:, g] if not scheme.per_tensor else zero[0, 0].expand(n_out))
                q = quantize_values(torch.where(keep, x, torch.zeros_like(x)), s, z, scheme)
                codes[:, j] = q
                new = torch.where(keep, dequantize_values(q, s, z, scheme), torch.zeros_like(x))
            e = (x - new) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = new
            err1[:, i] = e
        W[:, i1:i2] = w1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    W = W * mask
    qw = None if scheme is None else QWeight.from_codes(w.shape, scheme, codes, QParams(scale, zero))
    return SparseGPTResult(W, mask, qw)


def channel_scores(w_reader: torch.Tensor, block: int, x_sq: torch.Tensor | None = None,
                   w_producers: list[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Importance of each of the ``C`` channels a reading layer ``w_reader (N, C * block)`` takes
    as ``block`` consecutive input columns each (``block > 1`` after a flatten of ``(C, H, W)``).
    ``x_sq (C * block,)``: the mean square of each input column over the calibration data; else
    the producers' rows ``(C, ...)`` stand in (module docstring). Returns ``(C,)`` float32."""
    w = w_reader.detach().float().reshape(w_reader.shape[0], -1)
    if w.shape[1] % block:
        raise PruningError(f"{w.shape[1]} input columns are not whole channels of {block}")
    col = w.pow(2).sum(0)  # (C * block,)
    if x_sq is not None:
        col = col * x_sq.float()
        return col.reshape(-1, block).sum(1)
    score = col.reshape(-1, block).sum(1)
    if w_producers:
        prod = sum(p.detach().float().reshape(p.shape[0], -1).pow(2).sum(1) for p in w_producers)
        score = score * prod
    return score


def channels_kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices (ascending, int64) of the ``keep`` highest-scoring channels."""
    if not 0 < keep <= scores.numel():
        raise PruningError(f"cannot keep {keep} of {scores.numel()} channels")
    return torch.topk(scores, keep).indices.sort().values
