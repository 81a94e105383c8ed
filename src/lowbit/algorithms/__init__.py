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
magnitude       no            prune the smallest ``|W|`` (``sparsity=`` or ``nm="2:4"``), round the rest
wanda           yes           prune the smallest ``|W| * ||x||`` per row (Wanda), round the rest
sparsegpt       yes           SparseGPT: prune and quantize jointly with Hessian error feedback
==============  ============  =================================================================

The pruning methods (:mod:`.pruning`) return a :class:`~lowbit.sparse.SparseWeight`: the mask plus
the kept weights quantized by the scheme. With a grouped scheme every group of ``G`` columns keeps
the same multiple of 8 weights (:func:`~lowbit.sparse.group_keep`), so ``sparsity=`` is rounded to
the nearest such count (``w4g64`` at 0.6 removes 40 of 64: 0.625). :mod:`.lowrank` holds truncated
SVD, plain or weighted by the input Hessian, also used on a quantized layer's error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..qweight import QWeight
from ..scheme import Scheme
from ..sparse import SparseWeight, group_keep
from . import awq, gptq, hqq, moments, pruning, rtn, smoothquant

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
    """One method: ``quantize_weight(w, scheme, name=, stats=, **options) -> QWeight`` (a
    :class:`~lowbit.sparse.SparseWeight` for the methods that prune, ``prunes``) and, for
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
    prunes: bool = False  # returns a SparseWeight (lowbit.sparse) rather than a QWeight

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


def _reshaped(qw: QWeight | SparseWeight, w: torch.Tensor) -> QWeight | SparseWeight:
    qw.shape = tuple(w.shape)
    return qw


def _rtn(w, scheme, *, name="weight", stats=None, clip="minmax", **_):
    return rtn.quantize_weight(w, scheme, name=name, clip=clip)


def _hqq(w, scheme, *, name="weight", stats=None, importance=None, **_):
    return hqq.quantize_weight(w, scheme, name=name, importance=importance)


def _moment(stats, shrink: bool = True):
    """The second moment the searches score through: shrunk toward its diagonal by the
    calibration's token count (``moments.shrink_to_diagonal``), or the plain sample moment."""
    if not shrink:
        return stats.hessian
    kurtosis = stats.kurtosis  # (None: gathered without fourth moments; the Gaussian variance then)
    channels = stats.channels if kurtosis is not None else None
    return moments.shrink_to_diagonal(stats.hessian, stats.tokens, kurtosis, channels)


def _gptq(w, scheme, *, name="weight", stats, damp=0.01, act_order=True, block=128, clip="hessian", shrink=True, **_):
    qw = gptq.quantize_weight(_flat(w), _moment(stats, shrink), scheme, name=name, damp=damp, act_order=act_order, block=block,
                              clip=clip)  # fmt: skip
    return _reshaped(qw, w)


def _awq_quantize(w, scheme, *, name="weight", stats, clip=True, shrink=True, **_):
    from ..primitives import check_finite, choose_qparams

    check_finite(w, name)
    w2 = _flat(w)
    qp = awq.search_clip(w2, _moment(stats, shrink), scheme) if clip else choose_qparams(w2, scheme)
    return QWeight.from_float(w, scheme, qp, name=name, check=False)


def _awq_smooth(weights, stats, scheme, shrink=True, **_):
    s, _alpha = awq.search_scales(weights, _moment(stats, shrink), stats.mean_abs, scheme)
    return s


def _awq_gptq(w, scheme, *, name="weight", stats, damp=0.01, act_order=True, block=128, clip="hessian", shrink=True,
              **_):  # fmt: skip
    h = _moment(stats, shrink)
    qp = awq.search_clip(_flat(w), h, scheme) if clip == "awq" else None
    qw = gptq.quantize_weight(_flat(w), h, scheme, name=name, damp=damp,
                              act_order=act_order, block=block, qparams=qp,
                              clip="hessian" if clip == "awq" else clip)  # fmt: skip
    return _reshaped(qw, w)


def _nm(v) -> str | None:
    ok = isinstance(v, str) and len(v.split(":")) == 2 and all(p.strip().isdigit() for p in v.split(":"))
    ok = ok and 0 < int(v.split(":")[0]) < int(v.split(":")[1])
    return None if ok else "an N:M pattern such as '2:4' (keep N of every M consecutive weights, 0 < N < M)"


def _pattern(w2: torch.Tensor, scheme: Scheme, sparsity, nm, name: str) -> tuple[float | None, tuple | None, int | None]:
    """``(sparsity, (n, m), group)`` of one layer: exactly one of ``sparsity`` / ``nm``, checked
    against the layer (:class:`~lowbit.algorithms.pruning.PruningError`); a grouped scheme's
    sparsity rounded so each group keeps a multiple of 8 (``group``: the columns compared)."""
    if (sparsity is None) == (nm is None):
        raise pruning.PruningError(f"{name}: pruning needs one of sparsity= (a fraction) or nm= ('2:4'), "
                                   f"got sparsity={sparsity!r}, nm={nm!r}")  # fmt: skip
    k = w2.shape[1]
    group = None if scheme.per_tensor or scheme.group_size is None else scheme.group_size
    if nm is not None:
        n, m = (int(v) for v in nm.split(":"))
        pruning.check_nm(n, m, k, name)
        if group is not None and (group % m or (group * n // m) % 8):
            raise pruning.PruningError(f"{name}: {n}:{m} keeps {group * n // m} of each group of {group}; the kept "
                                       "weights of a group must be a multiple of 8 (use a larger group)")  # fmt: skip
        return None, (n, m), group
    sparsity = pruning.check_sparsity(sparsity)
    if group is None:
        return sparsity, None, None
    rounded = 1 - group_keep(sparsity, group, k) / group
    if sparsity > 0 and rounded == 0:
        raise pruning.PruningError(f"{name}: sparsity {sparsity} of groups of {group} rounds to none removed (a group "
                                   "keeps a multiple of 8 weights): use a higher sparsity or larger groups")  # fmt: skip
    return rounded, None, group


def _prune_mask(scores: torch.Tensor, sparsity, nm, group) -> torch.Tensor:
    if nm is not None:
        return pruning.nm_mask(scores, *nm)
    n, k = scores.shape
    if group is None:
        return pruning.unstructured_mask(scores, sparsity)
    full = k // group * group
    mask = torch.ones(n, k, dtype=torch.bool)
    if full:
        mask[:, :full] = pruning.unstructured_mask(scores[:, :full].reshape(-1, group), sparsity).reshape(n, full)
    if full < k:  # the last, shorter group: the same fraction, at most the full groups' count
        mask[:, full:] = pruning.unstructured_mask(scores[:, full:], sparsity)
    return mask


def _kept(w, scheme, mask, name):
    return SparseWeight.from_dense(w, mask, scheme, name=name)


def _magnitude(w, scheme, *, name="weight", stats=None, sparsity=None, nm=None, **_):
    w2 = _flat(w)
    s, pat, group = _pattern(w2, scheme, sparsity, nm, name)
    return _kept(w, scheme, _prune_mask(pruning.magnitude_scores(w2), s, pat, group), name)


def _wanda(w, scheme, *, name="weight", stats, sparsity=None, nm=None, **_):
    w2 = _flat(w)
    s, pat, group = _pattern(w2, scheme, sparsity, nm, name)
    scores = pruning.wanda_scores(w2, torch.diagonal(stats.hessian))
    return _kept(w, scheme, _prune_mask(scores, s, pat, group), name)


def _sparsegpt(w, scheme, *, name="weight", stats, sparsity=None, nm=None, damp=0.01, block=128, clip="hessian", **_):
    w2 = _flat(w)
    s, pat, group = _pattern(w2, scheme, sparsity, nm, name)
    if group is not None and block % group:
        block = group * max(1, block // group)
    res = pruning.sparsegpt(w2, stats.hessian, sparsity=s or 0.0, nm=pat, scheme=scheme, name=name, damp=damp,
                            block=block, mask_block=group, clip=clip)  # fmt: skip
    return _reshaped(SparseWeight.from_qweight(res.qweight, res.mask), w)


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


def _exact_zero(s: Scheme) -> str | None:
    return None if s.fmt.kind in ("affine", "codebook", "float") else f"{s} cannot store a pruned weight"


_PRUNE_OPTS = {"sparsity": _number(0.0, 0.99), "nm": _nm}
_GPTQ_OPTS = {"damp": _number(1e-6, 1.0), "act_order": _flag, "block": _int(8, 4096), "sequential": _flag,
              "clip": _choice(*gptq.CLIP_CHOICES), "shrink": _flag}

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("rtn", _rtn, False, {"clip": _choice(*rtn.CLIP_CHOICES)},
                  doc="round to nearest; data-free; clip='mse' searches per-group clipping"),
        Algorithm("hqq", _hqq, False, {"importance": _number(0.0, 4.0)}, serves=_grouped_integer,
                  doc="half-quadratic optimisation of scales and zeros; data-free"),
        Algorithm("gptq", _gptq, True, _GPTQ_OPTS, needs=("hessian", "fourth"), serves=_integer_or_codebook,
                  doc="GPTQ with damping, blocked lazy updates, groups, act-order with static groups, Hessian-weighted clip"),
        Algorithm("awq", _awq_quantize, True, {"clip": _flag, "shrink": _flag}, needs=("hessian", "fourth", "absmean"), smooth=_awq_smooth,
                  serves=_integer_or_codebook, doc="AWQ scale search (folded) + output-aware clipping"),
        Algorithm("awq+gptq", _awq_gptq, True, {**_GPTQ_OPTS, "clip": _choice(*gptq.CLIP_CHOICES, "awq")}, needs=("hessian", "fourth", "absmean"),
                  smooth=_awq_smooth, serves=_integer_or_codebook, doc="AWQ channel scaling, then GPTQ"),
        Algorithm("smoothquant", _rtn, True, {"alpha": _number(0.0, 1.0)}, needs=("absmax",),
                  smooth=_sq_smooth, serves=_activation_scheme, doc="SmoothQuant outlier migration for W8A8"),
        Algorithm("magnitude", _magnitude, False, _PRUNE_OPTS, serves=_exact_zero,
                  doc="magnitude pruning (sparsity= or nm='2:4'), the kept weights rounded to nearest", prunes=True),
        Algorithm("wanda", _wanda, True, _PRUNE_OPTS, needs=("hessian",), serves=_exact_zero,
                  doc="Wanda pruning (|W| times input norm, per row), the kept weights rounded to nearest", prunes=True),
        Algorithm("sparsegpt", _sparsegpt, True, {**_PRUNE_OPTS, **{k: v for k, v in _GPTQ_OPTS.items() if k in ("damp", "block", "clip", "sequential")}},
                  needs=("hessian",), serves=_integer_or_codebook,
                  doc="SparseGPT: pruning and quantization in one Hessian-aware pass", prunes=True),
    )  # fmt: skip
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(ALGORITHMS)}") from None
