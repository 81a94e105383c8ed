"""The calibration driver on small real architectures: block walking, statistics, scale folding,
restoring on error, and the errors users meet."""

import copy
import warnings

import pytest
import torch

import lowbit
from lowbit.calibrate import CalibrationError, find_blocks
from lowbit.evaluate.data import DataError, calibration_batches
from lowbit.primitives import NonFiniteError

transformers = pytest.importorskip("transformers")


def tiny_llama(kv_heads=2):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, as trained models have
        for layer in m.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    return m


def batches(n=4, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, t), generator=g) for _ in range(n)]


IDS = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(9))


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def test_blocks_are_found():
    name, blocks = find_blocks(tiny_llama())
    assert name == "model.layers" and len(blocks) == 3


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_calibrated_methods_quantize_every_block(method):
    m = tiny_llama()
    ref = logits(m)
    lowbit.quantize(m, "w4g32", method=method, calibration=batches())
    recs = m.lowbit_layers
    assert sum(r.status == "quantized" and r.method == method for r in recs.values()) == 3 * 7
    got = logits(m)
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 0.2


def test_awq_folds_scales_exactly_and_v_to_o_only_without_gqa():
    for kv in (4, 2):  # 4 = one value head per query head (o_proj folds into v_proj)
        m = tiny_llama(kv_heads=kv)
        norm_before = m.model.layers[0].input_layernorm.weight.clone()
        lowbit.quantize(m, "w8g32", method="awq", calibration=batches())
        assert not torch.equal(m.model.layers[0].input_layernorm.weight, norm_before)  # a scale moved


def test_awq_folds_scales_in_a_bf16_model():
    """Storing the scaled weights in bfloat16 moves the block's output by a few 1e-3 (half the
    dtype's epsilon): that is rounding, not a broken fold, so the scales stay (no warning)."""
    m = tiny_llama().to(torch.bfloat16)
    norm_before = m.model.layers[0].input_layernorm.weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "got no activation scales"
        lowbit.quantize(m, "w4g32", method="awq", calibration=batches(t=64))
    assert not torch.equal(m.model.layers[0].input_layernorm.weight, norm_before)


def test_awq_without_blocks_says_it_folds_no_scales():
    m = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    with pytest.warns(UserWarning, match="no chain of repeated blocks"):
        lowbit.quantize(m, "w4g32", method="awq", calibration=[torch.randn(4, 64, 64)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # blocks found, head outside them: no warning
        lowbit.quantize(tiny_llama(), "w4g32", method="awq", calibration=batches(t=64))


def test_fewer_calibration_tokens_than_input_channels_warn():
    with pytest.warns(UserWarning, match="gptq: 8 calibration tokens reached a layer with 64 input channels"):
        lowbit.quantize(tiny_llama(), "w4g32", method="gptq", calibration=[torch.randint(0, 128, (1, 8))])


def test_gptq_beats_rtn_on_the_calibration_objective():
    m = tiny_llama()
    ref = logits(m)
    errs = {}
    for method in ("rtn", "gptq"):
        q = lowbit.quantize(copy.deepcopy(m), "w3g32", method=method, calibration=batches(n=8))
        errs[method] = float((logits(q) - ref).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


def _weights(m) -> dict:
    out = {}
    for n, mod in m.named_modules():
        if hasattr(mod, "qweight"):
            out[n] = mod.qw.dequantize()
            if getattr(mod, "act_scale", None) is not None:
                out[n + ".act"] = torch.stack([mod.act_scale.float(), mod.act_zero.float()])
    return out


@pytest.mark.parametrize("method, scheme", [("gptq", "w4g32"), ("rtn", "w8a8-static")])
def test_padding_tokens_do_not_enter_the_statistics(method, scheme):
    """A padded tokenizer batch calibrates as its unpadded rows do: positions whose attention
    mask is 0 feed no inference output and must not weigh in the Hessian or an input range.
    (``sequential`` calibrates each layer on the already-rounded ones, turning float-summation
    differences into different rounding decisions; it is not compared here.)"""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 128, (4, 24), generator=g)
    lengths = [24, 9, 16, 5]
    mask = torch.zeros(4, 24, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    padded = [{"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}]
    unpadded = [{"input_ids": ids[i : i + 1, :n], "attention_mask": torch.ones(1, n, dtype=torch.long)}
                for i, n in enumerate(lengths)]  # fmt: skip
    m = tiny_llama()
    a = _weights(lowbit.quantize(copy.deepcopy(m), scheme, method=method, calibration=padded))
    b = _weights(lowbit.quantize(copy.deepcopy(m), scheme, method=method, calibration=unpadded))
    assert a.keys() == b.keys() and len(a) >= 3 * 7
    for n in a:
        if n.endswith(".act"):
            assert torch.allclose(a[n], b[n], rtol=1e-4), n  # the input ranges of real tokens only
    same = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
    assert same > 0.999, same  # (float sums in another order may flip a rare tie)


def test_sequential_option():
    m = tiny_llama()
    ref = logits(m)
    errs = {}
    for opts in ({}, {"sequential": True}):
        q = lowbit.quantize(copy.deepcopy(m), "w3g32", method="gptq", calibration=batches(n=8), **opts)
        errs[str(opts)] = float((logits(q) - ref).pow(2).mean())
    assert len(set(errs.values())) == 2, errs  # the later layers' Hessians see the earlier ones' rounding
    rtn = float((logits(lowbit.quantize(copy.deepcopy(m), "w3g32")) - ref).pow(2).mean())
    assert max(errs.values()) < rtn, (errs, rtn)
    with pytest.raises(ValueError, match="sequential"):
        lowbit.quantize(copy.deepcopy(m), "w4g32", method="awq", calibration=batches(), sequential=True)


def test_missing_or_empty_calibration():
    with pytest.raises(CalibrationError, match="needs calibration data"):
        lowbit.quantize(tiny_llama(), "w4g32", method="gptq")
    with pytest.raises(CalibrationError, match="empty"):
        lowbit.quantize(tiny_llama(), "w4g32", method="gptq", calibration=[])
    with pytest.raises(CalibrationError, match="must be a tensor"):
        lowbit.quantize(tiny_llama(), "w4g32", method="gptq", calibration=["some text"])


def test_sequences_longer_than_the_context():
    with pytest.raises(CalibrationError, match="exceed the model's context of 64"):
        lowbit.quantize(tiny_llama(), "w4g32", method="gptq", calibration=[torch.zeros(1, 100, dtype=torch.long)])


def test_token_ids_outside_the_vocabulary_are_named_before_any_work():
    m = tiny_llama()
    vocab = m.get_input_embeddings().num_embeddings
    before = copy.deepcopy(m.state_dict())
    for bad in (vocab, -1):
        ids = torch.zeros(1, 8, dtype=torch.long)
        ids[0, 3] = bad
        with pytest.raises(CalibrationError, match=f"vocabulary is 0..{vocab - 1}: was the text tokenized with another"):
            lowbit.quantize(m, "w4g32", method="gptq", calibration=[torch.zeros(1, 8, dtype=torch.long), ids])
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the model unchanged


def test_method_that_cannot_serve_the_scheme():
    with pytest.raises(lowbit.QuantizeError, match="cannot serve scheme fp16"):
        lowbit.quantize(tiny_llama(), "fp16", method="awq", calibration=batches())
    with pytest.raises(lowbit.QuantizeError, match="SmoothQuant is for W8A8"):
        lowbit.quantize(tiny_llama(), "w4g32", method="smoothquant", calibration=batches())


def test_an_error_midway_restores_every_module_and_folded_tensor():
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}

    calls = []

    def fail(mod, args):  # the first call is the driver's check that blocks chain; fail later
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("interrupted in block 2")

    h = m.model.layers[2].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="interrupted in block 2"):
        lowbit.quantize(m, "w4g32", method="awq", calibration=batches())
    h.remove()
    assert isinstance(m.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # folded norms and weights put back


def test_nan_weights_are_named_before_any_work():
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="model.layers.2.mlp.down_proj"):
        lowbit.quantize(m, "w4g32", method="awq", calibration=batches())
    assert isinstance(m.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_a_fold_that_would_change_the_block_is_undone_with_a_warning():
    class OffsetNorm(torch.nn.Module):  # weight applied as (1 + w): 1/s does not fold into w
        def __init__(self, k):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(k))

        def forward(self, x):
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + self.weight)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = OffsetNorm(32)
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    torch.manual_seed(0)
    net = Net()
    norms = [b.norm.weight.detach().clone() for b in net.blocks]
    ref = copy.deepcopy(net)
    x = torch.randn(4, 16, 32)
    with pytest.warns(UserWarning, match="2 group.*no activation scales.*blocks.0.fc"):
        lowbit.quantize(net, "w4g32", method="awq", calibration=[x])
    assert all(torch.equal(b.norm.weight, w) for b, w in zip(net.blocks, norms))  # the folds were undone
    rtn = lowbit.quantize(copy.deepcopy(ref), "w4g32")
    assert all(isinstance(b.fc, lowbit.nn.QuantLinear) for b in net.blocks)
    with torch.no_grad():  # unscaled: AWQ's clip search alone, no worse than rounding
        assert float((net(x) - ref(x)).norm()) <= float((rtn(x) - ref(x)).norm()) * 1.01


def test_awq_on_a_post_norm_encoder():
    """BERT's LayerNorm after attention feeds the MLP's first linear *and* the residual: scales
    folded into it would change the block, so that group stays unscaled; the rest are scaled."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    m = transformers.BertModel(cfg).eval()
    ref = copy.deepcopy(m)
    cal = [torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.warns(UserWarning, match="awq: 2 group.*intermediate.dense"):
        lowbit.quantize(m, "w4g32", method="awq", calibration=cal)
    x = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        a, b = m(x).last_hidden_state.flatten(), ref(x).last_hidden_state.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_generic_model_without_blocks(digits):
    zoo, data = digits
    m = copy.deepcopy(zoo.model)
    cal = [data["x_train"][i : i + 64] for i in range(0, 256, 64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(m, "w4g16", method="gptq", calibration=cal)
    from lowbit.evaluate.classification import accuracy

    assert accuracy(m, data["x_test"], data["y_test"]) > 0.95


def test_calibration_batches_from_the_text(smollm2_tokenizer=None):
    from lowbit.models.zoo import load_model

    tok = load_model("smollm2-135m").tokenizer
    b = calibration_batches(tok, nsamples=10, seqlen=64, batch_size=4, seed=1)
    assert [x.shape for x in b] == [(4, 64), (4, 64), (2, 64)]
    again = calibration_batches(tok, nsamples=10, seqlen=64, batch_size=4, seed=1)
    assert all(torch.equal(a, c) for a, c in zip(b, again))
    other = calibration_batches(tok, nsamples=10, seqlen=64, batch_size=4, seed=2)
    assert not torch.equal(b[0], other[0])
    with pytest.raises(DataError, match="need at least"):
        calibration_batches(tok, nsamples=100000, seqlen=512)


def test_stats_gather_fourth_moments_that_merge_and_rescale():
    """Stats' pairwise fourth moments (the shrinkage's entry variances): the standardized
    E[z_i^2 z_j^2] over the sampled channels, equal whether gathered at once or merged from two
    parts (as Ray workers' are), and unchanged when a scale moves into the weights (AWQ)."""
    from lowbit.algorithms.moments import cokurtosis
    from lowbit.calibrate import Stats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 320, generator=g) * torch.rand(300, 1, generator=g) * 3
    whole, a, b = (Stats(320, frozenset({"hessian", "fourth", "absmean"})) for _ in range(3))
    whole.add(x)
    a.add(x[:100])
    b.add(x[100:])
    a.merge(b)
    ch = whole.channels
    sq = x[:, ch].square()
    want = cokurtosis(sq.t() @ sq / 300, sq.mean(0))
    assert ch.numel() == 256 and torch.allclose(whole.kurtosis, want, rtol=1e-4)
    assert a.tokens == 300 and torch.allclose(a.kurtosis, want, rtol=1e-4) and torch.allclose(a.h, whole.h, rtol=1e-4, atol=1e-3)
    assert float(want.diagonal().mean()) > 2 and float(want.mean()) > 1.5  # tokens of unequal loudness
    whole.rescale(torch.rand(320, generator=g) + 0.5)
    assert torch.allclose(whole.kurtosis, want, rtol=1e-3)
    assert Stats(320, frozenset({"hessian"})).kurtosis is None
