"""QWeight: one quantized weight as stored: packed codes + scales + zero points + shape + scheme.

Tensors (``N`` output channels, ``K`` input columns after flattening, ``ng = ceil(K / G)``,
``R = 1`` for per-tensor schemes else ``N``):

* ``data``: affine/codebook formats: ``(N, packed_row_bytes(K, bits))`` uint8, rows packed as
  :mod:`lowbit.packing` describes; scaled/cast floats: ``(N, K)`` in the format's dtype.
* ``scale``: ``(R, ng)`` in the format's ``scale_dtype`` (``None`` for plain casts), or float32
  for a weight too small or large for float16 scales (:func:`lowbit.primitives.round_scale`).
* ``zero``: ``None`` for symmetric schemes (implicit ``2**(bits-1)``); for asymmetric ones
  either integer zero points bit-packed like the codes, ``(R, packed_row_bytes(ng, bits))``
  uint8, or fractional ones (e.g. from HQQ) as ``(R, ng)`` float16.

``nbytes`` counts exactly these tensors' bytes: what the safetensors file stores for the weight.

In memory a QWeight may instead be in the ``tiled`` layout the CPU kernel reads
(:func:`lowbit.packing.tile`): ``data`` tiled; ``scale`` row-block-major ``(ceil(N/16), ng * 16)``
(block ``rb`` holds, group after group, the values of its 16 rows, so one tile's parameters are
one contiguous run); fractional zero points the same in float16, integer ones the same with
each group's 16 codes bit-packed (``(ceil(N/16), ng * packed_row_bytes(16, bits))``); padding
rows zero; per-tensor parameters stay ``(1, 1)``. ``nbytes`` always counts the row
layout, which is what is stored; :meth:`to_layout` converts both ways exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import packing
from .primitives import (
    NonFiniteError,
    QParams,
    check_finite,
    choose_qparams,
    dequantize_codes,
    dequantize_float,
    quantize_codes,
    quantize_float,
    scale_storage_dtype,
)
from .scheme import Scheme

__all__ = ["QWeight"]


_CONVERT_CODES = 1 << 20  # codes unpacked at a time by layout conversions


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _padded_rows(n: int) -> int:
    return -(-n // packing.TILE_ROWS) * packing.TILE_ROWS


def _to_blocks(t: torch.Tensor) -> torch.Tensor:
    """Per-row parameters ``(N, ng)`` -> the tiled layouts' row-block-major ``(nrb, ng * 16)``:
    block ``rb`` holds, group after group, the 16 values of its rows (padding rows 0), so a
    tile's parameters are one contiguous run."""
    n, ng = t.shape
    tr = packing.TILE_ROWS
    t = torch.nn.functional.pad(t, (0, 0, 0, _padded_rows(n) - n))
    return t.reshape(-1, tr, ng).transpose(1, 2).reshape(-1, ng * tr).contiguous()


def _from_blocks(b: torch.Tensor, rows: int, ng: int) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`: ``(nrb, ng * 16)`` -> ``(rows, ng)``."""
    tr = packing.TILE_ROWS
    return b.reshape(-1, ng, tr).transpose(1, 2).reshape(-1, ng)[:rows]


def _fill_blocks(blocks: list) -> torch.Tensor:
    """``torch.cat`` of the tensors the functions ``blocks`` return (along dim 0; every block but
    the last of equal size), each written into one preallocated output as soon as it exists: no
    list of every block beside the joined copy, and each block's temporaries reuse the memory the
    previous block's freed (a heap holding finished blocks between them fragments: 6x the
    weight's bytes were resident converting an 84 MB weight)."""
    last = blocks[-1]()
    if len(blocks) == 1:
        return last
    first = blocks[0]()
    n = first.shape[0]
    out = torch.empty((n * (len(blocks) - 1) + last.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:n] = first
    out[n * (len(blocks) - 1) :] = last
    del first, last
    for i in range(1, len(blocks) - 1):
        out[i * n : (i + 1) * n] = blocks[i]()
    return out


def _checked_cast(w2: torch.Tensor, scheme: Scheme, name: str) -> torch.Tensor:
    """``w2`` cast to a plain float format; a value that overflows it raises, and a weight whose
    values fall below its normal range (where it keeps fewer bits, down to zero) warns."""
    import warnings

    out = quantize_float(w2, None, scheme)
    dtype = scheme.fmt.torch_dtype
    if not torch.isfinite(out).all():
        raise NonFiniteError(
            f"{name}: {int((~torch.isfinite(out)).sum())} value(s) overflow {scheme} (largest finite "
            f"{torch.finfo(dtype).max:g}); bf16 keeps float32's range"
        )
    nonzero = w2 != 0
    small = nonzero & (w2.abs() < torch.finfo(dtype).tiny)
    n_small, n = int(small.sum()), int(nonzero.sum())
    if n_small and n_small > 0.01 * n:
        warnings.warn(
            f"{name}: {n_small} of {n} non-zero values lie below {scheme}'s normal range "
            f"({torch.finfo(dtype).tiny:.2g}) and lose precision or become 0; bf16 keeps float32's range",
            stacklevel=3,
        )
    return out


class WeightShape:
    """Geometry of a stored weight of original shape ``shape`` ``(N, ...)``, flattened to ``(N, K)``."""

    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class QWeight(WeightShape):
    """A quantized weight; see the module docstring for the tensors' layouts."""

    scheme: Scheme
    shape: tuple[int, ...]
    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    layout: str = "rows"

    # ---- geometry (rows, cols, numel: WeightShape) --------------------------------------------
    @property
    def n_groups(self) -> int:
        if self.scheme.per_tensor:
            return 1
        g = self.scheme.group_size
        return 1 if g is None else -(-self.cols // g)

    @property
    def nbytes(self) -> int:
        """Bytes stored for this weight (row layout): codes + scales + zero points."""
        if self.layout == "rows":
            return _nbytes(self.data) + _nbytes(self.scale) + _nbytes(self.zero)
        fmt = self.scheme.fmt
        r = 1 if self.scheme.per_tensor else self.rows
        zero = 0 if self.zero is None else r * packing.packed_row_bytes(self.n_groups, fmt.bits)
        scale = r * self.n_groups * self.scale.element_size()
        return self.rows * packing.packed_row_bytes(self.cols, fmt.bits) + scale + zero

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls, w: torch.Tensor, scheme: Scheme, qp: QParams | None = None, *, name: str = "weight", check: bool = True
    ) -> QWeight:
        """Quantize ``w`` (any shape ``(N, ...)``; flattened to ``(N, K)``) with ``qp`` or min/max.

        ``check=False`` skips the NaN/Inf check for callers that already made it.
        """
        if check:
            check_finite(w, name)
        w2 = w.detach().reshape(w.shape[0], -1).float()
        fmt = scheme.fmt
        if scheme.is_cast:
            return cls(scheme, tuple(w.shape), _checked_cast(w2, scheme, name))
        qp = qp if qp is not None else choose_qparams(w2, scheme)
        if fmt.kind == "float":
            return cls(scheme, tuple(w.shape), quantize_float(w2, qp, scheme), qp.scale.to(scale_storage_dtype(qp.scale, fmt)))
        return cls.from_codes(tuple(w.shape), scheme, quantize_codes(w2, qp, scheme), qp)

    @classmethod
    def from_codes(cls, shape: tuple[int, ...], scheme: Scheme, codes: torch.Tensor, qp: QParams,
                   packed: bool = False) -> QWeight:  # fmt: skip
        """Pack ``codes`` ``(N, K)`` uint8 computed with ``qp`` (scales already storage-rounded);
        ``packed``: ``codes`` are already :func:`lowbit.packing.pack`'s output.

        Integer zero points in range are bit-packed like the codes; fractional ones (HQQ) are
        stored as float16, which the caller must have rounded them to before computing codes.
        """
        fmt = scheme.fmt
        zero = None
        if qp.zero is not None:
            z = qp.zero
            if torch.equal(z, z.round()) and bool(((z >= 0) & (z <= fmt.qmax)).all()):
                zero = packing.pack(z.to(torch.uint8), fmt.bits)
            else:
                zero = z.to(torch.float16)
        scale = qp.scale.to(scale_storage_dtype(qp.scale, fmt))
        return cls(scheme, tuple(shape), codes if packed else packing.pack(codes, fmt.bits), scale, zero)

    # ---- reading back -------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked codes ``(N, K)`` uint8 (affine and codebook formats)."""
        if self.layout == "tiled":
            return packing.untile(self.data, self.scheme.bits, self.rows, self.cols)
        if self.layout == "tiled4":
            return packing.untile4_rows(self.data, self.cols, torch.arange(self.rows))
        return packing.unpack(self.data, self.scheme.bits, self.cols)

    def _tiled_params(self) -> bool:
        return self.layout != "rows" and not self.scheme.per_tensor

    def zero_points(self) -> torch.Tensor | None:
        """Zero points ``(R, ng)`` float32, or ``None`` for symmetric schemes."""
        if self.zero is None:
            return None
        if self._tiled_params():
            ng, tr = self.n_groups, packing.TILE_ROWS
            if self.zero.dtype != torch.uint8:  # fractional: row-block-major like the scales
                return _from_blocks(self.zero, self.rows, ng).float()
            codes = packing.unpack(self.zero.reshape(-1, packing.packed_row_bytes(tr, self.scheme.bits)), self.scheme.bits, tr)
            return _from_blocks(codes.reshape(-1, ng * tr), self.rows, ng).float()
        if self.zero.dtype == torch.uint8:
            return packing.unpack(self.zero, self.scheme.bits, self.n_groups).float()
        return self.zero.float()

    def scales(self) -> torch.Tensor:
        """Scales ``(R, ng)`` float32."""
        return _from_blocks(self.scale, self.rows, self.n_groups).float() if self._tiled_params() else self.scale.float()

    def qparams(self) -> QParams:
        return QParams(self.scales(), self.zero_points())

    # ---- layouts ------------------------------------------------------------------------------
    def can_tile(self, layout: str = "tiled") -> bool:
        """Whether ``layout`` applies: affine codes, 2/4/8 bits for "tiled" (zero points integer,
        fractional or none), 8 bits with integer (or no) zero points for "tiled4"."""
        s = self.scheme
        if s.fmt.kind != "affine":
            return False
        if layout == "tiled":
            return s.bits in packing.TILEABLE_BITS
        return s.bits == 8 and (self.zero is None or self.zero.dtype == torch.uint8)

    def to_layout(self, layout: str) -> QWeight:
        """This weight in ``layout`` ("rows" or "tiled"): new tensors, same values."""
        if layout == self.layout:
            return self
        if layout not in ("rows", "tiled", "tiled4"):
            raise ValueError(f"unknown layout {layout!r}")
        if layout != "rows" and not self.can_tile(layout):
            raise ValueError(f"{self.scheme} weights have no {layout} layout")
        bits = self.scheme.bits
        qp = self.qparams()
        fractional = self.zero is not None and self.zero.dtype != torch.uint8
        # codes a block of rows at a time (16-row multiples: whole tiles), so a huge weight's
        # unpacked codes and their int32 temporaries never exist at once
        step = max(packing.TILE_ROWS, (_CONVERT_CODES // max(1, self.cols)) // packing.TILE_ROWS * packing.TILE_ROWS)
        row_blocks = [self.codes_of_rows(i, min(i + step, self.rows)) for i in range(0, self.rows, step)]
        if layout == "rows":
            scale = qp.scale.to(self.scale.dtype).contiguous()
            zero = None
            if qp.zero is not None:
                zero = qp.zero.to(self.zero.dtype).contiguous() if fractional else packing.pack(qp.zero.to(torch.uint8), bits)
            data = _fill_blocks([lambda c=c: packing.pack(c(), bits) for c in row_blocks])
            return QWeight(self.scheme, self.shape, data, scale, zero, "rows")
        if self.scheme.per_tensor:
            scale, zero = self.scale, self.zero
        else:
            scale = _to_blocks(qp.scale).to(self.scale.dtype)
            zero = None
            if qp.zero is not None and fractional:  # row-block-major float16, like the scales
                zero = _to_blocks(qp.zero).to(self.zero.dtype)
            elif qp.zero is not None:  # integer codes, each group's 16 rows packed together
                tr = packing.TILE_ROWS
                blocks = _to_blocks(qp.zero).to(torch.uint8)
                zero = packing.pack(blocks.reshape(-1, tr), bits).reshape(blocks.shape[0], -1).contiguous()
        tile = (lambda c: packing.tile(c, bits)) if layout == "tiled" else packing.tile4  # noqa: E731
        data = _fill_blocks([lambda c=c: tile(c()) for c in row_blocks])
        return QWeight(self.scheme, self.shape, data, scale, zero, layout)

    def codes_of_rows(self, lo: int, hi: int):
        """A function returning the unpacked codes ``(hi - lo, K)`` uint8 of rows ``lo:hi`` (lazily:
        one block's codes exist at a time)."""
        if self.layout == "rows":
            return lambda: packing.unpack(self.data[lo:hi], self.scheme.bits, self.cols)
        if lo % packing.TILE_ROWS:
            raise ValueError("tiled codes are read in whole 16-row tiles")
        rows = torch.arange(lo, hi)
        if self.layout == "tiled4":
            return lambda: packing.untile4_rows(self.data, self.cols, rows)
        return lambda: packing.untile_rows(self.data, self.scheme.bits, self.cols, rows)

    @classmethod
    def cat_rows(cls, parts: list[QWeight]) -> QWeight:
        """One row-layout QWeight from row blocks of one weight quantized separately (same scheme,
        columns and parameter dtypes; not per-tensor schemes, whose parameters span all rows).
        Raises ``ValueError`` otherwise."""
        first = parts[0]
        if first.scheme.per_tensor or any(
            p.layout != "rows" or p.scheme != first.scheme or tuple(p.shape[1:]) != tuple(first.shape[1:])
            or (p.scale is None) != (first.scale is None) or (p.zero is None) != (first.zero is None)
            or (p.scale is not None and p.scale.dtype != first.scale.dtype)
            or (p.zero is not None and p.zero.dtype != first.zero.dtype)
            for p in parts
        ):  # fmt: skip
            raise ValueError("cat_rows joins row blocks of one per-channel/per-group weight with equal parameter dtypes")
        cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
        return cls(first.scheme, shape, torch.cat([p.data for p in parts]), cat([p.scale for p in parts]),
                   cat([p.zero for p in parts]))  # fmt: skip

    def rows_subset(self, idx: torch.Tensor) -> QWeight:
        """A row-layout QWeight of only the rows ``idx`` (1-D long), shape ``(len(idx), ...)``."""
        shape = (idx.numel(), *self.shape[1:])
        if self.layout == "rows":
            per_row = not self.scheme.per_tensor
            pick = (lambda t: None if t is None else (t[idx] if per_row else t))  # noqa: E731
            return QWeight(self.scheme, shape, self.data[idx], pick(self.scale), pick(self.zero))
        bits = self.scheme.bits
        if self.layout == "tiled4":
            codes = packing.untile4_rows(self.data, self.cols, idx)
        else:
            codes = packing.untile_rows(self.data, bits, self.cols, idx)
        if self.scheme.per_tensor:
            scale, zero = self.scale, self.zero
        else:
            scale = self.scales()[idx].to(self.scale.dtype).contiguous()
            zp = self.zero_points()
            zero = None
            if zp is not None and self.zero.dtype != torch.uint8:
                zero = zp[idx].to(self.zero.dtype).contiguous()
            elif zp is not None:
                zero = packing.pack(zp[idx].to(torch.uint8), bits)
        return QWeight(self.scheme, shape, packing.pack(codes, bits), scale, zero)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this QWeight stands for, in its original shape."""
        if self.scheme.is_cast:
            w = self.data.float()
        elif self.scheme.fmt.kind == "float":
            w = dequantize_float(self.data, self.qparams())
        else:
            w = dequantize_codes(self.codes(), self.qparams(), self.scheme)
        return w.reshape(self.shape).to(dtype)

    # ---- storage ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """This layout's tensors by suffix: ``qweight``, ``scales``, ``zeros`` (present ones)."""
        out = {"qweight": self.data}
        if self.scale is not None:
            out["scales"] = self.scale
        if self.zero is not None:
            out["zeros"] = self.zero
        return out
