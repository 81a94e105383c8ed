"""Quantization algorithms: pure math on tensors, one file each (DESIGN principle 2).

Each algorithm turns a float weight (plus, for calibrated methods, statistics of its inputs)
into a :class:`~lowbit.qweight.QWeight`. Hooks, data and module swapping live in the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import rtn

__all__ = ["Algorithm", "ALGORITHMS", "get_algorithm"]


@dataclass(frozen=True)
class Algorithm:
    name: str
    quantize_weight: Callable
    uses_calibration: bool
    options: dict[str, tuple] = field(default_factory=dict)  # option -> allowed values
    doc: str = ""

    def check_options(self, options: dict) -> dict:
        """Validate keyword options for this method; unknown ones raise ``ValueError``."""
        for key, value in options.items():
            if key not in self.options:
                allowed = ", ".join(self.options) or "none"
                raise ValueError(f"method {self.name!r} takes no option {key!r} (options: {allowed})")
            if value not in self.options[key]:
                raise ValueError(f"{key}={value!r} for {self.name!r}; choose from {self.options[key]}")
        return dict(options)


ALGORITHMS: dict[str, Algorithm] = {
    "rtn": Algorithm(
        "rtn",
        rtn.quantize_weight,
        uses_calibration=False,
        options={"clip": rtn.CLIP_CHOICES},
        doc="round to nearest; data-free; clip='mse' searches per-group clipping",
    ),
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(ALGORITHMS)}") from None
