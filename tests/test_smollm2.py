"""Real-model checks on SmolLM2-135M (offline zoo). Marked slow; CI runs them."""

import copy

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.evaluate.perplexity import perplexity

pytestmark = pytest.mark.slow

TOKENS = 4096  # 8 windows of 512 held-out tokens


@pytest.fixture(scope="module")
def fp32_ppl(smollm2):
    return perplexity(smollm2.model, smollm2.tokenizer, max_tokens=TOKENS).ppl


@pytest.fixture(scope="module")
def int4(smollm2):
    return lowbit.quantize(copy.deepcopy(smollm2.model), "w4g64")


def test_int8_per_channel_size_and_perplexity(smollm2, fp32_ppl):
    m = lowbit.quantize(copy.deepcopy(smollm2.model), "int8")
    size = lowbit.size_of(m)
    assert len(size.quantized) == 30 * 7
    assert size.quantized_compression >= 3.9
    assert all(r.kernel == "cpu" for r in size.quantized) or kernels.cpu.unavailable_reason()
    r = perplexity(m, smollm2.tokenizer, max_tokens=TOKENS)
    # The +0.5% floor is stated on Debian's python3.11-doc text (what `make setup` installs);
    # the stdlib fallback text is 20x smaller and measured +0.8% (BENCHMARKS.md uses the former).
    limit = 1.005 if r.source == "python3.11-doc" else 1.01
    assert r.ppl <= fp32_ppl * limit, (r.ppl, fp32_ppl, r.source)


def test_int4_g64_size_and_perplexity(smollm2, int4, fp32_ppl):
    size = lowbit.size_of(int4)
    assert size.quantized_compression >= 7.0
    assert size.quantized_bits_per_weight <= 4.57
    assert size.quantized_bits_per_weight == pytest.approx(4.25)
    ppl = perplexity(int4, smollm2.tokenizer, max_tokens=TOKENS).ppl
    # RTN at 4 bits costs SmolLM2 real perplexity (see BENCHMARKS.md); guard against regressions
    assert fp32_ppl < ppl < fp32_ppl * 1.5


@pytest.mark.skipif(kernels.cpu.unavailable_reason() is not None, reason="no VNNI kernel here")
def test_fast_kernel_matches_reference_on_the_real_model(smollm2, int4):
    ids = torch.tensor([list(range(100, 164))])
    with torch.no_grad():
        fast = int4(input_ids=ids).logits
        kernels.use_kernel(int4, "reference")
        ref = int4(input_ids=ids).logits
        kernels.use_kernel(int4, "auto")
    assert float((fast - ref).abs().max()) < 2e-3 * float(ref.abs().max())
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))


def test_g128_on_576_wide_layers_pads_the_last_group(smollm2):
    m = lowbit.quantize(copy.deepcopy(smollm2.model), "w4g128")
    q = m.model.layers[0].self_attn.q_proj
    assert q.qw.scales().shape == (576, 5)  # 576 = 4 x 128 + 64
    assert lowbit.size_of(m).quantized_bits_per_weight == pytest.approx(
        sum(r.bytes for r in lowbit.size_of(m).quantized) * 8 / sum(r.numel for r in lowbit.size_of(m).quantized)
    )
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_save_load_identical_logits_and_inspect(tmp_path, smollm2, int4):
    lowbit.save(int4, tmp_path / "s", tokenizer=smollm2.tokenizer, source="smollm2-135m")
    back = lowbit.load(tmp_path / "s")
    ids = smollm2.tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, int4(input_ids=ids).logits)
    layers = back.lowbit_layers
    assert sum(r.status == "quantized" for r in layers.values()) == 210
    assert layers["lm_head"].status == "kept" and layers["model.embed_tokens"].status == "kept"
    # the file is smaller than FP32 by the Linear layers' compression (embeddings stay FP32)
    file_bytes = (tmp_path / "s" / "model.safetensors").stat().st_size
    assert file_bytes < 0.35 * 4 * 134.5e6
