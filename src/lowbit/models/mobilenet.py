"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018),
written here with the parameter names of torchvision's ImageNet state dict so that its published
weights load as they are (no torchvision needed).

Layout (``features`` is one ``nn.Sequential``):

* ``features.0``: conv 3x3 stride 2, 3 -> 32, BatchNorm, ReLU6 (``.0`` conv, ``.1`` BN).
* ``features.1 .. 17``: inverted residual blocks, each ``.conv`` a Sequential of: an optional 1x1
  expansion (conv + BN + ReLU6), a 3x3 depthwise conv (groups = channels) + BN + ReLU6, and a 1x1
  linear projection conv + BN (no activation); the input is added back when the stride is 1 and
  the channel count is unchanged. Settings (expansion t, channels c, repeats n, first stride s):
  (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
  (6, 320, 1, 1).
* ``features.18``: conv 1x1, 320 -> 1280, BN, ReLU6.
* global average pool, then ``classifier`` = Dropout(0.2), Linear(1280, 1000).

Input: ``(B, 3, H, W)`` float images normalised with the ImageNet mean/std (:data:`MEAN`,
:data:`STD`), 224x224 as trained. Output: ``(B, 1000)`` logits.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MobileNetV2", "MEAN", "STD", "SETTINGS"]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """``x (B, cin, H, W)`` -> ``(B, cout, H / stride, W / stride)``."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


class MobileNetV2(nn.Module):
    """ImageNet MobileNetV2 (width 1.0): ``(B, 3, H, W)`` -> ``(B, num_classes)`` logits."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        feats: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(_conv_bn_relu6(cin, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)
