"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023. A few activation channels carry values far
larger than the rest, which ruins per-token int8 activations; weights are easy to quantize.
Dividing activation channel ``j`` by ``s_j`` and multiplying weight column ``j`` by ``s_j``
leaves ``W x`` unchanged and, with

    ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``,

balances the two ranges (``alpha = 0.5`` in the paper for most models). Pure math: the driver
folds ``1/s`` into the previous operation.
Shapes: ``act_absmax (K,)``; weights ``(N_i, K)`` of the linears sharing that input.
"""

from __future__ import annotations

import torch

__all__ = ["smooth_scales"]


@torch.no_grad()
def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel smoothing factors ``s (K,)`` (``x / s`` and ``W diag(s)``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w_absmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)  # (K,)
    a = act_absmax.float().clamp_min(1e-5)
    s = (a.pow(alpha) / w_absmax.clamp_min(1e-5).pow(1.0 - alpha)).clamp_min(1e-5)
    # A channel the calibration never exercised (or an all-zero weight column) says nothing
    # about its range: left unscaled, rather than blown up by 1/s on real inputs.
    return torch.where((act_absmax == 0) | (w_absmax == 0), torch.ones_like(s), s)
