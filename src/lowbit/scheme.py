"""Scheme: what one layer is stored as, and the one place its string grammar is parsed.

Grammar (every canonical string prints back identically; aliases normalise)::

    scheme  := "fp16" | "bf16" | "fp8" | "int8"
             | "nf4" ["g" GROUP]
             | "w" BITS ["g" GROUP] ["a8" ["g" AGROUP]] ["-asym"] ["-tensor"] ["-static"]
    BITS    := 2 | 3 | 4 | 8
    GROUP   := a multiple of 8, >= 8
    AGROUP  := a multiple of 32, >= 32

* ``w4g128``: 4-bit weights, one scale per 128 input columns, symmetric.
* no ``g``: one scale per output channel (``w8`` = ``int8``: per-channel symmetric int8).
* ``-tensor``: one scale for the whole tensor (no group allowed with it).
* ``-asym``: a zero point per group as well as a scale.
* ``a8``: int8 activations too, dynamic (per token) unless ``-static`` (calibrated).
* ``a8g64``: dynamic int8 activations with one scale per token *and* per 64 input columns
  (finer than one per token: an outlier channel only coarsens its own block). With a weight
  group as well (``w8g128a8g64``), one of the two group sizes must divide the other.
* ``nf4`` alone means ``nf4g64``; ``fp8`` is FP8 E4M3 with a per-channel scale.

A group size that does not divide a layer's input features is allowed: the last group is
shorter (it covers ``in_features % group`` columns), exactly as if the row were zero-padded
to a whole group with padding that is never stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .formats import Format, get_format

__all__ = ["Scheme", "SchemeError", "parse_scheme", "PRESETS", "GRAMMAR"]

GRAMMAR = (
    "scheme := fp16 | bf16 | fp8 | int8 | nf4[g<group>] | "
    "w<bits>[g<group>][a8[g<agroup>]][-asym][-tensor][-static]   "
    "(bits: 2, 3, 4, 8; group: a multiple of 8; agroup: a multiple of 32; examples: int8, w8a8, w8a8g64, "
    "w8a8-static, w4g128, "
    "w4g64-asym, w3g64, w2g32-asym, nf4g64, fp8, bf16)"
)

_WEIGHT_BITS = (2, 3, 4, 8)

_RE = re.compile(
    r"""^(?:
        (?P<cast>fp16|bf16|fp8|int8)
      | nf4(?:g(?P<nfgroup>\d+))?
      | w(?P<bits>\d+)(?:g(?P<group>\d+))?(?:a(?P<abits>\d+)(?:g(?P<agroup>\d+))?)?
        (?P<asym>-asym)?(?P<tensor>-tensor)?(?P<static>-static)?
    )$""",
    re.VERBOSE,
)


class SchemeError(ValueError):
    """A scheme string or combination that lowbit cannot represent."""


@dataclass(frozen=True)
class Scheme:
    """How one layer's weight (and optionally its input activations) is quantized.

    Attributes:
        format: name of a row of :data:`lowbit.formats.FORMATS`.
        group_size: input columns per scale; ``None`` means one scale per output channel
            (or, with ``per_tensor``, one for the whole tensor).
        symmetric: ``True``: the zero point is implicit; ``False``: a zero point per group.
        per_tensor: one scale for the whole weight.
        act_bits: ``None`` (weight-only) or 8 (int8 activations).
        act_static: activations use calibrated (static) ranges rather than per-token ones.
        act_group: dynamic activations only: input columns per activation scale within a
            token (``None``: one scale per token).
    """

    format: str
    group_size: int | None = None
    symmetric: bool = True
    per_tensor: bool = False
    act_bits: int | None = None
    act_static: bool = False
    act_group: int | None = None

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        if self.group_size is not None:
            if self.group_size < 8 or self.group_size % 8:
                raise SchemeError(f"group size must be a multiple of 8 and >= 8, got {self.group_size}")
            if self.per_tensor:
                raise SchemeError("a scheme is per-tensor or grouped, not both")
        if fmt.kind == "float" and fmt.scale_dtype is None:
            if self.group_size is not None or not self.symmetric or self.act_bits or self.per_tensor:
                raise SchemeError(f"{fmt.name} is a plain cast: it takes no groups, zero points or activations")
        if fmt.kind != "affine" and not self.symmetric:
            raise SchemeError(f"{fmt.name} has no zero point (-asym applies to integer formats)")
        if fmt.kind != "affine" and (self.act_bits or self.per_tensor):
            raise SchemeError(f"{fmt.name} weights take no activation quantization or per-tensor scale")
        if fmt.kind == "codebook" and self.group_size is None:
            raise SchemeError(f"{fmt.name} needs a group size")
        if fmt.kind == "float" and fmt.scale_dtype is not None and self.group_size is not None:
            raise SchemeError(f"{fmt.name} has one scale per output channel; it takes no group size")
        if self.act_bits not in (None, 8):
            raise SchemeError(f"only int8 activations are supported (a8), got a{self.act_bits}")
        if self.act_static and self.act_bits is None:
            raise SchemeError("-static needs quantized activations (a8)")
        if self.act_group is not None:
            if self.act_bits is None:
                raise SchemeError("an activation group needs quantized activations (a8g<group>)")
            if self.act_group < 32 or self.act_group % 32:
                raise SchemeError(f"activation group must be a multiple of 32 and >= 32, got {self.act_group}")
            if self.act_static:
                raise SchemeError("activation groups apply to dynamic activations, not -static")
            if self.per_tensor:
                raise SchemeError("activation groups need per-channel or grouped weights, not -tensor")
            g, a = self.group_size, self.act_group
            if g is not None and max(g, a) % min(g, a):
                raise SchemeError(f"weight group {g} and activation group {a}: one must divide the other")

    # ---- derived -----------------------------------------------------------------------------
    @property
    def fmt(self) -> Format:
        """The :class:`~lowbit.formats.Format` row."""
        return get_format(self.format)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def is_cast(self) -> bool:
        """True for plain casts (fp16, bf16) that carry no scale."""
        return self.fmt.kind == "float" and self.fmt.scale_dtype is None

    @property
    def granularity(self) -> str:
        """``"tensor"``, ``"channel"`` or ``"group"``."""
        if self.per_tensor:
            return "tensor"
        return "channel" if self.group_size is None else "group"

    # ---- the grammar, printed back ------------------------------------------------------------
    def __str__(self) -> str:
        fmt = self.fmt
        if self.is_cast:
            return fmt.name
        if fmt.kind == "float":  # scaled float: fp8, per channel (__post_init__ allows nothing else)
            return "fp8"
        if fmt.kind == "codebook":
            return f"{fmt.name}g{self.group_size}"
        if (
            fmt.bits == 8
            and self.group_size is None
            and self.symmetric
            and not self.per_tensor
            and self.act_bits is None
        ):
            return "int8"
        s = f"w{fmt.bits}"
        if self.group_size is not None:
            s += f"g{self.group_size}"
        if self.act_bits:
            s += f"a{self.act_bits}"
            if self.act_group is not None:
                s += f"g{self.act_group}"
        if not self.symmetric:
            s += "-asym"
        if self.per_tensor:
            s += "-tensor"
        if self.act_static:
            s += "-static"
        return s

    def to_json(self) -> str:
        return str(self)


def parse_scheme(text: str | Scheme) -> Scheme:
    """Parse a scheme string (see the module docstring); a :class:`Scheme` passes through.

    Raises:
        SchemeError: with the grammar, for anything that is not a scheme.
    """
    if isinstance(text, Scheme):
        return text
    if not isinstance(text, str):
        raise SchemeError(f"a scheme is a string, got {type(text).__name__}. {GRAMMAR}")
    s = text.strip().lower()
    m = _RE.match(s)
    if not m:
        raise SchemeError(f"cannot parse scheme {text!r}. {GRAMMAR}")
    try:
        if m["cast"]:
            return {
                "fp16": Scheme("fp16"),
                "bf16": Scheme("bf16"),
                "fp8": Scheme("fp8_e4m3"),
                "int8": Scheme("int8"),
            }[m["cast"]]
        if s.startswith("nf4"):
            return Scheme("nf4", group_size=int(m["nfgroup"]) if m["nfgroup"] else 64)
        bits = int(m["bits"])
        if bits not in _WEIGHT_BITS:
            raise SchemeError(f"weights can be {', '.join(map(str, _WEIGHT_BITS))} bits, got w{bits}")
        return Scheme(
            f"int{bits}",
            group_size=int(m["group"]) if m["group"] else None,
            symmetric=not m["asym"],
            per_tensor=bool(m["tensor"]),
            act_bits=int(m["abits"]) if m["abits"] else None,
            act_static=bool(m["static"]),
            act_group=int(m["agroup"]) if m["agroup"] else None,
        )
    except SchemeError as e:
        raise SchemeError(f"invalid scheme {text!r}: {e}. {GRAMMAR}") from None


# Named weight schemes shown by the CLI and looped over by the tests (all canonical strings).
PRESETS: tuple[str, ...] = (
    "fp16",
    "bf16",
    "fp8",
    "int8",
    "w8g128",
    "w8-tensor",
    "w4g128",
    "w4g128-asym",
    "w4g64",
    "w4g64-asym",
    "w4g32",
    "w3g64",
    "w3g64-asym",
    "w2g64-asym",
    "w2g32-asym",
    "nf4g64",
)
