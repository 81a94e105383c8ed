"""Number formats as one table (DESIGN principle 1: formats are data).

Every format lowbit can store is one row of :data:`FORMATS`. The CLI's choices, the docs table
and the test loops are generated from this table, so a new format is one row here plus, if its
storage is new, its pack/unpack in :mod:`lowbit.packing`.

Three kinds of format:

``affine``
    ``bits``-bit unsigned integer codes ``q`` in ``[0, 2**bits - 1]`` mapped to reals by a scale
    and a zero point: ``x ≈ scale * (q - zero)``. Symmetric schemes use the implicit zero
    ``2**(bits-1)`` (so the signed value is ``q - 2**(bits-1)``); asymmetric schemes store one
    zero per group. Codes are bit-packed (:mod:`lowbit.packing`).
``codebook``
    ``bits``-bit indices into a fixed table of reals in ``[-1, 1]``, times a per-group absmax
    scale: ``x ≈ scale * codebook[q]``.
``float``
    A narrower IEEE-like float. ``scaled`` floats (fp8) carry a per-channel scale so the weight's
    range fills the format's; plain casts (fp16, bf16) carry none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Format", "FORMATS", "get_format", "NF4_CODEBOOK"]

# The 16 NormalFloat-4 levels: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero.
# Values as published with QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of
# Quantized LLMs", Appendix E).
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclass(frozen=True)
class Format:
    """One row of the format table.

    Attributes:
        name: the format's name as printed in tables (``int4``, ``nf4``, ``fp8_e4m3`` ...).
        kind: ``"affine"``, ``"codebook"`` or ``"float"`` (see the module docstring).
        bits: bits per stored element (before scales and zeros).
        storage: how elements are stored: ``"packed"`` (bit-packed uint8, see
            :mod:`lowbit.packing`) or the name of a torch dtype.
        scale_dtype: dtype of the stored scales, ``None`` when the format has no scale.
        codebook: the table of levels for ``codebook`` formats.
        max_value: the largest finite magnitude of a scaled float format (fp8: 448).
        sym_range: affine formats, symmetric schemes: how a group's scale is chosen.
            ``"full"``: the group's value of largest magnitude, sign included, lands exactly on
            the most negative code, ``s = m / -2**(bits-1)``, so all ``2**bits`` levels are used
            (ggml's Q4_0 choice). ``"restricted"``: ``s = max|x| / (2**(bits-1) - 1)``, codes
            ``±(2**(bits-1) - 1)`` (Q8_0's, ONNX's and compressed-tensors' int8 choice). Both
            dequantize as ``s * (q - 2**(bits-1))``, so stored files read the same either way;
            the choice per bit width is measured (BENCHMARKS.md, ``--sections sym_range``).
        doc: one line for the docs table.
    """

    name: str
    kind: str
    bits: int
    storage: str
    scale_dtype: torch.dtype | None
    codebook: tuple[float, ...] | None = None
    max_value: float | None = None
    sym_range: str = "full"
    doc: str = ""

    @property
    def levels(self) -> int:
        """Number of distinct codes (``2**bits``) for affine and codebook formats."""
        return 1 << self.bits

    @property
    def qmax(self) -> int:
        """Largest unsigned code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The implicit zero point of symmetric affine schemes, ``2**(bits-1)``."""
        return 1 << (self.bits - 1)

    @property
    def sym_qmax(self) -> int:
        """Symmetric schemes: the signed code the group's largest magnitude maps to (its sign
        flipped for ``"full"``): ``2**(bits-1)`` for ``"full"``, ``2**(bits-1) - 1`` for
        ``"restricted"``."""
        return self.sym_zero if self.sym_range == "full" else self.sym_zero - 1

    @property
    def torch_dtype(self) -> torch.dtype:
        """Storage dtype for ``float`` formats."""
        if self.kind != "float":
            raise TypeError(f"format {self.name} is not a float format")
        return getattr(torch, self.storage)


def _affine(bits: int, doc: str, sym_range: str = "full") -> Format:
    return Format(f"int{bits}", "affine", bits, "packed", torch.float16, sym_range=sym_range, doc=doc)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        # +-127 at 8 bits: the 256th level is worth nothing there and the clamp of the opposite
        # extreme costs (BENCHMARKS.md, "Symmetric scale convention"); Q8_0's choice too
        _affine(8, "8-bit integer codes, per-channel or per-group scale", sym_range="restricted"),
        _affine(4, "4-bit integer codes, two per byte"),
        _affine(3, "3-bit integer codes, eight per three bytes"),
        _affine(2, "2-bit integer codes, four per byte"),
        Format(
            "nf4",
            "codebook",
            4,
            "packed",
            torch.float16,
            codebook=NF4_CODEBOOK,
            doc="NormalFloat-4 levels (QLoRA) times a per-group absmax scale",
        ),
        Format(
            "fp8_e4m3",
            "float",
            8,
            "float8_e4m3fn",
            torch.float32,
            max_value=448.0,
            doc="FP8 E4M3 with a per-channel scale",
        ),
        Format("fp16", "float", 16, "float16", None, doc="IEEE half precision cast"),
        Format("bf16", "float", 16, "bfloat16", None, doc="bfloat16 cast"),
    )
}


def get_format(name: str) -> Format:
    """Return the row named ``name``; unknown names raise ``KeyError`` listing the table."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None
