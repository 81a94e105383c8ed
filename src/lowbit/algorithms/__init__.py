"""Quantization algorithms: pure math on tensors, one file each (DESIGN principle 2).

Each algorithm turns a float weight (plus, for calibrated methods, statistics of its inputs)
into a :class:`~lowbit.qweight.QWeight`. Hooks, data and module swapping live in the driver
(:mod:`lowbit.driver`, :mod:`lowbit.calibrate`); this table says what each method needs.

==============  ============  =================================================================
method          calibration   what it does
==============  ============  =================================================================
rtn             no            round to nearest (min/max or ``clip="mse"`` scales)
hqq             no            half-quadratic optimisation of scales and zero points
gptq            yes           Hessian-aware column-by-column rounding with error feedback;
                              group ranges by a Hessian-weighted clip search
awq             yes           activation-aware channel scaling + output-aware clipping, then RTN
awq+gptq        yes           AWQ's channel scaling, then GPTQ
smoothquant     yes           outlier migration into the weights for W8A8 (``w8a8`` schemes)
==============  ============  =================================================================

Beside them, for compression beyond quantization (issue 16): :mod:`.pruning` (magnitude, Wanda
and N:M masks, SparseGPT with optional joint quantization) and :mod:`.lowrank` (truncated SVD,
plain or weighted by the input Hessian, also used on a quantized layer's error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..qweight import QWeight
from ..scheme import Scheme
from . import awq, gptq, hqq, rtn, smoothquant

__all__ = ["Algorithm", "ALGORITHMS", "get_algorithm"]


def _choice(*values) -> Callable[[Any], str | None]:
    return lambda v: None if v in values else f"choose from {values}"


def _number(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"a number in [{lo}, {hi}]"

    return check


def _flag(v) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def _int(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi else f"an integer in [{lo}, {hi}]"


@dataclass(frozen=True)
class Algorithm:
    """One method: ``quantize_weight(w, scheme, name=, stats=, **options) -> QWeight`` and, for
    methods that move activation scales into weights, ``smooth(weights, stats, scheme, **options)
    -> s (K,)``. ``needs`` names the input statistics the calibration driver must gather."""

    name: str
    quantize_weight: Callable
    uses_calibration: bool
    options: dict[str, Callable[[Any], str | None]] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    smooth: Callable | None = None
    serves: Callable[[Scheme], str | None] = lambda s: None
    doc: str = ""

    def check_options(self, options: dict) -> dict:
        """Validate keyword options for this method; unknown or bad ones raise ``ValueError``."""
        for key, value in options.items():
            if key not in self.options:
                allowed = ", ".join(self.options) or "none"
                raise ValueError(f"method {self.name!r} takes no option {key!r} (options: {allowed})")
            problem = self.options[key](value)
            if problem:
                raise ValueError(f"{key}={value!r} for {self.name!r}: {problem}")
        return dict(options)


# ---- adapters: statistics in, math functions called -------------------------------------------
def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).float()


def _reshaped(qw: QWeight, w: torch.Tensor) -> QWeight:
    qw.shape = tuple(w.shape)
    return qw


def _rtn(w, scheme, *, name="weight", stats=None, clip="minmax", **_):
    return rtn.quantize_weight(w, scheme, name=name, clip=clip)


def _hqq(w, scheme, *, name="weight", stats=None, importance=None, **_):
    return hqq.quantize_weight(w, scheme, name=name, importance=importance)


def _gptq(w, scheme, *, name="weight", stats, damp=0.01, act_order=True, block=128, clip="hessian", **_):
    qw = gptq.quantize_weight(_flat(w), stats.hessian, scheme, name=name, damp=damp, act_order=act_order, block=block,
                              clip=clip)  # fmt: skip
    return _reshaped(qw, w)


# AWQ's searches use a sample of calibration rows (the paper's clip search uses 512 tokens).
CLIP_ROWS = 512
SCALE_ROWS = 1024


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """An evenly strided subset of at most ``n`` rows (the sample is already random)."""
    step = max(1, x.shape[0] // n)
    return x[::step][:n]


def _awq_quantize(w, scheme, *, name="weight", stats, clip=True, **_):
    from ..primitives import check_finite, choose_qparams

    check_finite(w, name)
    w2 = _flat(w)
    qp = awq.search_clip(w2, _rows(stats.x, CLIP_ROWS), scheme) if clip else choose_qparams(w2, scheme)
    return QWeight.from_float(w, scheme, qp, name=name, check=False)


def _awq_smooth(weights, stats, scheme, **_):
    s, _alpha = awq.search_scales(weights, _rows(stats.x, SCALE_ROWS), scheme)
    return s


def _awq_gptq(w, scheme, *, name="weight", stats, damp=0.01, act_order=True, block=128, clip="hessian", **_):
    qp = awq.search_clip(_flat(w), _rows(stats.x, CLIP_ROWS), scheme) if clip == "awq" else None
    qw = gptq.quantize_weight(_flat(w), stats.hessian, scheme, name=name, damp=damp,
                              act_order=act_order, block=block, qparams=qp,
                              clip="hessian" if clip == "awq" else clip)  # fmt: skip
    return _reshaped(qw, w)


def _sq_smooth(weights, stats, scheme, *, alpha=0.5, **_):
    return smoothquant.smooth_scales(stats.absmax, weights, alpha)


def _integer_or_codebook(s: Scheme) -> str | None:
    return None if s.fmt.kind in ("affine", "codebook") else f"{s.fmt.name} is not an integer or codebook format"


def _grouped_integer(s: Scheme) -> str | None:
    if s.fmt.kind != "affine" or s.per_tensor:
        return f"{s} (HQQ optimises per-channel or per-group integer formats)"
    return None


def _activation_scheme(s: Scheme) -> str | None:
    return None if s.act_bits else f"{s} has float activations; SmoothQuant is for W8A8 schemes (e.g. w8a8)"


_GPTQ_OPTS = {"damp": _number(1e-6, 1.0), "act_order": _flag, "block": _int(8, 4096), "sequential": _flag,
              "clip": _choice(*gptq.CLIP_CHOICES)}

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("rtn", _rtn, False, {"clip": _choice(*rtn.CLIP_CHOICES)},
                  doc="round to nearest; data-free; clip='mse' searches per-group clipping"),
        Algorithm("hqq", _hqq, False, {"importance": _number(0.0, 4.0)}, serves=_grouped_integer,
                  doc="half-quadratic optimisation of scales and zeros; data-free"),
        Algorithm("gptq", _gptq, True, _GPTQ_OPTS, needs=("hessian",), serves=_integer_or_codebook,
                  doc="GPTQ with damping, blocked lazy updates, groups, act-order with static groups, Hessian-weighted clip"),
        Algorithm("awq", _awq_quantize, True, {"clip": _flag}, needs=("sample",), smooth=_awq_smooth,
                  serves=_integer_or_codebook, doc="AWQ scale search (folded) + output-aware clipping"),
        Algorithm("awq+gptq", _awq_gptq, True, {**_GPTQ_OPTS, "clip": _choice(*gptq.CLIP_CHOICES, "awq")}, needs=("sample", "hessian"),
                  smooth=_awq_smooth, serves=_integer_or_codebook, doc="AWQ channel scaling, then GPTQ"),
        Algorithm("smoothquant", _rtn, True, {"alpha": _number(0.0, 1.0)}, needs=("absmax",),
                  smooth=_sq_smooth, serves=_activation_scheme, doc="SmoothQuant outlier migration for W8A8"),
    )  # fmt: skip
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(ALGORITHMS)}") from None
