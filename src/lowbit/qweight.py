"""QWeight: one quantized weight as stored: packed codes + scales + zero points + shape + scheme.

Tensors (``N`` output channels, ``K`` input columns after flattening, ``ng = ceil(K / G)``,
``R = 1`` for per-tensor schemes else ``N``):

* ``data``: affine/codebook formats: ``(N, packed_row_bytes(K, bits))`` uint8, rows packed as
  :mod:`lowbit.packing` describes; scaled/cast floats: ``(N, K)`` in the format's dtype.
* ``scale``: ``(R, ng)`` in the format's ``scale_dtype`` (``None`` for plain casts).
* ``zero``: ``None`` for symmetric schemes (implicit ``2**(bits-1)``); for asymmetric ones
  either integer zero points bit-packed like the codes, ``(R, packed_row_bytes(ng, bits))``
  uint8, or fractional ones (e.g. from HQQ) as ``(R, ng)`` float16.

``nbytes`` counts exactly these tensors' bytes: what the safetensors file stores for the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import packing
from .primitives import (
    QParams,
    check_finite,
    choose_qparams,
    dequantize_codes,
    dequantize_float,
    quantize_codes,
    quantize_float,
)
from .scheme import Scheme

__all__ = ["QWeight"]


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class QWeight:
    """A quantized weight; see the module docstring for the tensors' layouts."""

    scheme: Scheme
    shape: tuple[int, ...]
    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None

    # ---- geometry ---------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_groups(self) -> int:
        if self.scheme.per_tensor:
            return 1
        g = self.scheme.group_size
        return 1 if g is None else -(-self.cols // g)

    @property
    def nbytes(self) -> int:
        """Bytes stored for this weight: codes + scales + zero points."""
        return _nbytes(self.data) + _nbytes(self.scale) + _nbytes(self.zero)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls, w: torch.Tensor, scheme: Scheme, qp: QParams | None = None, *, name: str = "weight", check: bool = True
    ) -> "QWeight":
        """Quantize ``w`` (any shape ``(N, ...)``; flattened to ``(N, K)``) with ``qp`` or min/max.

        ``check=False`` skips the NaN/Inf check for callers that already made it.
        """
        if check:
            check_finite(w, name)
        w2 = w.detach().reshape(w.shape[0], -1).float()
        fmt = scheme.fmt
        if scheme.is_cast:
            return cls(scheme, tuple(w.shape), quantize_float(w2, None, scheme))
        qp = qp if qp is not None else choose_qparams(w2, scheme)
        scale = qp.scale.to(fmt.scale_dtype)
        if fmt.kind == "float":
            return cls(scheme, tuple(w.shape), quantize_float(w2, qp, scheme), scale)
        codes = quantize_codes(w2, qp, scheme)
        zero = None
        if qp.zero is not None:
            if torch.equal(qp.zero, qp.zero.round()) and bool(((qp.zero >= 0) & (qp.zero <= fmt.qmax)).all()):
                zero = packing.pack(qp.zero.to(torch.uint8), fmt.bits)
            else:
                zero = qp.zero.to(torch.float16)
        return cls(scheme, tuple(w.shape), packing.pack(codes, fmt.bits), scale, zero)

    # ---- reading back -------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked codes ``(N, K)`` uint8 (affine and codebook formats)."""
        return packing.unpack(self.data, self.scheme.bits, self.cols)

    def zero_points(self) -> torch.Tensor | None:
        """Zero points ``(R, ng)`` float32, or ``None`` for symmetric schemes."""
        if self.zero is None:
            return None
        if self.zero.dtype == torch.uint8:
            return packing.unpack(self.zero, self.scheme.bits, self.n_groups).float()
        return self.zero.float()

    def qparams(self) -> QParams:
        return QParams(self.scale.float(), self.zero_points())

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
        """The tensors to store, by suffix: ``qweight``, ``scales``, ``zeros`` (present ones)."""
        out = {"qweight": self.data}
        if self.scale is not None:
            out["scales"] = self.scale
        if self.zero is not None:
            out["zeros"] = self.zero
        return out
