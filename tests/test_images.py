"""Bundled-photo crops for unlabelled image evaluation, and confident top-1 agreement / KL."""

import math

import pytest
import torch

from lowbit.evaluate.classification import confident_agreement

pytest.importorskip("skimage")


def test_photo_crops_are_deterministic_normalised_and_split():
    from lowbit.evaluate.images import PHOTOS, photo_crops

    a = photo_crops(12, size=64)
    assert a.shape == (12, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, photo_crops(12, size=64))  # same seed, same views
    calib = photo_crops(12, size=64, split="calib")
    assert not torch.allclose(a, calib)  # calibration views differ from evaluation views
    assert -2.2 < float(a.min()) and float(a.max()) < 2.7  # ImageNet-normalised [0, 1] pixels
    assert len(PHOTOS) == 10
    with pytest.raises(ValueError, match="split"):
        photo_crops(2, split="train")


def test_confident_agreement_ignores_near_ties():
    ref = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 4.0, 0.0]])
    got = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.1, 0.0], [3.0, 0.0, 0.0]])
    r = confident_agreement(ref, got)
    assert r["confident"] == 2  # the near-tie row is left out
    assert r["agreement"] == 0.5 and r["agreement_all"] == pytest.approx(1 / 3)
    same = confident_agreement(ref, ref)
    assert same["agreement"] == 1.0 and abs(same["mean_kl"]) < 1e-7 and r["mean_kl"] > 0
    assert math.isnan(confident_agreement(ref[1:2], got[1:2])["agreement"])
