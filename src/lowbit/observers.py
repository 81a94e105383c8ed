"""Activation range observers: what calibration data says a static int8 activation scale should be.

An observer sees the tensors flowing into one layer (``update(x)`` for each calibration batch,
any shape, every element counts) and then proposes a clipping range ``(lo, hi)``;
:meth:`Observer.qparams` turns it into the scale ``s`` and integer zero point ``z`` of the static
int8 activations (``q = clamp(round(x / s) + z, -127, 127)``, ``x ~ s (q - z)``: 255 levels):

* nothing negative seen (the input of a layer after ReLU/ReLU6): unsigned, ``[0, hi]`` over all
  255 levels, ``s = hi / 254``, ``z = -127`` (one bit more resolution than symmetric codes);
* ``minmax`` and ``ema`` on signed data: affine, ``s = (hi - lo) / 254`` and ``z`` the integer
  that puts ``0.0`` exactly on a level;
* the histogram observers on signed data: symmetric, ``s = max(|lo|, |hi|) / 127``, ``z = 0``.

The histogram observers choose their threshold for the levels they will get (127 for symmetric,
254 for unsigned data).

Kinds (the table :data:`OBSERVERS`; ``make_observer(name)`` builds one):

``minmax``      the running minimum and maximum: no clipping, every outlier kept.
``ema``         an exponential moving average of each batch's min and max (momentum 0.1, the
                first batch taken as is), as QAT frameworks track ranges during training.
``percentile``  the ``p``-th percentile of ``|x|`` (default 99.99): the rarest outliers clipped.
``mse``         the clipping threshold ``t`` minimising the expected squared error of symmetric
                int8 quantization, clipping error ``(|x| - t)^2`` plus rounding noise
                ``(t / 127)^2 / 12`` per value inside the range.
``entropy``     the threshold minimising the KL divergence between the distribution of
                ``|x|`` and its 128-level quantized version (the calibration of Migacz, "8-bit
                Inference with TensorRT", GTC 2017): reference ``P`` = the histogram up to the
                threshold with everything beyond folded into its last bin; candidate ``Q`` = ``P``
                merged into 128 equal chunks (255 for unsigned data), each chunk's mass spread evenly over its non-empty
                bins; empty bins of either get a small epsilon so the divergence stays finite.

Histogram observers keep 2048 bins over ``[-a, a]``; when a batch exceeds ``a`` the range doubles
(as often as needed) and pairs of old bins merge exactly into new ones, so memory stays fixed
and no count is ever moved between values it did not hold.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Observer", "OBSERVERS", "make_observer", "ObserverError"]

QMAX = 127  # symmetric int8 activations: codes -127..127
ULEVELS = 2 * QMAX  # unsigned/affine activations: 255 codes, 254 steps


class ObserverError(ValueError):
    """Bad observer input: an unknown kind, no data, NaN/Inf activations."""


def _values(x: torch.Tensor) -> torch.Tensor:
    v = x.detach().reshape(-1).float()
    if v.numel() and not bool(torch.isfinite(v).all()):
        raise ObserverError("activations hold NaN/Inf; check the model and the calibration data")
    return v


class Observer:
    """Base: counts what it saw; subclasses implement ``_update`` and ``range``."""

    name = "base"

    def __init__(self) -> None:
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add one batch ``x`` (any shape; every element is one sample)."""
        v = _values(x)
        if v.numel() == 0:
            return
        self.count += v.numel()
        self._update(v)

    def _update(self, v: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self) -> tuple[float, float]:  # pragma: no cover - abstract
        """The proposed clipping range ``(lo, hi)``, ``lo <= 0 <= hi``."""
        raise NotImplementedError

    def _need_data(self) -> None:
        if self.count == 0:
            raise ObserverError(f"the {self.name} observer saw no data: pass at least one calibration batch")

    affine = False  # on signed data: an asymmetric [lo, hi] range (else symmetric)

    def qparams(self) -> tuple[float, int]:
        """``(scale, zero)`` of the static int8 activations (see the module docstring); scale 1.0
        when every value seen was 0."""
        lo, hi = self.range()
        if lo >= 0.0:  # unsigned data
            return (hi / ULEVELS, -QMAX) if hi > 0 else (1.0, 0)
        if self.affine:
            s = (hi - lo) / ULEVELS
            return s, max(-QMAX, min(QMAX, round(-lo / s) - QMAX))
        return max(-lo, hi) / QMAX, 0

    def scale(self) -> float:
        """The scale of :meth:`qparams`."""
        return self.qparams()[0]


class MinMaxObserver(Observer):
    name = "minmax"
    affine = True

    def __init__(self) -> None:
        super().__init__()
        self.lo, self.hi = math.inf, -math.inf

    def _update(self, v: torch.Tensor) -> None:
        self.lo = min(self.lo, float(v.min()))
        self.hi = max(self.hi, float(v.max()))

    def range(self) -> tuple[float, float]:
        self._need_data()
        return min(self.lo, 0.0), max(self.hi, 0.0)


class MovingAverageObserver(MinMaxObserver):
    name = "ema"

    def __init__(self, momentum: float = 0.1) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ObserverError(f"momentum must be in (0, 1], got {momentum}")
        super().__init__()
        self.momentum = momentum

    def _update(self, v: torch.Tensor) -> None:
        lo, hi = float(v.min()), float(v.max())
        if self.lo == math.inf:  # first batch
            self.lo, self.hi = lo, hi
        else:
            self.lo += self.momentum * (lo - self.lo)
            self.hi += self.momentum * (hi - self.hi)


class HistogramObserver(Observer):
    """2048 bins over ``[-a, a]``; ``a`` doubles when a batch exceeds it (exact bin merges)."""

    name = "histogram"
    BINS = 2048

    def __init__(self) -> None:
        super().__init__()
        self.hist = torch.zeros(self.BINS, dtype=torch.float64)
        self.a = 0.0  # half-width of the range; 0 until a nonzero value arrives
        self.signed = False  # a negative value was seen

    def _update(self, v: torch.Tensor) -> None:
        self.signed = self.signed or bool((v < 0).any())
        m = float(v.abs().max())
        if m > self.a:
            if self.a == 0.0:
                self.a = m
            else:
                k = math.ceil(math.log2(m / self.a))
                for _ in range(k):  # double: old bins 2j, 2j+1 -> new bin BINS/4 + j
                    merged = self.hist.view(-1, 2).sum(1)
                    self.hist = torch.zeros_like(self.hist)
                    self.hist[self.BINS // 4 : self.BINS // 4 + merged.numel()] = merged
                    self.a *= 2.0
        if self.a == 0.0:
            self.hist[self.BINS // 2] += v.numel()  # all zeros so far
            return
        self.hist += torch.histc(v.double(), bins=self.BINS, min=-self.a, max=self.a)

    @property
    def width(self) -> float:
        return 2.0 * self.a / self.BINS

    def folded(self) -> torch.Tensor:
        """Histogram of ``|x|``: ``BINS / 2`` bins over ``[0, a]``."""
        half = self.BINS // 2
        return self.hist[half:] + self.hist[:half].flip(0)

    @property
    def levels(self) -> int:
        """Positive levels the threshold is spread over: 127 (signed data) or 254 (unsigned)."""
        return QMAX if self.signed else ULEVELS

    def _threshold(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        self._need_data()
        if self.a == 0.0:
            return 0.0, 0.0
        t = self._threshold()
        return (-t if self.signed else 0.0), t


class PercentileObserver(HistogramObserver):
    name = "percentile"

    def __init__(self, percentile: float = 99.99) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ObserverError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__()
        self.percentile = percentile

    def _threshold(self) -> float:
        h = self.folded()
        cdf = h.cumsum(0) / h.sum()
        i = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100.0, dtype=cdf.dtype)))
        return min(i + 1, h.numel()) * self.width  # the upper edge of the bin reaching the percentile


class MSEObserver(HistogramObserver):
    name = "mse"

    def _threshold(self) -> float:
        h = self.folded()
        n = h.numel()
        c = (torch.arange(n, dtype=torch.float64) + 0.5) * self.width  # bin centres
        # clipping error at t_i = i * width: sum_{j >= i} h_j (c_j - t_i)^2, from suffix sums
        suffix = lambda v: torch.cat([v.flip(0).cumsum(0).flip(0), v.new_zeros(1)])  # noqa: E731
        s0, s1, s2 = suffix(h), suffix(h * c), suffix(h * c * c)
        i = torch.arange(max(1, n // 16), n + 1)  # thresholds at bin edges, down to 1/16 of the range
        t = i.double() * self.width
        clip = s2[i] - 2 * t * s1[i] + t * t * s0[i]
        rounding = (h.sum() - s0[i]) * (t / self.levels) ** 2 / 12.0
        return float(t[int(torch.argmin(clip + rounding))])


def _smooth(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``p`` with every empty bin given ``eps``, taken evenly from the others, so that KL stays
    finite where one distribution is empty and the other is not (the usual treatment in KL
    calibration implementations)."""
    zero = p == 0
    nz = int((~zero).sum())
    if nz == 0:
        return p
    return torch.where(zero, eps, p - eps * int(zero.sum()) / nz).clamp_min(eps * 1e-3)


class EntropyObserver(HistogramObserver):
    name = "entropy"

    def _threshold(self) -> float:
        h = self.folded()
        n = h.numel()
        if h[1:].sum() == 0:  # nothing beyond the first bin
            return self.width
        nlev = self.levels + 1  # |x| levels: 0..127 (symmetric) or 0..254 (unsigned)
        best_i, best_kl = n, math.inf
        for i in range(nlev, n + 1):
            p = h[:i].clone()
            p[-1] += h[i:].sum()
            # Q: i bins merged into LEVELS chunks, each chunk's mass spread over its nonzero bins
            edges = torch.linspace(0, i, nlev + 1).round().long()
            chunk = torch.bucketize(torch.arange(i), edges[1:-1], right=True)  # chunk of each bin
            nz = (h[:i] > 0).double()
            mass = torch.zeros(nlev, dtype=torch.float64).index_add_(0, chunk, h[:i])
            nnz = torch.zeros(nlev, dtype=torch.float64).index_add_(0, chunk, nz)
            q = nz * (mass / nnz.clamp_min(1))[chunk]
            ps, qs = _smooth(p / p.sum()), _smooth(q / q.sum().clamp_min(1e-300))
            kl = float((ps * (ps / qs).log()).sum())
            if kl < best_kl:
                best_i, best_kl = i, kl
        return best_i * self.width


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, **options) -> Observer:
    """An observer of kind ``name`` (a key of :data:`OBSERVERS`) with its ``options``."""
    cls = OBSERVERS.get(name)
    if cls is None:
        raise ObserverError(f"unknown observer {name!r}; observers: {', '.join(OBSERVERS)}")
    try:
        return cls(**options)
    except TypeError as e:
        raise ObserverError(f"observer {name!r}: {e}") from None
