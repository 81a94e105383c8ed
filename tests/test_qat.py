"""QAT: LSQ fake quantization, prepare/convert parity, distillation on real digits, bad input."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.calibrate import CalibrationError
from lowbit.evaluate.classification import accuracy
from lowbit.mixed import output_kl
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.qat import QATError, QATLayer, distill_loss, fit, fit_blocks, lsq_fake_quantize


def test_lsq_gradients_are_the_papers():
    x = torch.tensor([0.26, -0.9, 5.0, -5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = lsq_fake_quantize(x, s, 0.0, -4, 3)  # codes -4..3: 5.0 and -5.0 clip
    assert torch.equal(y.detach(), torch.tensor([0.5, -1.0, 1.5, -2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # straight through inside, 0 outside
    v = torch.tensor([0.52, -1.8])  # x / s inside the range: d/ds = round(v) - v; clipped: the code
    want = float((v.round() - v).sum()) + 3 + (-4)
    assert float(s.grad) == pytest.approx(want, abs=1e-6)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 70), nn.ReLU(), nn.Linear(70, 10)).eval()  # fmt: skip


def _imgs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 6, 6, generator=g) for _ in range(n)]


@pytest.mark.parametrize("scheme", ["w4g32", "w4g32-asym", "int8", "w8-tensor", "w3g16-asym", "w8a8-static", "w4a8-static"])
def test_convert_stores_exactly_what_training_saw(scheme, tmp_path):
    model = _net()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    imgs = _imgs()
    q = lowbit.prepare_qat(copy.deepcopy(model), scheme, calibration=imgs)
    assert isinstance(q[0], QATLayer) and isinstance(q[1], nn.Identity)  # the BatchNorm was folded
    fit(q, imgs, steps=5, teacher=model, lr=1e-3, step_lr=1e-3)  # move weights and steps off their start
    x = _imgs(1, seed=9)[0]
    with torch.no_grad():
        fake = q(x)
    lowbit.convert(q, kernel="reference")  # dequantize-then-float: exactly the fake-quant math
    assert isinstance(q[0], QuantConv2d) and isinstance(q[4], QuantLinear) and q[4].method == "qat"
    with torch.no_grad():
        real = q(x)
    assert torch.allclose(real, fake, rtol=1e-5, atol=1e-6)
    lowbit.save(q, tmp_path / "m")
    back = lowbit.load(tmp_path / "m", model=_net())  # the fastest kernels (int16/int8 activations)
    with torch.no_grad():
        assert torch.allclose(back(x), real, atol=2e-3 * float(real.abs().max()))


def test_static_layers_start_from_corrected_biases():
    imgs = _imgs()
    x = torch.cat(imgs)
    model = _net()
    ref = copy.deepcopy(model)
    lowbit.fold.fold_batchnorm(ref)
    plain = lowbit.prepare_qat(copy.deepcopy(model), "w4a8-static", calibration=imgs, bias_correction=False)
    fixed = lowbit.prepare_qat(copy.deepcopy(model), "w4a8-static", calibration=imgs)
    with torch.no_grad():
        want = ref[0](x).mean((0, 2, 3))
        before = (plain[0](x).mean((0, 2, 3)) - want).abs().max()
        after = (fixed[0](x).mean((0, 2, 3)) - want).abs().max()
    assert before > 1e-3 and after < 1e-5, (before, after)
    assert fixed[0].layer.bias.requires_grad  # still trained
    net = _net()
    with pytest.raises(QATError, match="bias_correction needs calibration"):
        lowbit.prepare_qat(net, "w4a8-static", bias_correction=True)
    assert isinstance(net[0], nn.Conv2d) and isinstance(net[1], nn.BatchNorm2d)  # nothing changed


def test_distillation_recovers_what_ptq_lost_on_real_digits(digits):
    """W3A8 (3-bit per-channel weights, static int8 activations; W4A8 loses only 2 of 500 images here,
    too few to test on) on the real digits test set: QAT by distillation from the FP32 model, on
    training images only, recovers >= 70% of PTQ's loss. Bias correction off in both, to measure
    training alone (with it, W3A8 PTQ already matches FP32 here; W2A8 is tested with it)."""
    zoo, data = digits
    fp = zoo.model
    x, xt, yt = data["x_train"], data["x_test"], data["y_test"]
    cal = [x[:256]]
    acc_fp = accuracy(fp, xt, yt)
    g = torch.Generator().manual_seed(0)
    batches = [x[torch.randint(0, len(x), (64,), generator=g)] for _ in range(40)]
    for scheme, bc in (("w3a8-static", False), ("w2a8-static", None)):
        ptq = lowbit.quantize(copy.deepcopy(fp), scheme, calibration=cal, bias_correction=bc)
        acc_ptq = accuracy(ptq, xt, yt)
        q = lowbit.prepare_qat(copy.deepcopy(fp), scheme, calibration=cal, bias_correction=bc)
        losses = fit(q, batches, steps=200, teacher=fp, lr=1e-3, step_lr=1e-3)
        assert sum(losses[-20:]) < sum(losses[:20])
        lowbit.convert(q)
        acc_qat = accuracy(q, xt, yt)
        assert acc_fp - acc_ptq >= 0.01, (scheme, acc_fp, acc_ptq)  # PTQ lost something worth recovering
        assert (acc_qat - acc_ptq) >= 0.7 * (acc_fp - acc_ptq), (scheme, acc_fp, acc_ptq, acc_qat)
    uncorrected = accuracy(lowbit.quantize(copy.deepcopy(fp), "w2a8-static", calibration=cal, bias_correction=False),
                           xt, yt)  # fmt: skip
    assert acc_ptq >= uncorrected + 0.02, (acc_ptq, uncorrected)  # bias correction alone: 92.6% -> 96.4%


def test_bad_input_gets_one_clear_error():
    with pytest.raises(QATError, match="no trainable layers"):
        lowbit.prepare_qat(nn.Sequential(nn.ReLU(), nn.Flatten()), "w4g32")
    frozen = _net()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(QATError, match="requires_grad=False"):
        lowbit.prepare_qat(frozen, "w4g32")
    net = _net()
    with pytest.raises(QATError, match="not an integer format"):
        lowbit.prepare_qat(net, "nf4g32")
    assert isinstance(net[1], nn.BatchNorm2d)  # refused before the BatchNorm was folded
    with pytest.raises(QATError, match="prepare_qat"):
        lowbit.convert(_net())
    m = lowbit.prepare_qat(_net(), "w4g32", fold_bn=False)
    m.train()
    with pytest.raises(QATError, match="BatchNorm in training mode at conversion"):
        lowbit.convert(m)
    trained = _net().train()
    with pytest.raises(Exception, match="training mode"):  # folding needs inference-mode statistics
        lowbit.prepare_qat(trained, "w4g32")
    assert all(not isinstance(mod, QATLayer) for mod in trained.modules())  # nothing was wrapped
    with pytest.raises(QATError, match="exactly one of teacher"):
        fit(lowbit.prepare_qat(_net(), "w4g32"), _imgs(), steps=1)
    with pytest.raises(QATError, match="never initialised"):
        lowbit.convert(lowbit.prepare_qat(_net(), "w8a8-static"))  # static, no calibration, never run
    assert float(distill_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]))) == pytest.approx(0, abs=1e-7)


def test_calibration_may_be_a_one_shot_iterator():
    imgs = _imgs()
    from_list = lowbit.prepare_qat(_net(), "w8a8-static", calibration=imgs)
    from_iter = lowbit.prepare_qat(_net(), "w8a8-static", calibration=iter(imgs))  # observed, then bias-corrected
    x = _imgs(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(from_iter(x), from_list(x))
    net = _net()
    with pytest.raises(CalibrationError, match="empty calibration"):
        lowbit.prepare_qat(net, "w8a8-static", calibration=iter([]))
    assert isinstance(net[0], nn.Conv2d) and isinstance(net[1], nn.BatchNorm2d)  # refused before any change


def test_learned_steps_change_relatively_whatever_the_weights_range():
    # Adam's update ignores the gradient's size: on raw steps every step moved by about step_lr in
    # absolute terms (a layer with small weights lost its grid within a few updates). Steps are
    # learned as log|step|, so each update changes a step by about step_lr of itself.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.mul_(1e-3)  # steps ~1e-5: an absolute update of 1e-2 would be 1000x them
    lowbit.prepare_qat(model, "w4g64")
    before = [m.wq.step.detach().clone() for m in model if isinstance(m, QATLayer)]
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    steps, step_lr = 10, 1e-2
    fit(model, [x], steps=steps, lr=0.0, step_lr=step_lr, loss_fn=lambda m, b: ((m(b) - y) ** 2).mean())
    for b, m in zip(before, [m for m in model if isinstance(m, QATLayer)]):
        rel = (m.wq.step.detach() / b - 1).abs()
        assert 0 < rel.max() <= (1 + step_lr) ** steps - 1 + 1e-3  # moved, by a bounded share of itself
        assert bool((m.wq.step.detach().sign() == b.sign()).all())


def test_steps_learn_with_codes_held_where_lsq_has_no_gradient():
    # weights on the grid (as after post-training quantization): LSQ's step gradient round(v) - v
    # is 0 there; with the codes held it is the code itself, so the step can still be fitted
    codes = torch.tensor([3.0, -1.0, -4.0, 2.0])
    for hold, want in ((False, 0.0), (True, float(codes.sum()))):
        s = torch.tensor(0.5, requires_grad=True)
        x = (codes * 0.5).requires_grad_(True)
        y = lsq_fake_quantize(x, s, 0.0, -4, 3, hold_codes=hold)
        assert torch.equal(y.detach(), codes * 0.5)
        y.sum().backward()
        assert float(s.grad) == pytest.approx(want, abs=1e-6)
        assert torch.equal(x.grad, torch.ones(4))  # weights: straight through either way
    z = torch.tensor(2.0, requires_grad=True)  # asymmetric: the zero point's gradient is -step per code
    s = torch.tensor(0.5, requires_grad=True)
    lsq_fake_quantize(torch.tensor([1.5, -0.5]), s, z, 0, 7, hold_codes=True).sum().backward()  # codes 5, 1
    assert float(z.grad) == pytest.approx(-1.0) and float(s.grad) == pytest.approx((5 - 2) + (1 - 2))


def _llama_and_batches():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    fp = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    cal = [{"input_ids": torch.randint(0, 128, (2, 32), generator=g)} for _ in range(4)]
    return fp, cal


def test_block_distillation_fits_every_block_from_a_gptq_start(tmp_path):
    fp, cal = _llama_and_batches()
    q = lowbit.quantize(copy.deepcopy(fp), "w2g32", method="gptq", calibration=cal)
    kl_ptq = output_kl(fp, q, cal)
    lowbit.prepare_qat(q)
    seen = []
    errors = fit_blocks(q, fp, cal, epochs=8, lr=1e-4, step_lr=1e-2, on_block=lambda i, b, a: seen.append(i))
    assert seen == [0, 1, 2] and len(errors) == 3
    for before, after in errors:  # each block reproduces the teacher's block better than it started
        assert 0 < after < before
    assert not q.training and not fp.training
    lowbit.convert(q)
    assert output_kl(fp, q, cal) < kl_ptq  # and so does the whole model, packed
    back = lowbit.load(lowbit.save(q, tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(back(**cal[0]).logits, q(**cal[0]).logits)


def test_block_loss_weighs_every_token_by_its_own_norm():
    # a decoder's residual stream puts most of its squared norm on a few tokens (the attention
    # sink); the block loss is each real token's error relative to that token, so a 1000x larger
    # token counts like any other and padding counts not at all
    from lowbit.qat import _token_errors

    target = torch.randn(2, 5, 8)
    target[0, 0] *= 1000.0
    out = target * 1.1  # every token 10% off
    out[1, 4] += 50.0  # a padding position, wildly off
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    errors = _token_errors(out, target, mask)
    assert errors.shape == (9,)
    torch.testing.assert_close(errors, torch.full((9,), 0.01), rtol=1e-4, atol=0)


def test_block_distillation_bad_input_is_one_clear_error():
    fp, cal = _llama_and_batches()
    with pytest.raises(QATError, match="prepare_qat"):
        fit_blocks(copy.deepcopy(fp), fp, cal)
    q = lowbit.prepare_qat(lowbit.quantize(copy.deepcopy(fp), "w4g32"))
    with pytest.raises(QATError, match="epochs"):
        fit_blocks(q, fp, cal, epochs=0)
    with pytest.raises(QATError, match="same chain of repeated blocks"):
        fit_blocks(q, nn.Sequential(nn.Linear(4, 4)), cal)
    fewer = copy.deepcopy(fp)
    fewer.model.layers = fewer.model.layers[:2]
    fewer.config.num_hidden_layers = 2
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(QATError, match="found 3 and 2"):
        fit_blocks(q, fewer, cal)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # nothing trained
