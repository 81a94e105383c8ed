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

The **tiled** layout (:func:`tile`) is what the CPU kernel reads; lowbit keeps it in memory
only, and always stores the row layout above. Rows go in blocks of ``TILE_ROWS = 16`` (the last
block zero-padded); each block is a sequence of 32-byte chunks, each chunk holding 16 rows x
``16 // bits`` columns: byte ``p`` belongs to row ``p // 2`` and its sub-code ``i`` (bits
``i*bits ..``) is column ``2*i + p % 2`` of the chunk. Columns are zero-padded to whole chunks.
Shape: ``(ceil(N/16), ceil(K / (16//bits)) * 32)`` uint8 for 2, 4 and 8 bits.

The **tiled4** layout (:func:`tile4`, 8-bit codes only) is what the int8-activation kernel
reads: rows in blocks of 16, each 64-byte chunk holding 16 rows x 4 columns, byte ``p`` = row
``p // 4``, column ``p % 4``. Shape ``(ceil(N/16), ceil(K/4) * 64)``.
"""

from __future__ import annotations

import torch

__all__ = ["pack", "unpack", "packed_row_bytes", "PACKABLE_BITS", "TILE_ROWS", "TILEABLE_BITS", "tile", "untile",
           "untile_rows", "tile4", "untile4_rows"]  # fmt: skip

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
    units = codes.reshape(rows, (n + pad) // per, per)  # (rows, n/per, per)
    if nbytes == 1:  # 2 and 4 bits: OR the shifted codes of each byte together, in uint8
        out = units[..., 0].clone()
        for i in range(1, per):
            out |= units[..., i] << (i * bits)
        return out
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    words = (units.to(torch.int32) << shifts).sum(-1)  # (rows, n/per) int32, 24 bits used
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=codes.device) * 8
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(rows, words.shape[1] * nbytes)


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
        byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=packed.device) * 8
        words = (packed.reshape(rows, packed.shape[1] // nbytes, nbytes).to(torch.int32) << byte_shifts).sum(-1)
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, n/per, per)
    return codes.reshape(rows, words.shape[1] * per)[:, :n].to(torch.uint8)


TILE_ROWS = 16
TILEABLE_BITS = (2, 4, 8)


def _tile_geometry(n: int, k: int, bits: int) -> tuple[int, int, int, int]:
    """(row blocks, chunks per row block, columns per chunk, sub-codes per byte)."""
    if bits not in TILEABLE_BITS:
        raise ValueError(f"the tiled layout takes {TILEABLE_BITS}-bit codes, not {bits}")
    per = 8 // bits
    ck = 2 * per
    return -(-n // TILE_ROWS), -(-k // ck), ck, per


def tile(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-layout codes ``(N, K)`` uint8 -> tiled ``(ceil(N/16), chunks * 32)`` uint8 (module docstring)."""
    n, k = codes.shape
    nb, nc, ck, per = _tile_geometry(n, k, bits)
    c = torch.nn.functional.pad(codes, (0, nc * ck - k, 0, nb * TILE_ROWS - n))
    # column j of chunk c = 2*i + kk  ->  (block, row, chunk, i, kk)
    c = c.reshape(nb, TILE_ROWS, nc, per, 2).permute(0, 2, 1, 4, 3)  # (block, chunk, row, kk, i)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (i * bits)
    return out.reshape(nb, nc * 32)


def untile_rows(tiled: torch.Tensor, bits: int, k: int, rows: torch.Tensor) -> torch.Tensor:
    """Codes ``(len(rows), K)`` uint8 of the given rows (1-D long) of a tiled weight."""
    nb, width = tiled.shape
    nc = width // 32
    per = 8 // bits
    t = tiled.reshape(nb, nc, TILE_ROWS, 2)[rows // TILE_ROWS, :, rows % TILE_ROWS]  # (R, chunk, kk)
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    sub = (t.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (R, chunk, kk, i)
    return sub.permute(0, 1, 3, 2).reshape(len(rows), nc * 2 * per)[:, :k].contiguous()


def untile(tiled: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`tile`: tiled codes -> row-layout ``(N, K)`` uint8."""
    nb, nc, _, _ = _tile_geometry(n, k, bits)
    if tiled.dtype != torch.uint8 or tuple(tiled.shape) != (nb, nc * 32):
        raise ValueError(f"tiled {bits}-bit codes of {n}x{k} must be uint8 {(nb, nc * 32)}, got {tuple(tiled.shape)}")
    return untile_rows(tiled, bits, k, torch.arange(n))


def tile4(codes: torch.Tensor) -> torch.Tensor:
    """8-bit row-layout codes ``(N, K)`` -> tiled4 ``(ceil(N/16), ceil(K/4) * 64)`` (module docstring)."""
    n, k = codes.shape
    nb, nc = -(-n // TILE_ROWS), -(-k // 4)
    c = torch.nn.functional.pad(codes, (0, nc * 4 - k, 0, nb * TILE_ROWS - n))
    return c.reshape(nb, TILE_ROWS, nc, 4).permute(0, 2, 1, 3).reshape(nb, nc * 64).contiguous()


def untile4_rows(tiled: torch.Tensor, k: int, rows: torch.Tensor) -> torch.Tensor:
    """Codes ``(len(rows), K)`` of the given rows of a tiled4 weight."""
    nb, width = tiled.shape
    nc = width // 64
    t = tiled.reshape(nb, nc, TILE_ROWS, 4)[rows // TILE_ROWS, :, rows % TILE_ROWS]  # (R, chunk, 4)
    return t.reshape(len(rows), nc * 4)[:, :k].contiguous()
