"""Memory calculator: what a model's weights take in each format, scales and zeros included.

Bits per weight of a scheme on rows of ``K`` input columns, group size ``G``:
``bits + 16 * ceil(K/G) / K`` (fp16 scales) ``+ bits * ceil(K/G) / K`` (packed zero points,
asymmetric only). Per-channel schemes carry one scale per row (``16 / K``); when ``K`` is not
known the group term uses ``K -> infinity`` for per-channel and ``K = multiple of G`` for
groups. Weights only: activations, KV cache and runtime buffers are not included.

The common "70B needs 140 GB" figure is FP16 (2 bytes/weight); FP32 is 280 GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .packing import packed_row_bytes
from .scheme import Scheme, parse_scheme

__all__ = ["estimate", "bits_per_weight", "Estimate"]


def bits_per_weight(scheme: str | Scheme, in_features: int | None = None) -> float:
    """Stored bits per weight of ``scheme`` for rows of ``in_features`` columns.

    With ``in_features`` the figure is byte-exact per row (bit-packing units included), as a
    :class:`~lowbit.qweight.QWeight` stores it; without, the asymptotic formula of the docstring.
    """
    s = parse_scheme(scheme)
    fmt = s.fmt
    if s.is_cast or s.per_tensor:
        return float(fmt.bits)
    scale_bytes = fmt.scale_dtype.itemsize
    zero_bits = 0 if s.symmetric else fmt.bits
    if in_features is None:
        per_col = 0.0 if s.group_size is None else 1.0 / s.group_size
        return fmt.bits + per_col * (8 * scale_bytes + zero_bits)
    k = in_features
    ng = 1 if s.group_size is None else math.ceil(k / s.group_size)
    if fmt.kind == "float":
        row = k * fmt.bits // 8 + ng * scale_bytes
    else:
        row = packed_row_bytes(k, fmt.bits) + ng * scale_bytes
        row += 0 if s.symmetric else packed_row_bytes(ng, fmt.bits)
    return 8.0 * row / k


@dataclass
class Estimate:
    """Rows of (label, bits per weight, bytes) for a parameter count."""

    params: float
    rows: list[tuple[str, float, float]]
    note: str = ""

    def table(self) -> str:
        lines = [f"weights: {self.params / 1e9:.3g}B parameters", f"{'format':<16}{'bits/weight':>12}{'GB':>10}{'GiB':>10}"]
        for label, bpw, nbytes in self.rows:
            lines.append(f"{label:<16}{bpw:>12.3f}{nbytes / 1e9:>10.2f}{nbytes / 2**30:>10.2f}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _count(model: nn.Module) -> tuple[int, int, int | None]:
    """(all params, params of linear/conv weights, their most common in_features)."""
    total = sum(p.numel() for p in model.parameters())
    lin = 0
    widths: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            lin += m.weight.numel()
            k = m.weight[0].numel()
            widths[k] = widths.get(k, 0) + m.weight.numel()
    return total, lin, (max(widths, key=widths.get) if widths else None)


def estimate(
    params: float | None = None,
    scheme: str | Scheme = "w4g128",
    *,
    model: nn.Module | None = None,
    in_features: int | None = None,
) -> Estimate:
    """Weight memory of ``params`` parameters (or of ``model``) in FP32, FP16, INT8, INT4 and ``scheme``.

    With ``model``, only Linear/Conv2d weights take the quantized formats; other parameters
    (embeddings, norms, biases) are counted at FP16 in the quantized rows, as lowbit keeps them.
    """
    if (params is None) == (model is None):
        raise ValueError("give either params= or model=")
    s = parse_scheme(scheme)
    if model is not None:
        total, quantizable, k = _count(model)
        in_features = in_features or k
        rest = total - quantizable
    else:
        total, quantizable, rest = float(params), float(params), 0.0
        if total <= 0:
            raise ValueError(f"params must be positive, got {params}")
    rows: list[tuple[str, float, float]] = [("fp32", 32.0, 4.0 * total), ("fp16/bf16", 16.0, 2.0 * total)]
    wanted = [("int8", "int8"), ("int4 (w4g128)", "w4g128")]
    if str(s) not in ("int8", "w4g128"):
        wanted.append((str(s), str(s)))
    for label, sch in wanted:
        bpw = bits_per_weight(sch, in_features)
        nbytes = quantizable * bpw / 8 + rest * 2.0
        rows.append((label, nbytes * 8 / total, nbytes))
    note = "" if model is None else f"({quantizable / total:.1%} of parameters are Linear/Conv weights; the rest counted at FP16)"
    return Estimate(float(total), rows, note)
