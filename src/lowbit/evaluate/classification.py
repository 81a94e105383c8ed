"""Classification accuracy on labelled data, and agreement with a reference model."""

from __future__ import annotations

import torch

__all__ = ["accuracy", "agreement", "logits_of", "confident_agreement"]


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


@torch.no_grad()
def logits_of(model, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``model``'s float32 outputs on ``x (n, ...)``: ``(n, classes)``."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def confident_agreement(ref_logits: torch.Tensor, logits: torch.Tensor, min_conf: float = 0.5) -> dict:
    """Top-1 agreement with a reference model on the inputs where the reference is confident
    (top probability >= ``min_conf``: near-ties flip on noise and say nothing), and the mean
    KL(reference || model) over all inputs. Both ``(n, classes)`` logits."""
    log_ref = ref_logits.float().log_softmax(-1)
    ref = log_ref.exp()
    conf = ref.amax(-1) >= min_conf
    same = ref_logits.argmax(-1) == logits.argmax(-1)
    kl = (ref * (log_ref - logits.float().log_softmax(-1))).sum(-1)
    return {
        "confident": int(conf.sum()),
        "agreement": float(same[conf].float().mean()) if bool(conf.any()) else float("nan"),
        "agreement_all": float(same.float().mean()),
        "mean_kl": float(kl.mean()),
    }
