"""SparseWeight: a pruned (and optionally quantized) weight as stored: a bitmask of the kept
weights beside the kept weights only, so removed weights cost one bit each.

Tensors (``N`` output rows, ``K`` input columns after flattening):

* ``mask``: ``(N, ceil(K / 8))`` uint8, bit ``j % 8`` (least significant first) of byte ``j // 8``
  set where column ``j`` of the row is kept. At 2:4 this is 4 bits per 4 weights, the size of the
  two 2-bit indices sparse tensor cores store per group (NVIDIA's 2:4 metadata).
* ``kept``: the kept weights of each row in column order, ``(N, K_kept)``: a
  :class:`~lowbit.qweight.QWeight` (packed codes, scales, zero points) or a float tensor.

Every row keeps the same number of weights, and in every group of ``G`` input columns of a
grouped scheme the same number ``c`` (a multiple of 8: a lowbit group size), so the kept weights of
a row's group ``g`` are exactly the kept QWeight's group ``g`` of ``c`` columns and share its scale;
the last, shorter group keeps what remains. :func:`group_keep` says how many are kept per group.
``nbytes`` counts exactly ``mask`` and the kept weights' tensors: what the file stores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .algorithms.pruning import PruningError, check_sparsity
from .primitives import QParams, check_finite, dequantize_codes, quantize_codes
from .qweight import QWeight, WeightShape
from .scheme import Scheme

__all__ = ["SparseWeight", "pack_mask", "unpack_mask", "group_keep", "kept_scheme", "kept_count", "sparse_nbytes",
           "sparse_from_tensors"]

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``(N, K)`` -> uint8 ``(N, ceil(K / 8))``, column ``j`` in bit ``j % 8`` of byte ``j // 8``."""
    n, k = mask.shape
    pad = -k % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(n, -1, 8)
    return (m * _BITS.to(m.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 ``(N, ceil(K / 8))`` -> bool ``(N, K)`` (inverse of :func:`pack_mask`)."""
    bits = (packed.unsqueeze(-1) & _BITS.to(packed.device)) != 0
    return bits.reshape(packed.shape[0], -1)[:, :k]


def group_keep(sparsity: float, group: int | None, k: int) -> int:
    """Weights kept per row in each group of ``group`` input columns (the whole row when
    ``group`` is None) at ``sparsity``: ``group * (1 - sparsity)`` rounded to a multiple of 8
    for grouped schemes (the kept weights form lowbit groups), at least 8; for a whole row,
    ``K - floor(sparsity * K)``."""
    sparsity = check_sparsity(sparsity)
    if group is None:
        return k - int(sparsity * k)
    return max(8, min(group, 8 * round(group * (1 - sparsity) / 8)))


def kept_scheme(scheme: Scheme, keep: int) -> Scheme:
    """The scheme of the kept weights: ``scheme`` with groups of ``keep`` columns."""
    return scheme if scheme.group_size is None else dataclasses.replace(scheme, group_size=keep)


def kept_count(packed: torch.Tensor, k: int, group: int | None = None) -> int:
    """Weights kept per row of a packed mask (``(N, ceil(K / 8))`` uint8) of ``k`` columns (read
    from its first row: every row keeps the same number); with ``group``, kept in its first
    group of ``group`` columns (the count every full group has)."""
    row = unpack_mask(packed[:1], k)[0]
    return int(row[: group or k].sum())


def sparse_nbytes(scheme: Scheme, shape: tuple[int, ...], packed: torch.Tensor, scales: torch.Tensor | None,
                  zeros: torch.Tensor | None) -> int:  # fmt: skip
    """Bytes a pruned weight stores (:attr:`SparseWeight.nbytes`) from its packed mask and its
    dense parameters' dtypes, without unpacking its codes: the mask, the kept codes (or stored
    floats), and the scales and zero points of the kept weights' groups."""
    from .packing import packed_row_bytes

    n, k = shape[0], math.prod(shape[1:])
    kk = kept_count(packed, k)
    fmt, grouped = scheme.fmt, not scheme.per_tensor and scheme.group_size is not None
    c = kept_count(packed, k, scheme.group_size) if grouped and k >= scheme.group_size else kk
    ng = (-(-kk // c) if c else 0) if grouped else 1
    r = 1 if scheme.per_tensor else n
    out = packed.numel()
    if fmt.kind == "float":
        out += n * kk * fmt.torch_dtype.itemsize
        return out + (0 if scales is None else scales.numel() * scales.element_size())
    out += n * packed_row_bytes(kk, fmt.bits)
    if scales is not None:
        out += r * ng * scales.element_size()
    if zeros is not None:
        out += r * (packed_row_bytes(ng, fmt.bits) if zeros.dtype == torch.uint8 else ng * zeros.element_size())
    return out


def sparse_from_tensors(scheme: Scheme, shape: tuple[int, ...], tensors: dict[str, torch.Tensor],
                        prefix: str = "") -> SparseWeight:  # fmt: skip
    """The :class:`SparseWeight` stored as ``<prefix>mask`` and the kept weights' ``qweight`` /
    ``scales`` / ``zeros`` in ``tensors``, of dense ``shape`` and ``scheme``. Raises
    :class:`~lowbit.algorithms.pruning.PruningError` for a mask of the wrong shape or without
    equal counts per row and group."""
    n, k = shape[0], math.prod(shape[1:])
    packed = tensors[prefix + "mask"]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, -(-k // 8)):
        raise PruningError(f"{prefix}mask must be uint8 {(n, -(-k // 8))}, got {packed.dtype} {tuple(packed.shape)}")
    mask = unpack_mask(packed, k)
    c = _check_mask(mask, None if scheme.per_tensor else scheme.group_size)
    kk = int(mask[0].sum()) if n else 0
    kept = QWeight(kept_scheme(scheme, c), (n, kk), tensors[prefix + "qweight"], tensors.get(prefix + "scales"),
                   tensors.get(prefix + "zeros"))  # fmt: skip
    return SparseWeight(tuple(shape), packed, kept, scheme)


def _check_mask(mask: torch.Tensor, group: int | None) -> int:
    """The per-group kept count ``c`` of a mask that has one (every row, every full group: the same
    count, a multiple of 8 when grouped; the last group no more); :class:`PruningError` otherwise."""
    n, k = mask.shape
    g = k if group is None else group
    full = k // g
    counts = mask[:, : full * g].reshape(n, full, g).sum(-1) if full else torch.zeros(n, 0, dtype=torch.long)
    c = int(counts.flatten()[0]) if counts.numel() else int(mask.sum(1)[0])
    if not full and group is not None:  # one short group: any group size that holds it
        c = max(8, -(-c // 8) * 8)
    if counts.numel() and not bool((counts == c).all()):
        raise PruningError(f"every row must keep the same number of weights in each group of {g} columns")
    if group is not None and c % 8:
        raise PruningError(f"a grouped scheme keeps a multiple of 8 weights per group of {group}, got {c}")
    rest = mask[:, full * g :].sum(1)
    if rest.numel() and (not bool((rest == rest[0]).all()) or int(rest[0]) > c):
        raise PruningError(f"every row must keep the same number (at most {c}) in the last, shorter group")
    return c


@dataclass
class SparseWeight(WeightShape):
    """A pruned weight: see the module docstring. ``shape`` is the original weight's shape."""

    shape: tuple[int, ...]
    mask: torch.Tensor
    kept: QWeight | torch.Tensor
    scheme: Scheme | None = None  # the dense weight's scheme (its group size over the original columns)

    @property
    def sparsity(self) -> float:
        """The fraction of weights removed."""
        k_kept = self.kept.cols if isinstance(self.kept, QWeight) else self.kept.shape[1]
        return 1 - k_kept / self.cols

    @property
    def nbytes(self) -> int:
        """Bytes stored: the mask plus the kept weights' tensors."""
        kept = self.kept.nbytes if isinstance(self.kept, QWeight) else self.kept.numel() * self.kept.element_size()
        return self.mask.numel() * self.mask.element_size() + kept

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the original (dense) shape."""
        return 8.0 * self.nbytes / self.numel

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor, scheme: Scheme | None = None, *,
                   float_dtype: torch.dtype = torch.float16, name: str = "weight") -> SparseWeight:  # fmt: skip
        """Store ``w`` (any shape ``(N, ...)``, flattened to ``(N, K)``) where ``mask`` (bool
        ``(N, K)``) is set: the kept weights quantized by ``scheme`` (its groups counted over the
        original columns, see the module docstring), or kept as ``float_dtype`` without one.
        Raises :class:`~lowbit.algorithms.pruning.PruningError` for a mask without equal counts
        per row and group, :class:`~lowbit.primitives.NonFiniteError` for NaN/Inf weights."""
        check_finite(w, name)
        w2 = w.detach().reshape(w.shape[0], -1).float()
        if mask.shape != w2.shape or mask.dtype != torch.bool:
            raise PruningError(f"{name}: the mask must be bool {tuple(w2.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        c = _check_mask(mask, None if scheme is None or scheme.per_tensor else scheme.group_size)
        kept = w2[mask].reshape(w2.shape[0], -1)
        if scheme is None:
            kept_w: QWeight | torch.Tensor = kept.to(float_dtype)
        else:
            kept_w = QWeight.from_float(kept, kept_scheme(scheme, c), name=name, check=False)
        return cls(tuple(w.shape), pack_mask(mask), kept_w, scheme)

    @classmethod
    def from_qweight(cls, qw: QWeight, mask: torch.Tensor) -> SparseWeight:
        """Keep only ``mask``'s entries of a dense QWeight (row layout) whose removed weights are
        to be dropped (e.g. SparseGPT's joint result): the kept codes (or stored floats) with their
        groups' scales, exactly. ``mask`` bool ``(N, K)`` with equal counts per row and group."""
        qw = qw.to_layout("rows")
        group = None if qw.scheme.per_tensor else qw.scheme.group_size
        c = _check_mask(mask, group)
        if qw.scheme.fmt.kind == "float":  # casts and scaled floats: the stored values themselves
            data = qw.data[mask].reshape(qw.rows, -1)
            kept = QWeight(kept_scheme(qw.scheme, c), (qw.rows, data.shape[1]), data, qw.scale, qw.zero)
            return cls(tuple(qw.shape), pack_mask(mask), kept, qw.scheme)
        codes = qw.codes()[mask].reshape(qw.rows, -1)
        qp = qw.qparams()
        ng = -(-codes.shape[1] // c) if group is not None and codes.shape[1] else qp.scale.shape[1]
        qp = QParams(qp.scale[:, :ng], None if qp.zero is None else qp.zero[:, :ng])  # a last group left empty
        kept = QWeight.from_codes((qw.rows, codes.shape[1]), kept_scheme(qw.scheme, c), codes, qp)
        return cls(tuple(qw.shape), pack_mask(mask), kept, qw.scheme)

    def to_qweight(self) -> QWeight:
        """The dense weight as a :class:`QWeight` of the original scheme and shape (row layout):
        the kept codes in place and, at every removed position, the code whose value is exactly 0
        (the zero point of an asymmetric group, the middle code of a symmetric one, a codebook's 0
        level), so a dense kernel computes exactly :meth:`dequantize`'s weight. Raises
        :class:`~lowbit.algorithms.pruning.PruningError` for kept weights in float (no scheme) or a
        scheme with no exact 0 (fractional zero points, e.g. HQQ's)."""
        if self.scheme is None or not isinstance(self.kept, QWeight):
            raise PruningError("kept weights stored in float have no dense quantized form")
        mask, n, k = self.dense_mask(), self.rows, self.cols
        if self.scheme.fmt.kind == "float":
            data = torch.zeros(n, k, dtype=self.kept.data.dtype)
            data[mask] = self.kept.data.reshape(-1)
            return QWeight(self.scheme, self.shape, data, self.kept.scale, self.kept.zero)
        scales, zeros = self.kept.scales(), self.kept.zero_points()
        ng = 1 if self.scheme.per_tensor or self.scheme.group_size is None else -(-k // self.scheme.group_size)
        if scales.shape[1] < ng:  # the last, shorter group kept nothing: any scale, 0 at code 0
            scales = torch.cat([scales, torch.ones(scales.shape[0], ng - scales.shape[1])], 1)
            zeros = None if zeros is None else torch.cat([zeros, torch.zeros(zeros.shape[0], ng - zeros.shape[1])], 1)
        qp = QParams(scales, zeros)
        rows = qp.scale.shape[0]
        zero_codes = quantize_codes(torch.zeros(rows, k), qp, self.scheme)  # (R, K): the code of 0 per column
        if bool(dequantize_codes(zero_codes, qp, self.scheme).ne(0).any()):
            raise PruningError(f"{self.scheme} with these zero points has no code for exactly 0 (fractional zero "
                               "points): a pruned weight must use integer zero points or a symmetric scheme")  # fmt: skip
        codes = zero_codes.expand(n, k).clone()
        codes[mask] = self.kept.codes().reshape(-1)
        return QWeight.from_codes(self.shape, self.scheme, codes, qp)

    def dense_mask(self) -> torch.Tensor:
        """bool ``(N, K)``: the kept positions."""
        return unpack_mask(self.mask, self.cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight in its original shape: kept values in place, zeros elsewhere."""
        kept = self.kept.dequantize(torch.float32) if isinstance(self.kept, QWeight) else self.kept.float()
        out = torch.zeros(self.rows, self.cols)
        out[self.dense_mask()] = kept.reshape(-1)
        return out.reshape(self.shape).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors by suffix: ``mask`` and the kept weights' (``qweight``, ``scales``, ``zeros``;
        ``weight`` when kept in float)."""
        kept = self.kept.tensors() if isinstance(self.kept, QWeight) else {"weight": self.kept}
        return {"mask": self.mask, **kept}
