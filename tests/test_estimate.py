import pytest
import torch

import lowbit
from lowbit.estimate import bits_per_weight
from lowbit.qweight import QWeight
from lowbit.scheme import PRESETS, parse_scheme


def test_70b_figures():
    est = lowbit.estimate(params=70e9, scheme="w4g128")
    rows = {label: nbytes for label, _, nbytes in est.rows}
    assert rows["fp32"] == pytest.approx(280e9)
    assert rows["fp16/bf16"] == pytest.approx(140e9)
    assert rows["int8"] == pytest.approx(70e9)
    assert rows["int4 (w4g128)"] == pytest.approx(70e9 * (4 + 16 / 128) / 8)  # ~36.1 GB
    assert "280.00" in est.table()


@pytest.mark.parametrize("scheme", PRESETS)
@pytest.mark.parametrize("k", [576, 4096, 1000])
def test_formula_matches_real_storage(scheme, k):
    """The calculator's bits/weight for a known row width is what a real QWeight stores."""
    qw = QWeight.from_float(torch.randn(8, k), parse_scheme(scheme))
    # per-tensor: one scale for the whole tensor, which the row width alone cannot place
    rel = 1e-3 if parse_scheme(scheme).per_tensor else 1e-12
    assert bits_per_weight(scheme, k) == pytest.approx(qw.bits_per_weight, rel=rel)


def test_model_mode_counts_only_linear_and_conv():
    m = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 64, bias=False))
    est = lowbit.estimate(model=m, scheme="int8")
    rows = {label: nbytes for label, _, nbytes in est.rows}
    assert rows["int8"] == pytest.approx(64 * 64 * bits_per_weight("int8", 64) / 8 + 6400 * 2)


def test_bad_arguments():
    with pytest.raises(ValueError):
        lowbit.estimate()
    with pytest.raises(ValueError):
        lowbit.estimate(params=-5)
    with pytest.raises(lowbit.SchemeError):
        lowbit.estimate(params=1e9, scheme="w4x")
