"""Compression to a budget (issue 16): per-layer choices with pruning and corrections in recipes,
structured pruning that shrinks tensors and configs, and lowbit.compress / `lowbit compress` end to
end on the real digits CNN (accuracy on its held-out labelled test images)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.pruning import PruningError
from lowbit.compress import CompressError, compress, reference_bytes
from lowbit.compress.structured import channel_groups, prune_channels
from lowbit.driver import QuantizeError
from lowbit.models.zoo import DigitsCNN
from lowbit.nn import QuantModule
from lowbit.recipe import Recipe, RecipeError, format_choice, parse_choice


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 192), nn.GELU(), nn.Linear(192, 64)).eval()


def _acc(model, data) -> float:
    with torch.no_grad():
        return float((model(data["x_test"]).argmax(-1) == data["y_test"]).float().mean())


# ---- choices in recipes ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,scheme,opts", [
    ("w4g64", "w4g64", {}), ("w4g64+50%", "w4g64", {"sparsity": 0.5}), ("w3g64+2:4", "w3g64", {"nm": "2:4"}),
    ("w3g64+50%+r8", "w3g64", {"sparsity": 0.5, "rank": 8}), ("int8 + r16", "int8", {"rank": 16}),
    ("skip", None, {}), ("w4g64+87.5%", "w4g64", {"sparsity": 0.875}),
])  # fmt: skip
def test_choices_parse_and_print_back(text, scheme, opts):
    s, o = parse_choice(text)
    assert (str(s) if s is not None else None) == scheme and o == opts
    assert parse_choice(format_choice(s, o)) == (s, o)


@pytest.mark.parametrize("text,match", [
    ("w4g64+150%", "fraction"), ("w4g64+0%", "fraction"), ("w4g64+4:2", "0 < N < M"), ("w4g64+r0", "positive"),
    ("skip+50%", "float"), ("w4g64+50%+2:4", "not both"), ("w4g64+x", "unknown option"), ("w4g64+r4+r8", "twice"),
])  # fmt: skip
def test_bad_choices_are_refused(text, match):
    with pytest.raises(RecipeError, match=match):
        Recipe(default=None).add("x", text)


def test_recipes_with_options_save_as_version_2_and_plain_ones_stay_version_1(tmp_path):
    r = Recipe(default=None).add("fc1", "w3g64+75%+r4").add("fc2", "w4g64")
    r.save(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["version"] == 2 and d["rules"][0] == {"pattern": "fc1", "scheme": "w3g64", "sparsity": 0.75, "rank": 4}
    back = Recipe.load(tmp_path / "r.json")
    assert [x.choice for x in back.rules] == ["w3g64+75%+r4", "w4g64"] and back.options("fc1") == {"sparsity": 0.75, "rank": 4}
    assert Recipe(default=None).add("fc2", "w4g64").to_dict()["version"] == 1
    d["version"] = 1  # a version-1 recipe has no options: refuse rather than drop them
    with pytest.raises(RecipeError, match="version 1"):
        Recipe.from_dict(d)
    d["version"], d["rules"][0]["sparsity"] = 2, 1.5
    with pytest.raises(RecipeError, match="fraction"):
        Recipe.from_dict(d)


def test_rules_prune_and_correct_layers_one_by_one():
    q = lowbit.quantize(_mlp(), Recipe(default=None).add("0", "w4g64+50%").add("2", "w4g64+r4"), method="magnitude")
    assert q[0].sparsity == 0.5 and q[0].rank == 0
    assert q[2].mask is None and q[2].rank == 4  # no pattern in its rule: dense under a pruning method
    assert q.lowbit_layers["0"].scheme == "w4g64"


def test_rules_that_prune_need_a_pruning_method_and_corrections_need_linear_layers():
    m = _mlp()
    with pytest.raises(QuantizeError, match="does not prune"):
        lowbit.quantize(m, Recipe(default="w4g64").add("0", "w4g64+50%"), method="rtn")
    assert isinstance(m[0], nn.Linear) and isinstance(m[2], nn.Linear)
    conv = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU()).eval()
    with pytest.raises(QuantizeError, match="linear layers"):
        lowbit.quantize(conv, Recipe(default=None).add("0", "w4g64+r2"))
    assert isinstance(conv[0], nn.Conv2d)
    with pytest.raises(QuantizeError, match="not below the smaller side"):
        lowbit.quantize(m, Recipe(default=None).add("2", "w4g64+r64"))


def test_streaming_refuses_recipes_that_prune(tmp_path):
    from lowbit.checkpoint import quantize_checkpoint

    with pytest.raises(QuantizeError, match="streaming"):
        quantize_checkpoint(tmp_path / "nowhere", Recipe(default="w4g64").add("x", "w4g64+50%"), tmp_path / "out")


# ---- structured pruning ---------------------------------------------------------------------------
def _zeroed_twin(model: nn.Module, groups) -> nn.Module:
    """The original model with every removed channel's producing rows (and biases) set to 0: it
    must compute what the pruned model computes (the activations here map 0 to 0)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for g in groups:
            for p in (*g.producers, *g.between):  # a BatchNorm maps 0 to 0 once its shift and mean are 0
                mod = twin.get_submodule(p)
                gone = [i for i in range(mod.weight.shape[0]) if i not in set(g.kept)]
                mod.weight[gone] = 0
                if mod.bias is not None:
                    mod.bias[gone] = 0
                if getattr(mod, "running_mean", None) is not None:
                    mod.running_mean[gone] = 0
    return twin


def _inverted_residual(trained: bool = False) -> nn.Sequential:
    """MobileNetV2's block without its residual: expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN ->
    ReLU6 -> project 1x1 -> BN; ``trained``: BatchNorms with random statistics and affine
    parameters, as a trained model has (not the identity they start as)."""
    model = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                          nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8)).eval()  # fmt: skip
    if trained:
        with torch.no_grad():
            for bn in (model[1], model[4], model[7]):
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.1)
    return model


def test_structured_pruning_passes_through_depthwise_convolutions_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = _inverted_residual(trained=True)
    x = torch.randn(4, 8, 6, 6)
    m = copy.deepcopy(model)
    (g,) = prune_channels(m, 0.5, calibration=[x], recalibrate=False)
    assert g.producers == ("0",) and g.reader == "6" and g.between == ("1", "3", "4")
    assert (m[0].out_channels, m[3].groups, m[4].num_features, m[6].in_channels) == (16, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(m(x), _zeroed_twin(model, [g])(x), atol=1e-5)
    q = lowbit.quantize(m, "w8")  # the BatchNorms fold into the convolutions
    back = lowbit.load(lowbit.save(q, tmp_path / "ir"), model=_inverted_residual().eval())
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_pruning_with_calibration_re_estimates_the_batchnorm_statistics():
    torch.manual_seed(0)
    model = _inverted_residual(trained=True)
    batches = [torch.randn(4, 8, 6, 6) + 1 for _ in range(3)]
    m = copy.deepcopy(model)
    prune_channels(m, 0.5, calibration=iter(batches))  # an iterator: read for scores and statistics
    assert not m.training and not any(x.training for x in m.modules())  # modes and momenta restored
    assert m[1].momentum == model[1].momentum
    # the first BatchNorm reads the pruned expansion's output: its statistics are those of the batches
    with torch.no_grad():  # per batch: (channels, values); the running values average the batches'
        ys = [m[0](b).transpose(0, 1).reshape(m[0].out_channels, -1) for b in batches]
    assert torch.allclose(m[1].running_mean, torch.stack([y.mean(1) for y in ys]).mean(0), atol=1e-5)
    assert torch.allclose(m[1].running_var, torch.stack([y.var(1) for y in ys]).mean(0), rtol=1e-4)
    assert not torch.allclose(m[7].running_mean, model[7].running_mean, atol=1e-3)  # later ones too
    kept = copy.deepcopy(model)
    prune_channels(kept, 0.5, calibration=batches, recalibrate=False)
    assert torch.equal(kept[7].running_mean, model[7].running_mean)


def test_a_batchnorm_that_cannot_be_re_estimated_is_one_clear_error_and_nothing_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    model[1].running_mean.normal_()
    model.train()  # a model in training mode: the passes run in eval mode, its modes come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model)
    ones = [torch.randn(1, 8) for _ in range(4)]  # one sample per batch: no batch statistics
    with pytest.raises(PruningError, match="BatchNorm1d needs batches of at least 2"):
        prune_channels(model, 0.5, calibration=ones)
    assert list(model) == modules and not hasattr(model, "lowbit_resized")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model) and model[1].momentum == 0.1
    (g,) = prune_channels(model, 0.5, calibration=ones, recalibrate=False)  # scores need no batch statistics
    assert model[0].out_features == 16 and torch.equal(model[1].running_mean, before["1.running_mean"][g.kept])


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
def test_pruning_with_calibration_keeps_the_readers_mean_output(kind):
    """In a model without BatchNorms, the removed channels' mean contribution moves into the reading
    layer's bias: on the calibration data the pruned model's mean output equals the original's."""
    torch.manual_seed(0)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), torch.randn(64, 8)
    else:
        model, x = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 4, 1)).eval(), torch.randn(16, 8, 5, 5)
    dims = 0 if kind == "linear" else (0, 2, 3)
    kept, shifted = copy.deepcopy(model), copy.deepcopy(model)
    half = len(x) // 2
    prune_channels(kept, 0.5, calibration=[x[:half], x[half:]])
    prune_channels(shifted, 0.5, calibration=[x[:half], x[half:]], recalibrate=False)
    with torch.no_grad():
        want = model(x).mean(dims)
        assert torch.allclose(kept(x).mean(dims), want, atol=1e-5)
        assert not torch.allclose(shifted(x).mean(dims), want, atol=1e-2)  # what the bias corrects


class _Tokens(nn.Module):
    """A token model whose padding positions carry large activations, as real ones can."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.up, self.down = nn.Embedding(16, 8), nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, input_ids, attention_mask):
        return self.down(torch.relu(self.up(self.embed(input_ids))))


def test_the_mean_compensation_counts_real_tokens_only():
    from lowbit.compress.structured import _input_moments

    torch.manual_seed(0)
    model = _Tokens().eval()
    with torch.no_grad():
        model.embed.weight[0] = 50.0  # token 0 is the padding
    ids = torch.randint(1, 16, (3, 10))
    mask = torch.ones_like(ids)
    ids[0, 6:], mask[0, 6:], ids[2, 3:], mask[2, 3:] = 0, 0, 0, 0
    (mean, square), = _input_moments(model, {"down": model.down}, [{"input_ids": ids, "attention_mask": mask}]).values()
    with torch.no_grad():
        real = torch.relu(model.up(model.embed(ids)))[mask.bool()]
    assert torch.allclose(mean, real.mean(0), atol=1e-5) and torch.allclose(square, real.pow(2).mean(0), rtol=1e-5)


def test_structured_pruning_of_the_digits_cnn_shrinks_its_layers_and_computes_the_same(digits):
    zoo, data = digits
    m = copy.deepcopy(zoo.model)
    assert [(g.producers, g.reader, g.block) for g in channel_groups(m)] == [
        (("conv1",), "conv2", 1), (("conv2",), "fc1", 16), (("fc1",), "fc2", 1)]  # fmt: skip
    groups = prune_channels(m, 0.5, calibration=[data["x_train"][:256]], recalibrate=False)
    assert (m.conv1.out_channels, m.conv2.in_channels, m.conv2.out_channels) == (8, 8, 16)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.in_features) == (256, 32, 32)
    assert m.lowbit_resized["fc1"] == (64, 512) and sum(p.numel() for p in m.parameters()) < 0.3 * sum(
        p.numel() for p in zoo.model.parameters())  # fmt: skip
    with torch.no_grad():
        x = data["x_test"][:64]
        assert torch.allclose(m(x), _zeroed_twin(zoo.model, groups)(x), atol=1e-5)
    # calibrated scores differ from weight-only ones (the inputs' scale matters)
    data_free = prune_channels(copy.deepcopy(zoo.model), 0.5)
    assert any(a.kept != b.kept for a, b in zip(groups, data_free))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_structured_pruning_of_transformer_ffns_updates_the_config_and_reloads(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg).eval()
        ffn = "model.layers.1.mlp.down_proj"
    else:
        cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64, hidden_act="relu")  # fmt: skip
        model = transformers.BertModel(cfg).eval()
        ffn = "encoder.layer.1.output.dense"
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    m = copy.deepcopy(model)
    groups = prune_channels(m, 0.5, calibration=[ids], recalibrate=False)
    assert len(groups) == 2 and m.config.intermediate_size == 64 and m.get_submodule(ffn).in_features == 64
    out = lambda mod: mod(ids).logits if family == "llama" else mod(ids).last_hidden_state  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(out(m), out(_zeroed_twin(model, groups)), atol=1e-4)
    q = lowbit.quantize(m, "w4g32")
    back = lowbit.load(lowbit.save(q, tmp_path / "m"))  # rebuilt from the saved config
    with torch.no_grad():
        assert torch.equal(out(back), out(q))
    model.config.intermediate_size = 100  # a config that does not describe the model
    with pytest.raises(PruningError, match="cannot express"):
        prune_channels(model, 0.5)


def test_structured_pruning_refuses_bad_input_and_leaves_the_model_unchanged(digits):
    zoo, _data = digits
    m = copy.deepcopy(zoo.model)
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(PruningError, match="fraction"):
            prune_channels(m, bad)
    assert m.fc1.out_features == 64
    with pytest.raises(PruningError, match="already quantized"):
        prune_channels(lowbit.quantize(copy.deepcopy(zoo.model), "w8"), 0.5)

    class Residual(nn.Module):  # every channel is shared by the residual sum: nothing to own
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)) + x)

    r = Residual()
    with pytest.raises(PruningError, match="no channel groups"):
        prune_channels(r, 0.5)
    assert r.a.out_features == 16


# ---- compress end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_compressed(digits):
    zoo, data = digits
    x = data["x_train"]
    before = {k: v.clone() for k, v in zoo.model.state_dict().items()}
    r = compress(zoo.model, target_ratio=20, channels=0.5, batches=[x[i : i + 64] for i in range(512, 1024, 64)],
                 calibration=[x[i : i + 64] for i in range(0, 512, 64)], distill_steps=600, lr=1e-3,
                 distill_data=[x[i : i + 64] for i in range(0, 1280, 64)])  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in zoo.model.state_dict().items())  # the input is not changed
    return r


def test_compress_meets_the_ratio_and_keeps_the_digits_accuracy(digits, digits_compressed, tmp_path):
    zoo, data = digits
    r = digits_compressed
    assert r.ratio >= 20 and r.nbytes == lowbit.size_of(r.model).total_bytes
    assert r.reference_bytes == reference_bytes(zoo.model) == 4 * sum(p.numel() for p in zoo.model.parameters())
    assert r.kl < r.kl_before_distill and len(r.distill_losses) == 600
    assert _acc(r.model, data) >= _acc(zoo.model, data) - 0.01  # held-out labelled images
    assert all(rec.method.endswith("+qat") for rec in r.model.lowbit_layers.values() if rec.status == "quantized")
    out = lowbit.save(r.model, tmp_path / "c")
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["format_version"] == 3 and manifest["modules"]["fc1"]["resized"] == [64, 512]
    back = lowbit.load(out, model=DigitsCNN())  # the original skeleton: resized layers replace its own
    with torch.no_grad():
        assert torch.equal(back(data["x_test"]), r.model(data["x_test"]))
    pts = r.frontier([2, 5, 10, 20, 1000])
    assert [round(p[0]) for p in pts][:1] >= [2] and all(b[1] >= a[1] - 1e-12 for a, b in zip(pts, pts[1:]))


def test_compress_names_the_largest_reachable_ratio_and_refuses_bad_requests(digits):
    zoo, data = digits
    x = data["x_train"]
    b = [x[:64]]
    with pytest.raises(CompressError, match=r"largest reachable is \d+\.\d\dx"):
        compress(zoo.model, target_ratio=500, batches=b, candidates=("w4g64", "w2g64"), method="rtn")
    with pytest.raises(CompressError, match="above 1"):
        compress(zoo.model, target_ratio=0.5, batches=b)
    with pytest.raises(CompressError, match="does not prune"):
        compress(zoo.model, target_ratio=8, batches=b, candidates=("w4g64+50%",), method="rtn")
    with pytest.raises(CompressError, match="give a budget"):
        compress(zoo.model, batches=b)
    with pytest.raises(CompressError, match="bad candidate"):
        compress(zoo.model, target_ratio=8, batches=b, candidates=("w4g64+zz",))
    with pytest.raises(CompressError, match="largest ratio within"):
        compress(zoo.model, target_ratio=12, max_loss=2e-5, batches=b, candidates=("w8", "w2g64"), method="rtn")
    with pytest.raises(CompressError, match="least reachable"):
        compress(zoo.model, max_loss=1e-7, batches=b, candidates=("w8", "w2g64"), method="rtn")
    r = compress(zoo.model, max_loss=0.05, batches=b, candidates=("w8", "w4g64", "w2g64"), method="rtn")
    assert r.allocation.loss <= 0.05 and r.ratio > 4 and isinstance(r.model.fc1, QuantModule)


def test_cli_compress_writes_a_model_recipe_and_plot(tmp_path):
    out = tmp_path / "c"
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", "digits-cnn", "--target-ratio", "16",
                        "--channels", "0.25", "--candidates", "w8,w4g64,w3g64+50%", "-o", str(out), "--recipe-out", str(tmp_path / "r.json"),
                        "--plot", str(tmp_path / "p.png"), "-q"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "smaller than FP32" in p.stdout and (tmp_path / "p.png").stat().st_size > 1000
    assert Recipe.load(tmp_path / "r.json").rules
    back = lowbit.load(out, model=DigitsCNN())
    assert isinstance(back.fc1, QuantModule) and back.fc1.in_features == 384  # 24 of 32 channels of 4 x 4
    shown = subprocess.run([sys.executable, "-m", "lowbit.cli", "inspect", str(out)], capture_output=True, text=True,
                           timeout=300).stdout  # fmt: skip
    assert "resized from 64x512" in shown and "before 4 were resized by structured pruning" in shown
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", "digits-cnn", "--target-ratio", "400",
                        "--candidates", "w4g64", "-o", str(tmp_path / "x"), "-q"], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert p.returncode == 2 and "largest reachable" in p.stderr and not (tmp_path / "x").exists()
    # several fixed choices separated by | are searched
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", "digits-cnn", "--target-ratio", "6",
                        "--candidates", "w8,w4g64", "--fixed", "fc2=w8|w2g32", "-o", str(tmp_path / "f"), "-q"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "fixed layers int8" in p.stdout and lowbit.load(tmp_path / "f", model=DigitsCNN()).fc2.scheme.format == "int8"


def test_compress_a_tied_llama_keeps_its_fixed_embedding_and_head_as_one_tensor(tmp_path):
    model, cal, meas = _tied_llama(vocab=256)
    r = compress(model, target_ratio=7, batches=meas, calibration=cal, fixed={"model.embed_tokens": "w4g32",
                 "lm_head": "w4g32"}, candidates=("w8", "w4g32", "w4g32+50%"), channels=0.5, distill_steps=3)  # fmt: skip
    q = r.model
    assert q.model.embed_tokens.qweight.data_ptr() == q.lm_head.qweight.data_ptr()  # still one tensor
    assert q.lm_head.method == "rtn" and q.lowbit_layers["model.layers.0.mlp.down_proj"].method.endswith("+qat")
    assert q.config.intermediate_size == 64 and r.ratio >= 7
    out = lowbit.save(q, tmp_path / "m")
    assert "lm_head.qweight" in json.loads((out / "lowbit.json").read_text())["aliases"]
    back = lowbit.load(out)
    ids = meas[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


def test_qat_keeps_steps_storable_as_float16_so_distillation_does_not_grow_the_model():
    from lowbit.qat import QATLayer

    def converted(lin: nn.Linear, step0: float | None = None) -> QuantModule:
        m = nn.Sequential(QATLayer(lin, lowbit.parse_scheme("int8")))
        if step0 is not None:
            with torch.no_grad():
                m[0].wq.step[0] = step0  # trained far below float16's normal range
        return lowbit.convert(m.eval())[0]

    torch.manual_seed(0)
    q = converted(nn.Linear(64, 8), 1e-7)
    ptq = lowbit.quantize(nn.Sequential(nn.Linear(64, 8)), "int8")[0]
    assert q.scales.dtype == torch.float16 and q.nbytes == ptq.nbytes
    tiny = nn.Linear(64, 8)
    with torch.no_grad():
        tiny.weight.mul_(1e-6)  # a weight whose post-training scales need float32 keeps them
    assert converted(tiny).scales.dtype == torch.float32


def test_one_measured_table_serves_other_ratios_and_candidate_subsets(digits):
    zoo, data = digits
    x = data["x_train"]
    b = [x[:128]]
    first = compress(zoo.model, target_ratio=6, batches=b, candidates=("w8", "w4g64", "w2g64"), method="rtn")
    again = compress(zoo.model, target_ratio=6, batches=b, candidates=("w8", "w4g64", "w2g64"), method="rtn",
                     measured=first.sensitivity)  # fmt: skip
    assert again.allocation.choice == first.allocation.choice and again.sensitivity is first.sensitivity
    sub = compress(zoo.model, target_ratio=5, batches=b, candidates=("w8", "w4g64"), method="rtn",
                   measured=first.sensitivity)  # fmt: skip
    assert set(sub.allocation.choice.values()) <= {"int8", "w4g64"} and sub.ratio >= 5
    with pytest.raises(CompressError, match="not measured"):
        compress(zoo.model, target_ratio=5, batches=b, candidates=("w3g64",), method="rtn", measured=first.sensitivity)
    with pytest.raises(CompressError, match="method"):
        compress(zoo.model, target_ratio=5, batches=b, candidates=("w8",), method="hqq", measured=first.sensitivity)


def test_a_sentence_encoder_is_measured_and_distilled_by_embedding_direction():
    transformers = pytest.importorskip("transformers")
    from lowbit.qat import fit

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(5)
    batch = lambda: {"input_ids": torch.randint(0, 128, (4, 16), generator=g),  # noqa: E731
                     "attention_mask": torch.ones(4, 16, dtype=torch.long)}  # fmt: skip
    cal, meas = [batch() for _ in range(2)], [batch()]
    r = compress(model, target_ratio=5, batches=meas, calibration=cal, candidates=("w8", "w4g32", "w2g32"),
                 fixed={"embeddings.word_embeddings": "w4g32"}, distill_steps=2)  # fmt: skip
    assert r.sensitivity.metric == "cosine" and r.ratio >= 5 and 0 <= r.kl < 1
    worst = max(r.sensitivity.loss.values(), key=lambda d: d["w2g32"])
    assert 0 < worst["int8"] < worst["w2g32"] < 1  # cosine distances, larger for fewer bits
    q = lowbit.quantize(copy.deepcopy(model), "w2g32")
    before = lowbit.mixed.output_kl(model, q, cal)
    lowbit.prepare_qat(q)
    losses = fit(q, cal, steps=30, teacher=model, lr=1e-3, step_lr=1e-3)
    assert sum(losses[-3:]) < sum(losses[:3])
    lowbit.convert(q)
    assert lowbit.mixed.output_kl(model, q, cal) < before  # on what it trained on: the loss reaches the result


def test_distillation_may_draw_a_fresh_batch_per_step(digits):
    zoo, data = digits
    x = data["x_train"]
    drawn = []

    def draw(i):
        drawn.append(i)
        return x[64 * i : 64 * (i + 1)]

    r = compress(zoo.model, target_ratio=6, batches=[x[:128]], candidates=("w8", "w4g64"), method="rtn",
                 distill_steps=3, distill_data=draw)  # fmt: skip
    assert drawn == [0, 1, 2] and len(r.distill_losses) == 3 and r.ratio >= 6



def test_depthwise_convolutions_need_a_fixed_choice_under_a_calibrated_method():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Flatten(),
                          nn.Linear(64 * 16, 10)).eval()  # fmt: skip
    x = [torch.randn(8, 3, 4, 4) for _ in range(2)]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CompressError, match=r"^1: grouped/depthwise convolutions cannot be calibrated by 'gptq'"):
        compress(model, target_ratio=4, batches=x, calibration=x, candidates=("w8", "w4g64"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    r = compress(model, target_ratio=4, batches=x, calibration=x, candidates=("w8", "w4g64"), fixed={"1": "w8"})
    assert r.ratio >= 4 and r.model[1].scheme.bits == 8 and r.method == "gptq"


def _tied_llama(vocab: int = 512):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(3)
    batch = lambda: {"input_ids": torch.randint(0, vocab, (2, 24), generator=g),  # noqa: E731
                     "attention_mask": torch.ones(2, 24, dtype=torch.long)}  # fmt: skip
    return model, [batch() for _ in range(2)], [batch()]


EMBED_CHOICES = ("w8", "w4g32", "w2g32")


def test_a_searched_embedding_takes_the_choice_the_budget_pays_for():
    model, cal, meas = _tied_llama()
    fixed = {"model.embed_tokens": EMBED_CHOICES, "lm_head": EMBED_CHOICES}
    kw = dict(batches=meas, calibration=cal, fixed=fixed, candidates=("w8", "w4g32", "w2g32"), method="gptq")
    loose = compress(model, target_ratio=3, **kw)
    # every choice is measured alone, and costs more the fewer bits it keeps
    assert list(loose.fixed_costs) == [format_choice(*parse_choice(c)) for c in EMBED_CHOICES]  # canonical names
    assert loose.fixed_costs["int8"] < loose.fixed_costs["w4g32"] < loose.fixed_costs["w2g32"]
    assert loose.fixed_choice == "int8"  # room for everything at 8 bits: the least KL wins
    q = loose.model
    assert q.model.embed_tokens.qweight.data_ptr() == q.lm_head.qweight.data_ptr()  # still one tensor
    assert q.lowbit_layers["lm_head"].scheme == "int8"
    # a ratio none reaches names the furthest any choice gets; just short of it only 2 bits fit
    with pytest.raises(CompressError, match=r"no fixed choice \(int8, w4g32, w2g32\).*largest reachable") as e:
        compress(model, target_ratio=40, **kw)
    furthest = float(re.search(r"largest reachable is ([\d.]+)x", str(e.value)).group(1))
    tight = compress(model, target_ratio=furthest * 0.995, **kw)
    assert tight.fixed_choice == "w2g32" and "int8" not in tight.fixed_costs and tight.ratio >= furthest * 0.995
    assert tight.model.lowbit_layers["lm_head"].scheme == "w2g32"
    # the max-loss budget alone takes the fewest bytes within it, the fixed layers' KL counted in it
    assert compress(model, max_loss=100.0, **kw).fixed_choice == "w2g32"
    limit = loose.fixed_costs["w2g32"] * 0.99  # 2 bits alone already cost more
    r = compress(model, max_loss=limit, **kw)
    assert r.fixed_choice in ("int8", "w4g32") and r.allocation.loss + r.fixed_costs[r.fixed_choice] <= limit


@pytest.mark.parametrize("fixed, match", [
    ({"model.embed_tokens": ("w8", "w4g32"), "lm_head": ("w8",)}, "searched together"),
    ({"model.embed_tokens": (), "lm_head": ()}, "searched together"),
    ({"model.embed_tokens": ("w8", "w9g7"), "lm_head": ("w8", "w9g7")}, "bad fixed choice"),
])  # fmt: skip
def test_bad_searched_fixed_choices_are_one_clear_error(fixed, match):
    model, cal, meas = _tied_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CompressError, match=match):
        compress(model, target_ratio=3, batches=meas, calibration=cal, fixed=fixed, candidates=("w8",), method="gptq")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_block_distillation_inside_compress_lowers_the_kl_and_refuses_models_without_blocks(digits):
    model, _cal, meas = _tied_llama()
    g = torch.Generator().manual_seed(5)  # enough tokens that fitting the blocks generalizes to `meas`
    cal = [{"input_ids": torch.randint(0, 512, (4, 32), generator=g), "attention_mask": torch.ones(4, 32, dtype=torch.long)}
           for _ in range(16)]  # fmt: skip
    kw = dict(target_ratio=7, batches=meas, calibration=cal, candidates=("w4g32", "w2g32"), method="gptq",
              fixed={"model.embed_tokens": "w8", "lm_head": "w8"})  # fmt: skip
    plain = compress(model, **kw)
    blocks = compress(model, distill_blocks=2, **kw)
    assert plain.block_errors == [] and len(blocks.block_errors) == 2  # one (before, after) per decoder layer
    assert all(after < before for before, after in blocks.block_errors)
    assert blocks.kl_before_distill == pytest.approx(plain.kl) and blocks.kl < plain.kl
    assert blocks.allocation.choice == plain.allocation.choice and blocks.nbytes == plain.nbytes
    assert "block distillation of 2 blocks" in blocks.summary()
    for bad in (-1, 1.5, True):
        with pytest.raises(CompressError, match="distill_blocks must be"):
            compress(model, distill_blocks=bad, **kw)
    with pytest.raises(CompressError, match="not a callable"):
        compress(model, distill_blocks=1, distill_data=lambda i: cal[0], **kw)
    zoo, data = digits
    x = data["x_train"]
    with pytest.raises(CompressError, match="chain of repeated blocks"):
        compress(zoo.model, target_ratio=4, batches=[x[:64]], calibration=[x[64:128]], distill_blocks=1)


def test_cli_block_distillation_of_a_model_without_blocks_is_one_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", "digits-cnn", "--target-ratio", "6",
                        "--distill-blocks", "1", "-o", str(tmp_path / "f"), "-q"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode != 0 and "chain of repeated blocks" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "f").exists()


def test_a_bits_per_weight_budget_with_hessian_costs_quantized_by_awq_gptq():
    """The decoder recipe of BENCHMARKS.md as one call: costs predicted from Hessian traces (measured
    with RTN: AWQ moves scales between layers, so no layer is measured alone under it), a budget in
    bits per weight on the searched layers, the recipe quantized by AWQ+GPTQ."""
    model, cal, meas = _tied_llama()
    before = copy.deepcopy(model.state_dict())
    fixed = {"model.embed_tokens": "w8", "lm_head": "w8"}
    kw = dict(batches=meas, calibration=cal, candidates=("w4g32", "w3g32", "w2g32"), fixed=fixed)
    r = compress(model, target_bpw=3.2, method="awq+gptq", cost="hessian", **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.sensitivity.info["method"] == "rtn" and r.sensitivity.info["cost"] == "hessian"
    assert r.method == "awq+gptq" and f"{r.searched_bpw:.3f} bits per weight" in r.summary()
    searched = set(r.sensitivity.layers)
    recs = r.model.lowbit_layers
    assert {recs[n].method for n in searched} == {"awq+gptq"} and recs["lm_head"].method == "rtn"
    assert len(set(r.allocation.choice.values())) >= 2  # 3.2 bits: a mix of 4, 3 and 2 bits
    rows = [x for x in lowbit.size_of(r.model).layers if x.name in searched]
    assert len(rows) == len(searched)
    stored_bpw = 8 * sum(x.bytes for x in rows) / sum(x.numel for x in rows)
    assert stored_bpw == pytest.approx(r.searched_bpw) and r.searched_bpw <= 3.2
    # the same layers measured by the calibrated method instead, and KL costs: another table
    kl = compress(model, target_bpw=3.2, method="awq+gptq", measure_method="gptq", **kw)
    assert kl.sensitivity.info["method"] == "gptq" and kl.sensitivity.info["cost"] == "kl"
    with pytest.raises(CompressError, match="cost 'kl' \\(here 'hessian'\\)"):
        compress(model, target_bpw=3.2, method="awq+gptq", measure_method="gptq", cost="hessian",
                 measured=kl.sensitivity, **kw)  # fmt: skip
    # a bits-per-weight budget no choice reaches names the fewest reachable
    with pytest.raises(CompressError, match=r"reaches 2 bits per weight.*fewest reachable is 2\.5"):
        compress(model, target_bpw=2, method="rtn", cost="hessian", **kw)
    least = sum(min(c.values()) for c in r.sensitivity.loss.values())  # every layer at 4 bits
    with pytest.raises(CompressError, match=r"2\.6 bits per weight costs .* the fewest bits per weight within it is"):
        compress(model, target_bpw=2.6, max_loss=1.2 * least, method="rtn", measured=r.sensitivity, cost="hessian", **kw)


@pytest.mark.parametrize("bad, match", [
    ({"target_bpw": 3.0, "target_ratio": 8}, "one size budget"),
    ({"target_bpw": 0}, "target_bpw must be"),
    ({"target_bpw": "3"}, "target_bpw must be"),
    ({"target_bpw": True}, "target_bpw must be"),
    ({"target_bpw": float("nan")}, "target_bpw must be"),
    ({"target_ratio": 4, "cost": "fisher"}, "cost must be"),
    ({"target_ratio": 4, "cost": "hessian", "base": "w4g32"}, "cost='hessian'"),
    ({"target_ratio": 4, "method": "awq+gptq", "measure_method": "awq"}, "moves scales"),
    ({"target_ratio": 4, "candidates": ("w4g32+50%",), "method": "sparsegpt", "measure_method": "gptq"},
     "measure_method 'gptq' does not prune"),
    ({"target_ratio": 4, "distill_steps": True}, "distill_steps must be"),
    ({"target_ratio": 4, "distill_steps": 5, "lr": float("nan")}, "lr must be a positive"),
    ({"target_ratio": 4, "lr": 0}, "lr must be a positive"),
    ({"max_loss": "abc"}, "max loss must be a number"),
    ({"max_loss": -1}, "max loss must be positive"),
    ({"target_ratio": 4, "distill_steps": 5, "distill_data": []}, "distill_data holds no batches"),
    ({"target_ratio": 4, "candidates": ("w4g32", "w4g32+r4096")}, "rank 4096 is not below the smaller side"),
    ({"target_ratio": 4, "fixed": {"model.embed_tokens": "w8", "lm_haed": "w8"}}, "'lm_haed' match no module"),
])  # fmt: skip
def test_bad_budgets_costs_and_measure_methods_are_one_clear_error(bad, match):
    from lowbit.mixed import MixedPrecisionError

    model, cal, meas = _tied_llama()
    before = copy.deepcopy(model.state_dict())
    kw = {"batches": meas, "calibration": cal, "candidates": ("w4g32", "w2g32"), **bad}
    with pytest.raises((CompressError, MixedPrecisionError), match=match):
        compress(model, **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("args, message", [
    (["--target-ratio", "6", "--distill-steps", "5", "--distill-samples", "0"], "--distill-samples takes a positive"),
    (["--target-ratio", "6", "--samples", "-1"], "--samples takes a positive"),
    (["--target-ratio", "6", "--lr", "nan"], "--lr takes a positive"),
    (["--max-loss", "abc"], "max loss must be a number"),
    (["--target-ratio", "6", "--fixed", "fc1=w8,fc1=w4g64"], "names 'fc1' twice"),
    (["--target-ratio", "6", "--fixed", "fc9=w8"], "'fc9' match no module"),
    (["--target-ratio", "6", "--calib-domains", "quotes"], "calibrates on images"),
    (["--target-ratio", "6", "--candidates", "w4g64+r4096,w8"], "rank 4096 is not below"),
    (["--target-ratio", "6", "-o", "FILE"], "exists and is not a directory"),
])  # fmt: skip
def test_cli_compress_bad_options_fail_before_any_work(tmp_path, args, message):
    f = tmp_path / "afile"
    f.write_text("mine")
    args = [str(f) if a == "FILE" else a for a in args]
    out = [] if "-o" in args else ["-o", str(tmp_path / "out")]
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", "digits-cnn", *args, *out, "-q"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert f.read_text() == "mine" and not (tmp_path / "out").exists()


def test_cli_compress_help_and_an_already_quantized_model(tmp_path):
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "+50%" in p.stdout, p.stderr  # the default candidates hold a % sign
    done = tmp_path / "done"
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", "digits-cnn", "--target-ratio", "6",
                        "-o", str(done), "-q"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", str(done), "--target-ratio", "6",
                        "-o", str(tmp_path / "again"), "-q"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 2 and "already quantized" in p.stderr and "compress the float model" in p.stderr, p.stderr
    assert not (tmp_path / "again").exists()


def test_cli_compress_to_bits_per_weight_with_hessian_costs(tmp_path):
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", "digits-cnn", "--target-bpw", "3.5",
                        "--cost", "hessian", "--candidates", "w8,w4g64,w2g64", "--method", "rtn",
                        "-o", str(tmp_path / "c"), "-q"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    bpw = float(re.search(r"([\d.]+) bits per weight", p.stdout).group(1))
    assert 2.0 < bpw <= 3.5
    back = lowbit.load(tmp_path / "c", model=DigitsCNN())
    assert all(isinstance(back.get_submodule(n), QuantModule) for n in ("conv2", "fc1", "fc2"))
    # a data-free --measure-method alone leaves the default, calibrated method quantizing the recipe
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", "digits-cnn", "--target-ratio", "6",
                        "--candidates", "w8,w4g64", "--measure-method", "rtn", "-o", str(tmp_path / "m"), "-q"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "; gptq: " in p.stdout
