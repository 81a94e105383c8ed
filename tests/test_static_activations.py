"""Static int8 activations (w8a8-static): calibrated per-tensor input scales from observers,
stored with the layer, run by the kernels, saved and loaded."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.calibrate import CalibrationError
from lowbit.nn import QuantLinear

from .forge import resign


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


def _batches(n=4, scale=3.0, rows=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, 32, generator=g) * scale for _ in range(n)]


def test_minmax_scales_are_each_layers_input_range():
    model, batches = _mlp(), _batches()
    ref = nn.Sequential(*[m for m in _mlp()])  # an untouched float copy
    hidden = [torch.relu(ref[0](b)) for b in batches]
    lowbit.quantize(model, "w8a8-static", calibration=batches)
    first, second = model[0], model[2]
    assert isinstance(first, QuantLinear) and first.scheme.act_static
    # signed inputs: affine over [min, max], 0.0 exactly on the zero point's code
    lo, hi = min(float(b.min()) for b in batches), max(float(b.max()) for b in batches)
    assert float(first.act_scale) == pytest.approx((hi - lo) / 254, rel=1e-6)
    assert int(first.act_zero) == round(-lo / float(first.act_scale)) - 127
    # the second layer sees the float first layer's ReLU outputs (layers outside blocks share one
    # pass): nothing negative, so unsigned codes spread over [0, max]
    assert float(second.act_scale) == pytest.approx(max(float(h.detach().max()) for h in hidden) / 254, rel=1e-6)
    assert int(second.act_zero) == -127
    x = batches[0]
    with torch.no_grad():
        rel = float((model(x) - ref(x)).norm() / ref(x).norm())
    assert rel < 0.03, rel
    assert lowbit.size_of(model).layers[0].bias_bytes == 64 * 4 + 4 + 1  # bias + float32 scale + int8 zero


def test_observers_change_the_scale_and_bad_ones_are_refused():
    batches = _batches(rows=256)
    batches[0][0, 0] = 400.0  # one outlier in 32,768 values: beyond the 99.99th percentile
    scales = {}
    for obs in ("minmax", "percentile", "mse"):
        m = lowbit.quantize(_mlp(), "w8a8-static", calibration=batches, observer=obs)
        scales[obs] = float(m[0].act_scale) * (127 - int(m[0].act_zero))  # the largest value kept
    assert scales["minmax"] == pytest.approx(400, abs=1.0)  # to half a step: the zero point is an integer
    assert scales["percentile"] < 0.1 * scales["minmax"] and scales["mse"] < scales["minmax"]
    with pytest.raises(lowbit.QuantizeError, match="unknown observer 'max'"):
        lowbit.quantize(_mlp(), "w8a8-static", calibration=batches, observer="max")


def test_static_needs_calibration_whatever_the_method():
    model = _mlp()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(CalibrationError, match="static activations"):
        lowbit.quantize(model, "w8a8-static")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing lost


def test_static_scale_saves_loads_and_is_required(tmp_path):
    model = lowbit.quantize(_mlp(), "w8a8-static", calibration=_batches())
    lowbit.save(model, tmp_path / "s")
    back = lowbit.load(tmp_path / "s", model=_mlp())
    assert torch.equal(back[0].act_scale, model[0].act_scale)
    assert torch.equal(back[2].act_zero, model[2].act_zero) and int(back[2].act_zero) == -127
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    # a manifest that says static where the file holds no scale (a dynamic model's tensors)
    lowbit.save(lowbit.quantize(_mlp(), "w8a8"), tmp_path / "d")
    manifest = tmp_path / "d" / "lowbit.json"
    manifest.write_text(manifest.read_text().replace('"w8a8"', '"w8a8-static"'))
    with pytest.raises(lowbit.LowbitFormatError, match="modified after saving"):  # the digest sees it
        lowbit.load(tmp_path / "d", model=_mlp(), verify=False)
    resign(tmp_path / "d")  # checksums forged too: the field-by-field check still refuses it
    with pytest.raises(lowbit.LowbitFormatError, match="act_scale"):
        lowbit.load(tmp_path / "d", model=_mlp())


def test_static_convolutions_and_the_layers_that_cannot_take_activations(toy):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2)).eval()
    ref = copy.deepcopy(cnn)
    g = torch.Generator().manual_seed(2)
    imgs = [torch.rand(2, 3, 10, 10, generator=g) for _ in range(3)]
    lowbit.quantize(cnn, "w8a8-static", calibration=imgs)
    assert float(cnn[0].act_scale) == pytest.approx(max(float(i.max()) for i in imgs) / 254, rel=1e-6)
    with torch.no_grad():
        rel = float((cnn(imgs[0]) - ref(imgs[0])).norm() / ref(imgs[0]).norm())
    assert rel < 0.02, rel
    with pytest.raises(lowbit.QuantizeError, match=r"conv2d layers \(-static only\), not conv"):
        lowbit.quantize(toy, "w8a8")  # dynamic (per-token) activations have no meaning for a conv


def test_empty_or_mismatched_calibration_is_one_clear_error_and_nothing_changes():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    before = copy.deepcopy(cnn.state_dict())
    with pytest.raises(CalibrationError, match="empty calibration"):
        lowbit.quantize(cnn, "w8a8-static", calibration=[])
    with pytest.raises(CalibrationError, match=r"batch \(2, 1, 10, 10\) float32 does not fit the model"):
        lowbit.quantize(cnn, "w8a8-static", calibration=[torch.rand(2, 1, 10, 10)])  # grey images for RGB
    with pytest.raises(CalibrationError, match=r"\(2, 5\) int64 does not fit"):
        lowbit.prepare_qat(copy.deepcopy(cnn), "w8a8-static", calibration=[torch.zeros(2, 5, dtype=torch.long)])
    assert all(isinstance(m, (nn.Conv2d, nn.ReLU)) for m in cnn)  # every module put back
    assert all(torch.equal(v, cnn.state_dict()[k]) for k, v in before.items())


def _depthwise():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1, bias=False),
    ).eval()  # fmt: skip


def _channel_means(y: torch.Tensor) -> torch.Tensor:
    return y.mean((0, 2, 3))


def test_bias_correction_removes_each_layers_mean_output_error():
    g = torch.Generator().manual_seed(4)
    imgs = [torch.rand(4, 3, 12, 12, generator=g) * 2 - 1 for _ in range(3)]
    ref = _depthwise()
    plain = lowbit.quantize(_depthwise(), "w4a8-static", calibration=imgs, bias_correction=False)
    fixed = lowbit.quantize(_depthwise(), "w4a8-static", calibration=imgs)
    assert torch.equal(plain[0].qweight, fixed[0].qweight)  # same codes: only the biases move
    x = torch.cat(imgs)
    with torch.no_grad():
        want = _channel_means(ref[0](x))
        shift_plain = (_channel_means(plain[0](x)) - want).abs().max()
        shift_fixed = (_channel_means(fixed[0](x)) - want).abs().max()
        # the first layer reads the same input in both models: its mean error is removed exactly
        assert shift_plain > 1e-3 and shift_fixed < 1e-5, (shift_plain, shift_fixed)
        # later layers are corrected on the inputs the quantized model gives them (in one pass,
        # before the earlier layers' corrections: nearly, not exactly, the inputs they get now)
        h = fixed[1](fixed[0](x))
        own_fixed = _channel_means(fixed[2](h) - ref[2](h)).abs().max()
        h = plain[1](plain[0](x))
        own_plain = _channel_means(plain[2](h) - ref[2](h)).abs().max()
        assert own_fixed < 0.05 * own_plain, (own_fixed, own_plain)
        # by default a layer without a bias keeps none (the model's tensors do not change) ...
        assert fixed[4].bias is None
        # ... unless asked; then it gets one and saves, loads and runs the same
        forced = lowbit.quantize(_depthwise(), "w4a8-static", calibration=imgs, bias_correction=True)
        assert forced[4].bias is not None and forced[4].bias.shape == (8,)
        err = [float((m(x) - ref(x)).mean((0, 2, 3)).abs().max()) for m in (plain, fixed, forced)]
        assert err[2] < err[1] < err[0], err


def test_bias_correction_saves_loads_and_is_refused_without_static_layers(tmp_path):
    g = torch.Generator().manual_seed(5)
    imgs = [torch.rand(2, 3, 12, 12, generator=g) for _ in range(2)]
    model = lowbit.quantize(_depthwise(), "w8a8-static", calibration=imgs, bias_correction=True)
    lowbit.save(model, tmp_path / "bc")
    back = lowbit.load(tmp_path / "bc", model=_depthwise())
    with torch.no_grad():
        assert torch.equal(back(imgs[0]), model(imgs[0]))
    with pytest.raises(lowbit.QuantizeError, match="bias_correction applies to static"):
        lowbit.quantize(_depthwise(), "int8", calibration=imgs, bias_correction=True)
