"""digits-cnn: a real (small) CNN with real labels, FP32 vs INT8 vs INT4 weight-only."""

import copy

import pytest

import lowbit
from lowbit.evaluate.classification import accuracy


def test_fp32_int8_int4_accuracy(digits):
    zoo, data = digits
    x, y = data["x_test"], data["y_test"]
    fp32 = accuracy(zoo.model, x, y)
    assert fp32 > 0.97  # trained in seconds, but a real classifier
    acc = {}
    for scheme in ("int8", "w4g16", "w4g16-asym", "w8g16"):
        m = lowbit.quantize(copy.deepcopy(zoo.model), scheme)
        acc[scheme] = accuracy(m, x, y)
    assert acc["int8"] >= fp32 - 0.005  # within half a point
    assert acc["w8g16"] >= fp32 - 0.005
    assert acc["w4g16-asym"] >= fp32 - 0.03
    assert acc["w4g16"] >= fp32 - 0.03


def test_training_is_deterministic_and_cached(digits):
    from lowbit.models.zoo import load_model

    again = load_model("digits-cnn")
    a = dict(digits[0].model.state_dict())
    for k, v in again.model.state_dict().items():
        assert (a[k] == v).all()


@pytest.mark.parametrize("scheme", ["int8", "w4g16"])
def test_save_load_identical(tmp_path, digits, scheme):
    import torch

    from lowbit.models.zoo import DigitsCNN

    zoo, data = digits
    m = lowbit.quantize(copy.deepcopy(zoo.model), scheme)
    lowbit.save(m, tmp_path / "d", source="digits-cnn")
    back = lowbit.load(tmp_path / "d", model=DigitsCNN())
    with torch.no_grad():
        assert torch.equal(back(data["x_test"]), m(data["x_test"]))
