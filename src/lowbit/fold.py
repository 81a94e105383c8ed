"""BatchNorm folding: merge an inference-mode BatchNorm into the convolution (or linear) before it.

For ``y = BN(conv(x))`` with per-channel ``gamma, beta, mean, var, eps``, let
``k = gamma / sqrt(var + eps)``; then ``y = conv'(x)`` with ``W' = W * k`` (per output channel)
and ``b' = (b - mean) * k + beta``. Quantizing ``W'`` rather than ``W`` is what deployment
runs, so a static INT8 model folds first (the scale ``k`` can differ by 100x between channels,
which is why per-channel weight scales matter).

Pairs are found inside ``nn.Sequential`` containers (a conv/linear immediately followed by its
BatchNorm), which covers torchvision-style CNNs such as MobileNetV2; the BatchNorm is replaced
by ``nn.Identity``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fold_batchnorm", "batchnorm_pairs", "fold_pair", "FoldError"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


class FoldError(ValueError):
    """A BatchNorm that cannot be folded (training mode, mismatched channels)."""


def _check_pair(layer: nn.Module, bn: nn.Module, name: str) -> None:
    """Raise :class:`FoldError` unless ``bn`` (named ``name``) can fold into ``layer``."""
    if bn.training:
        raise FoldError(f"{name}: BatchNorm is in training mode; call model.eval() before folding or converting")
    if bn.running_mean is None or bn.running_var is None:
        raise FoldError(f"{name}: BatchNorm tracks no running statistics; nothing to fold")
    out = layer.weight.shape[0]
    if bn.num_features != out:
        raise FoldError(f"{name}: BatchNorm has {bn.num_features} channels, the layer before it {out}")


@torch.no_grad()
def fold_pair(layer: nn.Module, bn: nn.Module, name: str) -> None:
    """Fold ``bn`` (named ``name``, for errors) into ``layer``'s weight and bias, in place."""
    _check_pair(layer, bn, name)
    k = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.double()
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(k)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(k)
    w = layer.weight.double() * k.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    new_b = (b - bn.running_mean.double()) * k + beta
    layer.weight.copy_(w.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(new_b.to(layer.bias.dtype))


def batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer name, BatchNorm name)`` for every BatchNorm that directly follows a Conv2d or
    Linear inside an ``nn.Sequential`` of ``model``."""
    pairs = []
    for pname, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        children = list(mod.named_children())
        for (a_name, first), (b_name, second) in zip(children, children[1:]):
            if isinstance(second, _BN) and isinstance(first, (nn.Conv2d, nn.Linear)):
                prefix = f"{pname}." if pname else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]] | None = None) -> list[str]:
    """Fold BatchNorms into the layers before them, in place, and replace them by ``nn.Identity``:
    ``pairs`` (from :func:`batchnorm_pairs`, the default: all of them). Returns the folded
    BatchNorms' names. Raises :class:`FoldError` (with the model unchanged) if any of them cannot
    fold (training mode, no running statistics, a channel count that differs from its layer's)."""
    pairs = batchnorm_pairs(model) if pairs is None else pairs
    for layer_name, bn_name in pairs:  # check all before changing any
        _check_pair(model.get_submodule(layer_name), model.get_submodule(bn_name), bn_name)
    for layer_name, bn_name in pairs:
        fold_pair(model.get_submodule(layer_name), model.get_submodule(bn_name), bn_name)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    return [b for _, b in pairs]
