"""Low-rank approximation (lowbit.algorithms.lowrank): Eckart-Young for the plain SVD, the
activation-weighted form's advantage on the layer output, and low-rank correction of a
quantized layer's error."""

import pytest
import torch

from lowbit.algorithms.gptq import quantize_weight
from lowbit.algorithms.lowrank import LowRankError, low_rank, rank_for_energy
from lowbit.primitives import NonFiniteError
from lowbit.scheme import parse_scheme


def _layer(n=96, k=128, tokens=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k**0.5)
    x[:, :4] *= 20
    return torch.randn(n, k, generator=g) * 0.05, x


def _out_err(w, x, wq):
    return float((x @ (w - wq).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())


@pytest.mark.parametrize("rank", [1, 7, 40, 96])
def test_plain_svd_meets_eckart_young(rank):
    w, _ = _layer()
    a, b = low_rank(w, rank=rank)
    assert a.shape == (96, rank) and b.shape == (rank, 128)
    sv = torch.linalg.svdvals(w.double())
    want = float(sv[rank:].pow(2).sum().sqrt())
    assert abs(float((w.double() - (a @ b).double()).norm()) - want) <= 1e-4 * float(w.norm()) + 1e-6


def test_weighted_rank_goes_where_the_inputs_are():
    w, x = _layer()
    h = x.t() @ x
    for rank in (4, 16, 48):
        plain, weighted = low_rank(w, rank=rank), low_rank(w, h, rank=rank)
        assert _out_err(w, x, weighted[0] @ weighted[1]) < 0.5 * _out_err(w, x, plain[0] @ plain[1])


def test_low_rank_corrects_quantization_error():
    w, x = _layer()
    h = x.t() @ x
    q = quantize_weight(w, h, parse_scheme("w3g32")).dequantize()
    before = _out_err(w, x, q)
    errs = [_out_err(w, x, q + a @ b) for a, b in (low_rank(w - q, h, rank=r) for r in (2, 8, 32))]
    assert before > errs[0] > errs[1] > errs[2]


def test_energy_picks_the_smallest_rank_that_holds_it():
    sv = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert [rank_for_energy(sv, e) for e in (0.5, 16 / 22, 0.8, 21 / 22, 0.99, 1.0)] == [1, 1, 2, 3, 4, 4]
    w, _ = _layer()
    a, _ = low_rank(w, energy=0.9)
    s2 = torch.linalg.svdvals(w.double()).pow(2)
    r = a.shape[1]
    assert float(s2[:r].sum() / s2.sum()) >= 0.9 > float(s2[: r - 1].sum() / s2.sum())


@pytest.mark.parametrize("kw,msg", [({"rank": 0}, "rank must be an integer from 1 to min"),
                                    ({"rank": 97}, "rank must be an integer from 1 to min"),
                                    ({"rank": 2.0}, "rank must be"), ({"energy": 0}, "energy must be"),
                                    ({"energy": 1.5}, "energy must be"), ({}, "exactly one of"),
                                    ({"rank": 2, "energy": 0.5}, "exactly one of")])  # fmt: skip
def test_bad_rank_or_energy_is_one_clear_error(kw, msg):
    w, _ = _layer()
    with pytest.raises(LowRankError, match=msg):
        low_rank(w, **kw)


def test_bad_inputs_are_refused():
    w, x = _layer()
    with pytest.raises(LowRankError, match="takes 128 inputs"):
        low_rank(w, torch.eye(64), rank=2)
    w[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        low_rank(w, rank=2)
