"""Classification accuracy on labelled data, and agreement with a reference model."""

from __future__ import annotations

import torch

__all__ = ["accuracy", "agreement"]


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on inputs ``x (n, ...)`` with labels ``y (n,)``."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    return correct / len(y)


@torch.no_grad()
def agreement(model, reference, x: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of inputs where ``model``'s top-1 class equals ``reference``'s."""
    same = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        same += int((model(xb).argmax(-1) == reference(xb).argmax(-1)).sum())
    return same / len(x)
