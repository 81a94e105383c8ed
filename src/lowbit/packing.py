"""Reference bit packing of unsigned integer codes, row by row (exact round trip).

Layouts (``codes`` is ``(rows, n)`` uint8 with every value ``< 2**bits``):

* 8 bits: one code per byte, unchanged.
* 4 bits: ``(rows, ceil(n/2))``; byte ``j`` holds code ``2j`` in its low nibble and ``2j+1``
  in its high nibble.
* 2 bits: ``(rows, ceil(n/4))``; byte ``j`` holds codes ``4j..4j+3``, code ``4j+i`` at bits
  ``2i..2i+1``.
* 3 bits: ``(rows, 3*ceil(n/8))``; each 3-byte little-endian word holds 8 codes, code ``8j+i`` at
  bits ``3i..3i+2`` of word ``j``.

Rows are padded with zero codes up to the packing unit; :func:`unpack` drops the padding given
the true ``n``. So a row of ``n`` codes takes exactly :func:`packed_row_bytes` bytes.
"""

from __future__ import annotations

import torch

__all__ = ["pack", "unpack", "packed_row_bytes", "PACKABLE_BITS"]

PACKABLE_BITS = (2, 3, 4, 8)


def _unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) in one packing unit."""
    if bits == 3:
        return 8, 3
    if bits in (2, 4, 8):
        return 8 // bits, 1
    raise ValueError(f"cannot pack {bits}-bit codes; packable widths: {PACKABLE_BITS}")


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes that one packed row of ``n`` codes takes."""
    per, nbytes = _unit(bits)
    return -(-n // per) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(rows, n)`` uint8 codes into ``(rows, packed_row_bytes(n, bits))`` uint8."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"pack expects a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    per, nbytes = _unit(bits)
    rows, n = codes.shape
    if bits == 8:
        return codes.contiguous()
    if codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"a code exceeds {bits} bits")
    pad = -n % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    units = codes.reshape(rows, -1, per)  # (rows, n/per, per)
    if nbytes == 1:  # 2 and 4 bits: OR the shifted codes of each byte together, in uint8
        out = units[..., 0].clone()
        for i in range(1, per):
            out |= units[..., i] << (i * bits)
        return out
    shifts = torch.arange(per, dtype=torch.int32) * bits
    words = (units.to(torch.int32) << shifts).sum(-1)  # (rows, n/per) int32, 24 bits used
    byte_shifts = torch.arange(nbytes, dtype=torch.int32) * 8
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(rows, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(rows, packed_row_bytes(n, bits))`` uint8 -> ``(rows, n)`` uint8."""
    per, nbytes = _unit(bits)
    rows = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed {bits}-bit rows of {n} codes must be uint8 (rows, {packed_row_bytes(n, bits)}), "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed
    if nbytes == 1:
        words = packed.to(torch.int32)  # (rows, n/per)
    else:
        byte_shifts = torch.arange(nbytes, dtype=torch.int32) * 8
        words = (packed.reshape(rows, -1, nbytes).to(torch.int32) << byte_shifts).sum(-1)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, n/per, per)
    return codes.reshape(rows, -1)[:, :n].to(torch.uint8)
