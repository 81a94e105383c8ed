import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.packing import PACKABLE_BITS, pack, packed_row_bytes, unpack


@pytest.mark.parametrize("bits", PACKABLE_BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 576, 1001])
def test_exact_round_trip_and_size(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=g, dtype=torch.uint8)
    p = pack(codes, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, packed_row_bytes(n, bits))
    assert torch.equal(unpack(p, bits, n), codes)
    # exact bit accounting: padding only up to the packing unit
    assert packed_row_bytes(n, bits) * 8 - n * bits < (24 if bits == 3 else 8)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(PACKABLE_BITS), rows=st.integers(1, 4), n=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_round_trip_property(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, n), codes)


def test_documented_4bit_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x05]]  # code 2j low nibble, 2j+1 high


def test_documented_3bit_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_errors():
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]], dtype=torch.uint8), 4)  # does not fit in 4 bits
    with pytest.raises(TypeError):
        pack(torch.tensor([[1]], dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack(torch.zeros(1, 4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 7)  # 7 codes need 4 bytes


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from((2, 4, 8)), n=st.integers(1, 40), k=st.integers(1, 150), seed=st.integers(0, 2**16))
def test_tiled_layout_round_trip(bits, n, k, seed):
    from lowbit.packing import tile, untile, untile_rows

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    t = tile(codes, bits)
    per = 8 // bits
    assert t.shape == (-(-n // 16), -(-k // (2 * per)) * 32)
    assert torch.equal(untile(t, bits, n, k), codes)
    rows = torch.randint(0, n, (5,), generator=g)
    assert torch.equal(untile_rows(t, bits, k, rows), codes[rows])


def test_documented_tiled_layout():
    from lowbit.packing import tile

    codes = (torch.arange(16 * 4).reshape(16, 4) % 16).to(torch.uint8)
    t = tile(codes, 4)  # one block, one chunk of 16 rows x 4 columns
    for p in range(32):
        r, kk = p // 2, p % 2
        assert int(t[0, p]) & 15 == codes[r, kk] and int(t[0, p]) >> 4 == codes[r, 2 + kk]
