"""quantize(): module swap, per-layer records, recipes, and the errors users meet."""

import copy
import warnings

import pytest
import torch

import lowbit
from lowbit.nn import QuantConv2d, QuantEmbedding, QuantLinear
from lowbit.primitives import NonFiniteError
from lowbit.recipe import Recipe


def test_default_scheme_swaps_linear_and_conv_keeps_embedding(toy, toy_inputs):
    ref = toy(*toy_inputs)
    with pytest.warns(UserWarning, match=r"conv1d \(Conv1d"):
        lowbit.quantize(toy, "int8")
    assert isinstance(toy.fc1, QuantLinear) and isinstance(toy.fc2, QuantLinear)
    assert isinstance(toy.conv, QuantConv2d)
    assert isinstance(toy.emb, torch.nn.Embedding)  # embeddings stay float by default
    rec = toy.lowbit_layers
    assert rec["fc1"].status == "quantized" and rec["fc1"].scheme == "int8" and rec["fc1"].method == "rtn"
    assert rec["emb"].status == "kept" and "embedding" in rec["emb"].reason
    assert rec["conv1d"].status == "unsupported"
    assert "norm" not in rec  # 1-D parameters are not weights to quantize
    out = toy(*toy_inputs)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_recipe_rules_first_match_wins_and_can_include_embeddings(toy):
    r = Recipe.from_scheme("w4g32").add("fc2", "skip").add("emb", "w8g8").add("fc*", "int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(toy, r)
    assert isinstance(toy.fc2, torch.nn.Linear)
    assert toy.fc1.scheme == lowbit.parse_scheme("int8")
    assert isinstance(toy.emb, QuantEmbedding) and str(toy.emb.scheme) == "w8g8"
    assert str(toy.conv.scheme) == "w4g32"
    assert toy.lowbit_layers["fc2"].reason == "rule 'fc2'"


def test_rule_naming_an_unsupported_module_raises(toy):
    before = copy.deepcopy(toy.state_dict())
    with pytest.raises(lowbit.UnsupportedModuleError, match=r"conv1d \(Conv1d"):
        lowbit.quantize(toy, Recipe.from_scheme("int8").add("conv1d", "int8"))
    # nothing was swapped before the error
    assert isinstance(toy.fc1, torch.nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in toy.state_dict().items())


def test_nan_weights_raise_naming_the_layer(toy):
    with torch.no_grad():
        toy.fc2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="fc2.weight"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowbit.quantize(toy, "w4g8")


@pytest.mark.parametrize("bad", ["int9", "w4g7", "nonsense"])
def test_bad_scheme_strings(toy, bad):
    with pytest.raises(lowbit.SchemeError, match="scheme :="):
        lowbit.quantize(toy, bad)


def test_unknown_method_and_option(toy):
    with pytest.raises(ValueError, match="unknown method"):
        lowbit.quantize(toy, "int8", method="magic")
    with pytest.raises(ValueError, match="takes no option"):
        lowbit.quantize(toy, "int8", damp=0.1)
    with pytest.raises(ValueError, match="clip="):
        lowbit.quantize(toy, "int8", clip="max")


def test_activation_schemes_are_refused_not_ignored(toy):
    with pytest.raises(lowbit.QuantizeError, match="activation quantization"):
        lowbit.quantize(toy, "w8a8")


def test_not_a_module():
    with pytest.raises(lowbit.QuantizeError):
        lowbit.quantize("model", "int8")  # type: ignore[arg-type]


def test_clip_mse_lowers_weight_error(toy, toy_inputs):
    errs = {}
    for clip in ("minmax", "mse"):
        m = copy.deepcopy(toy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowbit.quantize(m, "w3g8", clip=clip)
        w = m.fc1.qw.dequantize()
        errs[clip] = float((w - toy.fc1.weight.detach()).pow(2).sum())
    assert errs["mse"] <= errs["minmax"]


def test_tied_embedding_and_head_share_one_quantized_weight():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, 32)
            self.body = torch.nn.Linear(32, 32)
            self.lm_head = torch.nn.Linear(32, 64, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, idx):
            return self.lm_head(torch.relu(self.body(self.embed(idx))))

    m = Tied()
    r = Recipe.from_scheme("int8").add("embed", "w4g32").add("lm_head", "w4g32")
    lowbit.quantize(m, r)
    assert m.embed.qweight is m.lm_head.qweight  # stored once
    from lowbit.nn import shared_row_conversion

    with shared_row_conversion():  # as lowbit.save sees it: the shared weight converted once
        state = m.state_dict()
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in state.values()}
    assert lowbit.size_of(m).total_bytes == sum(unique.values())  # the shared weight counts once
    out = m(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 64)


def test_size_of_counts_exact_bytes(toy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(toy, "w4g8")
    s = lowbit.size_of(toy)
    fc1 = next(r for r in s.layers if r.name == "fc1")
    assert fc1.bytes == 72 * 40 // 2 + 72 * 5 * 2  # codes + fp16 scales
    assert fc1.bits_per_weight == pytest.approx(4 + 16 / 8)
    assert s.total_bytes == sum(t.numel() * t.element_size() for t in toy.state_dict().values())


def test_hf_conv1d_is_quantized_as_linear():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = m(ids).logits
    lowbit.quantize(m, "int8")
    attn = m.transformer.h[0].attn.c_attn
    assert isinstance(attn, QuantLinear) and attn.weight_shape == (96, 32)
    assert m.lowbit_layers["lm_head"].status == "kept"
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, ref, atol=0.05 * float(ref.abs().max()))


def test_casting_a_quantized_model_keeps_its_stored_format(toy, toy_inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(toy, "w4g8")
    with torch.no_grad():
        ref = toy(*toy_inputs)
        toy.to(torch.bfloat16)
        assert toy.fc1.scales.dtype == torch.float16 and toy.fc1.qweight.dtype == torch.uint8
        assert toy.fc1.bias.dtype == torch.bfloat16  # float parameters do follow the cast
        out = toy(toy_inputs[0], toy_inputs[1].to(torch.bfloat16)).float()
    assert torch.allclose(out, ref, atol=0.05 * float(ref.abs().max()))


def test_an_error_midway_leaves_the_model_untouched(toy):
    with torch.no_grad():
        toy.fc2.weight[3, 3] = float("inf")  # fc1 and conv come first and would quantize fine
    with pytest.raises(NonFiniteError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowbit.quantize(toy, "int8")
    assert isinstance(toy.fc1, torch.nn.Linear) and isinstance(toy.conv, torch.nn.Conv2d)
    assert not getattr(toy, "lowbit_layers", None)


def test_unknown_kernel_name_is_an_error(toy):
    from lowbit.kernels import KernelError

    with pytest.raises(KernelError, match="unknown kernel 'cuda-magic'"):
        lowbit.quantize(toy, "int8", kernel="cuda-magic")
    assert isinstance(toy.fc1, torch.nn.Linear)


def test_state_dict_holds_the_row_layout(toy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(toy, "w4g32")
    sd = toy.state_dict()
    assert sd["fc1.qweight"].shape == (72, 20)  # rows x packed bytes, whatever the kernel reads
    assert sd["fc1.scales"].shape == (72, 2)
    fresh = copy.deepcopy(toy)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.fc1.qw.dequantize(), toy.fc1.qw.dequantize())
