"""SparseWeight (lowbit.sparse): bitmask + kept weights, exact round trips and
byte-exact sizes, and SparseGPT's joint result stored without changing a value."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms.pruning import PruningError, magnitude_scores, nm_mask, sparsegpt, unstructured_mask
from lowbit.qweight import QWeight
from lowbit.scheme import parse_scheme
from lowbit.sparse import SparseWeight, group_keep, pack_mask, unpack_mask


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 7), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_mask_packs_one_bit_per_weight_and_round_trips(n, k, seed):
    m = torch.rand(n, k, generator=torch.Generator().manual_seed(seed)) < 0.5
    p = pack_mask(m)
    assert p.dtype == torch.uint8 and p.shape == (n, -(-k // 8))
    assert torch.equal(unpack_mask(p, k), m)
    assert int(p[0, 0]) & 1 == int(m[0, 0])  # column 0 in the least significant bit


@pytest.mark.parametrize("spec", ["w4g64", "w4g64-asym", "w8", "w3g32"])
@pytest.mark.parametrize("pattern", ["2:4", "50%", "75%"])
def test_sparse_weight_stores_the_kept_values_exactly_and_counts_bytes(spec, pattern):
    torch.manual_seed(0)
    w = torch.randn(24, 256)
    scheme = parse_scheme(spec)
    group = scheme.group_size or 256
    if pattern == "2:4":
        mask = nm_mask(magnitude_scores(w), 2, 4)
    else:
        keep = group_keep(float(pattern[:-1]) / 100, scheme.group_size, 256)
        mask = unstructured_mask(magnitude_scores(w).reshape(-1, group), 1 - keep / group).reshape(w.shape)
    sw = SparseWeight.from_dense(w, mask, scheme)
    kept = w[mask].reshape(24, -1)
    ref = QWeight.from_float(kept, sw.kept.scheme)  # the kept weights, grouped as the original groups
    dense = torch.zeros_like(w)
    dense[mask] = ref.dequantize().reshape(-1)
    assert torch.equal(sw.dequantize(), dense)
    assert torch.equal(sw.dense_mask(), mask)
    assert sw.nbytes == 24 * 256 // 8 + ref.nbytes == sum(t.numel() * t.element_size() for t in sw.tensors().values())
    dense_q = QWeight.from_float(w, scheme)
    assert sw.nbytes < dense_q.nbytes  # fewer codes, same number of scales, plus one bit a weight
    if pattern == "2:4" and spec == "w4g64":
        assert sw.bits_per_weight == 1 + 2 + 16 / 64  # mask + half the 4-bit codes + fp16 scale per 64


def test_float_kept_weights_and_a_bad_mask():
    w = torch.randn(4, 64)
    mask = nm_mask(magnitude_scores(w), 2, 4)
    sw = SparseWeight.from_dense(w, mask)
    assert torch.equal(sw.dequantize(), (w * mask).half().float())
    assert sw.sparsity == 0.5 and sw.nbytes == 4 * 8 + 4 * 32 * 2
    uneven = mask.clone()
    uneven[0, :4] = True
    with pytest.raises(PruningError, match="same number"):
        SparseWeight.from_dense(w, uneven)
    with pytest.raises(PruningError, match="multiple of 8"):
        SparseWeight.from_dense(w, unstructured_mask(magnitude_scores(w), 0.3), parse_scheme("w4g64"))
    with pytest.raises(PruningError, match="must be bool"):
        SparseWeight.from_dense(w, mask.float())


def test_sparsegpt_joint_result_is_stored_unchanged():
    """SparseGPT with masks chosen per group of the scheme: the stored sparse weight is exactly
    the pruned, quantized weight SparseGPT returned."""
    torch.manual_seed(0)
    x = torch.randn(1024, 128)
    w = torch.randn(32, 128)
    scheme = parse_scheme("w4g64")
    for kw in ({"nm": (2, 4)}, {"sparsity": 1 - group_keep(0.6, 64, 128) / 64, "mask_block": 64}):
        res = sparsegpt(w, x.t() @ x, scheme=scheme, **kw)
        sw = SparseWeight.from_qweight(res.qweight, res.mask)
        assert torch.equal(sw.dequantize(), res.weight)
        assert sw.nbytes < res.qweight.nbytes
