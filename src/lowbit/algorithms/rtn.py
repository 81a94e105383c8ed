"""Round-to-nearest (RTN): weight-only, data-free, seconds for a whole model.

Scales come from each group's min/max (see :mod:`lowbit.primitives`), or, with
``clip="mse"``, from a per-group search over shrunken ranges that minimises the group's squared
rounding error (trading clipped outliers for finer steps; the same idea as the clipping searches
of AWQ and of llama.cpp's quantizers).
"""

from __future__ import annotations

import torch

from ..primitives import check_finite, choose_qparams, mse_clip_search
from ..qweight import QWeight
from ..scheme import Scheme

CLIP_CHOICES = ("minmax", "mse")


def quantize_weight(w: torch.Tensor, scheme: Scheme, *, name: str = "weight", clip: str = "minmax") -> QWeight:
    """``w`` ``(N, ...)`` float -> :class:`QWeight` by round-to-nearest."""
    if scheme.is_cast:
        return QWeight.from_float(w, scheme, name=name)
    check_finite(w, name)  # before the clip search, which would otherwise see NaNs
    w2 = w.detach().reshape(w.shape[0], -1).float()
    qp = mse_clip_search(w2, scheme) if clip == "mse" else choose_qparams(w2, scheme)
    return QWeight.from_float(w, scheme, qp, name=name, check=False)
