"""Glue for transformers models: where a per-channel activation scale can be folded.

AWQ and SmoothQuant divide a linear group's input channels by ``s`` and multiply the linears'
weight columns by ``s``. The division must be absorbed exactly by whatever produces the input:

* a norm (RMSNorm/LayerNorm computing ``weight * x_hat (+ bias)``) directly feeding the group:
  divide its weight (and bias);
* a gated MLP's ``down_proj`` reads ``act(gate_proj(x)) * up_proj(x)``: divide ``up_proj``'s output
  rows (and bias);
* attention's ``o_proj`` reads the heads' weighted sums of ``v_proj`` outputs: divide ``v_proj``'s
  output rows, only when every query head has its own value head (no grouped-query sharing).

The calibration driver checks numerically that each fold leaves its block computing what it did
before; a fold that does not (a post-norm block's LayerNorm also feeds the residual; norms of another
form, Gemma's ``(1 + weight)``) is undone, and its group is quantized without scales, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FoldTarget", "fold_target"]


@dataclass
class FoldTarget:
    """Tensors that absorb ``1/s``: ``rows`` are divided along dim 0, ``vectors`` elementwise."""

    rows: list[torch.Tensor]
    vectors: list[torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        return self.rows + self.vectors

    def divide(self, s: torch.Tensor) -> None:
        for t in self.rows:
            t.div_(s.reshape(-1, *([1] * (t.dim() - 1))))
        for t in self.vectors:
            t.div_(s)


def _norm_like(mod: nn.Module, k: int) -> bool:
    w = getattr(mod, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == k and "norm" in type(mod).__name__.lower()


def fold_target(block: nn.Module, group: list[str], producer: str | None) -> FoldTarget | None:
    """Where ``1/s`` for the linears ``group`` (names inside ``block``) goes, or None."""
    first = block.get_submodule(group[0])
    k = first.in_features
    if producer is not None:
        mod = block.get_submodule(producer)
        if _norm_like(mod, k):
            vecs = [mod.weight.data] + ([mod.bias.data] if getattr(mod, "bias", None) is not None else [])
            return FoldTarget([], vecs)
    parent_name, _, leaf = group[0].rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    if group == [f"{parent_name}.down_proj" if parent_name else "down_proj"] and hasattr(parent, "up_proj"):
        up = parent.up_proj
        if isinstance(up, nn.Linear) and up.out_features == k:
            return FoldTarget([up.weight.data] + ([up.bias.data] if up.bias is not None else []), [])
    if leaf == "o_proj" and len(group) == 1 and hasattr(parent, "v_proj"):
        v = parent.v_proj
        if isinstance(v, nn.Linear) and v.out_features == k:  # one value head per query head
            return FoldTarget([v.weight.data] + ([v.bias.data] if v.bias is not None else []), [])
    return None
