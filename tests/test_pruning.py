"""Pruning masks and SparseGPT (lowbit.algorithms.pruning): exact counts and patterns, and each
method's layer-output error ordered as the papers say on inputs with outlier features."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms.gptq import HessianError, quantize_weight
from lowbit.algorithms.pruning import (
    PruningError,
    magnitude_scores,
    nm_mask,
    sparsegpt,
    unstructured_mask,
    wanda_scores,
)
from lowbit.scheme import parse_scheme


def _layer(n=48, k=128, tokens=2048, seed=0):
    """A weight and calibration inputs whose first features are 20x larger (as LLM activations'
    outlier features are)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k**0.5)
    x[:, :6] *= 20
    return torch.randn(n, k, generator=g) * 0.05, x


def _out_err(w, x, wq):
    return float((x @ (w - wq).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 40), sparsity=st.floats(0, 0.99), per_row=st.booleans())
def test_unstructured_mask_removes_exactly_the_lowest(n, k, sparsity, per_row):
    s = torch.randn(n, k).round(decimals=1)  # ties on purpose
    keep = unstructured_mask(s, sparsity, per_row)
    groups, sg = (keep, s) if per_row else (keep.reshape(1, -1), s.reshape(1, -1))
    drop = int(sparsity * groups.shape[1] + 1e-9)
    assert ((~groups).sum(1) == drop).all()
    for kept, score in zip(groups, sg):
        if drop and kept.any():
            assert float(score[~kept].max()) <= float(score[kept].min())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4)])
def test_nm_mask_keeps_the_top_n_of_every_m(n, m):
    s = torch.randn(16, 64)
    keep = nm_mask(s, n, m)
    g, kg = s.reshape(16, -1, m), keep.reshape(16, -1, m)
    assert (kg.sum(-1) == n).all()
    assert ((g * kg - 1e9 * ~kg).amax(-1) >= g.amax(-1)).all()  # the largest is always kept
    assert (torch.where(kg, g, torch.inf).amin(-1) >= torch.where(kg, -torch.inf, g).amax(-1)).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True, "0.5", float("nan")])
def test_bad_sparsity_is_one_clear_error(bad):
    with pytest.raises(PruningError, match="sparsity must be a fraction in"):
        unstructured_mask(torch.ones(2, 4), bad)


def test_bad_nm_is_one_clear_error():
    with pytest.raises(PruningError, match="divisible by 4"):
        nm_mask(torch.ones(2, 6), 2, 4)
    for n, m in ((0, 4), (4, 4), (5, 4)):
        with pytest.raises(PruningError, match="0 < n < m"):
            nm_mask(torch.ones(2, 8), n, m)
    w, x = _layer(k=66)
    with pytest.raises(PruningError, match="divisible by 4"):
        sparsegpt(w, x.t() @ x, nm=(2, 4), name="mlp.up")


def test_error_order_magnitude_wanda_sparsegpt():
    """At 50% and at 2:4: Wanda (weights times input norms) beats magnitude, and SparseGPT
    (with error compensation) beats Wanda, on the layer's output error."""
    w, x = _layer()
    h = x.t() @ x
    for keep_mag, keep_wanda, res in (
        (unstructured_mask(magnitude_scores(w), 0.5), unstructured_mask(wanda_scores(w, torch.diag(h)), 0.5),
         sparsegpt(w, h, sparsity=0.5)),
        (nm_mask(magnitude_scores(w), 2, 4), nm_mask(wanda_scores(w, torch.diag(h)), 2, 4), sparsegpt(w, h, nm=(2, 4))),
    ):  # fmt: skip
        e_mag, e_wanda, e_sgpt = (_out_err(w, x, w * keep_mag), _out_err(w, x, w * keep_wanda), _out_err(w, x, res.weight))
        assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)
        assert ((~res.mask).sum(1) == w.shape[1] // 2).all()  # every row equally sparse
        assert bool((res.weight[~res.mask] == 0).all())


def test_sparsegpt_nm_pattern_is_exact_and_quantizes_jointly():
    w, x = _layer()
    h = x.t() @ x
    res = sparsegpt(w, h, nm=(2, 4), scheme=parse_scheme("w4g64"))
    assert (res.mask.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert torch.equal(res.qweight.dequantize() * res.mask, res.weight)  # the stored codes are the values
    pruned_only = sparsegpt(w, h, nm=(2, 4)).weight
    # quantizing the kept weights adds error, but GPTQ-style feedback keeps it small
    assert _out_err(w, x, pruned_only) < _out_err(w, x, res.weight) < 1.25 * _out_err(w, x, pruned_only)


@pytest.mark.parametrize("spec", ["w4g64", "w3g32-asym", "w8"])
def test_sparsegpt_without_pruning_is_gptq(spec):
    w, x = _layer()
    h = x.t() @ x
    scheme = parse_scheme(spec)
    res = sparsegpt(w, h, sparsity=0.0, scheme=scheme)
    ref = quantize_weight(w, h, scheme)
    assert torch.equal(res.qweight.codes(), ref.codes())
    assert res.mask.all()
    assert torch.equal(sparsegpt(w, h, sparsity=0.0).weight, w)


def test_sparsegpt_refuses_a_bad_hessian():
    w, x = _layer()
    with pytest.raises(HessianError, match="finite"):
        sparsegpt(w, torch.eye(127))
    h = x.t() @ x
    h[0, 0] = float("nan")
    with pytest.raises(HessianError, match="finite"):
        sparsegpt(w, h)
