"""Activation range observers: each one's defining property on data where the answer is known."""

import math

import pytest
import torch

from lowbit.observers import OBSERVERS, ObserverError, make_observer


def _feed(name, x, parts=4, **opts):
    o = make_observer(name, **opts)
    for b in x.chunk(parts):
        o.update(b)
    return o


def _int8_mse(x, t):
    s = t / 127
    return float(((x / s).round().clamp(-127, 127) * s - x).pow(2).mean())


def _gauss_with_outliers(n=200_000, outlier=60.0, k=5):
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    x[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]] = outlier
    return x


def test_minmax_is_exact_and_contains_zero():
    o = _feed("minmax", torch.tensor([0.5, 3.0, 1.0, 2.0]), parts=2)
    assert o.range() == (0.0, 3.0)  # the range always holds 0 (zero must be representable)
    s, z = o.qparams()  # nothing negative: unsigned, all 255 codes over [0, 3]
    assert s == pytest.approx(3.0 / 254) and z == -127
    o.update(torch.tensor([[-7.0]]))
    assert o.range() == (-7.0, 3.0)
    s, z = o.qparams()  # signed: affine over [-7, 3], 0.0 exactly on code z
    assert s == pytest.approx(10.0 / 254) and z == round(7.0 / s) - 127 == 51
    q = lambda v: max(-127, min(127, round(v / s) + z))  # noqa: E731
    assert (q(-7.0), q(0.0), q(3.0)) == (-127, z, 127)


def test_histogram_observers_use_all_levels_on_unsigned_data():
    relu = torch.relu(torch.randn(50_000, generator=torch.Generator().manual_seed(5)))
    for name in ("percentile", "mse", "entropy"):
        signed = _feed(name, relu - 0.001)  # a few negatives: symmetric codes, zero point 0
        unsigned = _feed(name, relu)
        assert signed.qparams()[1] == 0 and signed.range()[0] < 0
        lo, hi = unsigned.range()
        s, z = unsigned.qparams()
        assert lo == 0.0 and z == -127 and s == pytest.approx(hi / 254)
    # the unsigned MSE choice is the expected-error optimum for 254 steps, not 127: it clips less
    assert _feed("mse", relu).range()[1] >= _feed("mse", torch.cat([relu, -relu])).range()[1]


def test_ema_starts_at_the_first_batch_and_moves_by_the_momentum():
    o = make_observer("ema", momentum=0.25)
    o.update(torch.tensor([-1.0, 1.0]))
    assert o.range() == (-1.0, 1.0)
    o.update(torch.tensor([-1.0, 5.0]))
    assert o.range() == (-1.0, pytest.approx(2.0))  # 1 + 0.25 * (5 - 1)


def test_histogram_keeps_every_count_and_percentiles_as_its_range_grows():
    # batches of growing magnitude force several doublings of the histogram's range
    parts = [torch.randn(20_000, generator=torch.Generator().manual_seed(i)) * (4.0**i) for i in range(4)]
    x = torch.cat(parts)
    o = make_observer("percentile", percentile=99.0)
    for p in parts:
        o.update(p)
    assert float(o.hist.sum()) == x.numel()
    assert o.a >= float(x.abs().max())
    want = float(torch.quantile(x.abs(), 0.99))
    lo, hi = o.range()
    assert lo == -hi and want <= hi <= want + 2 * o.width  # the upper edge of the bin reaching 99%
    full = _feed("percentile", x, percentile=100.0)
    assert float(x.abs().max()) <= full.range()[1] <= float(x.abs().max()) + full.width


def test_percentile_clips_rare_outliers():
    x = _gauss_with_outliers()
    lo, hi = _feed("percentile", x).range()  # 99.99%: 20 values of 200k lie beyond
    assert 3.0 < hi < 5.0 and lo == -hi


def test_mse_threshold_beats_minmax_on_the_real_quantization_error():
    x = _gauss_with_outliers(k=1)
    t = _feed("mse", x).range()[1]
    assert t < 30.0  # one outlier in 200k is not worth coarsening every other value's step
    assert _int8_mse(x, t) < 0.5 * _int8_mse(x, float(x.abs().max()))
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert _feed("mse", u).range()[1] > 0.97  # nothing to clip in a uniform distribution


def test_entropy_clips_outliers_but_keeps_the_bulk():
    x = _gauss_with_outliers()
    t = _feed("entropy", x).range()[1]
    assert 4.0 < t < 20.0, t  # above the Gaussian's maximum (~4.4), far below the outliers (60)
    y = torch.relu(torch.randn(100_000, generator=torch.Generator().manual_seed(4))) * 3
    t2 = _feed("entropy", y).range()[1]
    assert 0.25 * float(y.max()) < t2 <= float(y.max()) + 1e-6


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_every_observer_handles_zeros_and_refuses_bad_input(name):
    o = make_observer(name)
    with pytest.raises(ObserverError, match="no data"):
        o.range()
    o.update(torch.zeros(3, 4))
    assert o.range() == (0.0, 0.0) and o.qparams() == (1.0, 0)
    o.update(torch.tensor([0.0, 2.0]))
    assert 0 < o.range()[1] <= 2.0 + 2 * 2.0 / 1024 and math.isfinite(o.scale())
    with pytest.raises(ObserverError, match="NaN/Inf"):
        o.update(torch.tensor([1.0, float("nan")]))


def test_bad_observer_names_and_options():
    with pytest.raises(ObserverError, match="unknown observer 'kl'.*entropy"):
        make_observer("kl")
    with pytest.raises(ObserverError, match="percentile"):
        make_observer("percentile", percentile=0)
    with pytest.raises(ObserverError, match="momentum"):
        make_observer("ema", momentum=1.5)
    with pytest.raises(ObserverError, match="unexpected keyword"):
        make_observer("minmax", percentile=99)
