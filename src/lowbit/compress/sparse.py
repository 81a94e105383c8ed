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
from dataclasses import dataclass

import torch

from ..algorithms.pruning import PruningError, check_sparsity
from ..primitives import check_finite
from ..qweight import QWeight, WeightShape
from ..scheme import Scheme

__all__ = ["SparseWeight", "pack_mask", "unpack_mask", "group_keep", "kept_scheme"]

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``(N, K)`` -> uint8 ``(N, ceil(K / 8))``, column ``j`` in bit ``j % 8`` of byte ``j // 8``."""
    n, k = mask.shape
    pad = -k % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(n, -1, 8)
    return (m * _BITS).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 ``(N, ceil(K / 8))`` -> bool ``(N, K)`` (inverse of :func:`pack_mask`)."""
    bits = (packed.unsqueeze(-1) & _BITS) != 0
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


def _check_mask(mask: torch.Tensor, group: int | None) -> int:
    """The per-group kept count ``c`` of a mask that has one (every row, every full group: the same
    count, a multiple of 8 when grouped; the last group no more); :class:`PruningError` otherwise."""
    n, k = mask.shape
    g = k if group is None else group
    full = k // g
    counts = mask[:, : full * g].reshape(n, full, g).sum(-1) if full else torch.zeros(n, 0, dtype=torch.long)
    c = int(counts.flatten()[0]) if counts.numel() else int(mask.sum(1)[0])
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
        return cls(tuple(w.shape), pack_mask(mask), kept_w)

    @classmethod
    def from_qweight(cls, qw: QWeight, mask: torch.Tensor) -> SparseWeight:
        """Keep only ``mask``'s codes of a dense QWeight whose removed weights are to be dropped
        (e.g. SparseGPT's joint result): the kept codes with their groups' scales, exactly.
        ``mask`` bool ``(N, K)`` with equal counts per row and group."""
        group = None if qw.scheme.per_tensor else qw.scheme.group_size
        c = _check_mask(mask, group)
        codes = qw.codes()[mask].reshape(qw.rows, -1)
        qp = qw.qparams()
        kept = QWeight.from_codes((qw.rows, codes.shape[1]), kept_scheme(qw.scheme, c), codes, qp)
        return cls(tuple(qw.shape), pack_mask(mask), kept)

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
