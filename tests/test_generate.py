"""lowbit.generate: the lean decoder gives transformers' tokens, on float and quantized models."""

import copy

import pytest
import torch
import transformers

import lowbit
from lowbit.generate import Decoder, GenerateError


def tiny_llama(kv_heads=2, context=64, **extra):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=kv_heads,
                                   max_position_embeddings=context, **extra)  # fmt: skip
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
        m.lm_head.weight.mul_(20)  # peaked distributions: greedy choices far from ties
    return m


def hf_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)  # fmt: skip


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_greedy_tokens_equal_transformers_generate(kv_heads):
    m = tiny_llama(kv_heads)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    want = hf_greedy(m, ids, 30)
    got = lowbit.generate(m, ids, 30, eos_token_id=[])
    assert torch.equal(got, want)


def test_quantized_models_decode_the_same_tokens_as_transformers():
    m = lowbit.quantize(tiny_llama(), "w4g32")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(lowbit.generate(m, ids, 24, eos_token_id=[]), hf_greedy(m, ids, 24))


def test_logits_match_the_model_forward_and_chunked_feeding_matches_one_pass():
    m = tiny_llama()
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(input_ids=ids[None]).logits[0]
    one = Decoder(m, 20)
    assert torch.allclose(one.feed(ids), full[-1], atol=1e-4, rtol=1e-4)
    parts = Decoder(m, 20)
    parts.feed(ids[:8])
    assert torch.allclose(parts.feed(ids[8:13]), full[12], atol=1e-4, rtol=1e-4)  # a chunk after a prefix
    for i in range(13, 20):
        last = parts.feed(ids[i : i + 1])
    assert torch.allclose(last, full[-1], atol=1e-4, rtol=1e-4)


def test_int8_kv_cache_is_smaller_and_close():
    m = tiny_llama()
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(4))
    f, q = Decoder(m, 30), Decoder(m, 30, kv_cache="int8")
    a, b = f.feed(ids), q.feed(ids)
    assert q.nbytes_cache() < 0.35 * f.nbytes_cache()
    assert float((a - b).abs().max()) < 0.02 * float(a.abs().max())
    assert int(a.argmax()) == int(b.argmax())


def test_eos_stops_and_streaming_sees_every_token():
    m = tiny_llama()
    ids = torch.tensor([[5, 6, 7]])
    free = lowbit.generate(m, ids, 12, eos_token_id=[])
    stop = int(free[0, 3 + 4])  # the fifth new token
    seen = []
    out = lowbit.generate(m, ids, 12, eos_token_id=stop, on_token=seen.append)
    first = free[0, 3:].tolist().index(stop)
    assert out[0, 3:].tolist() == free[0, 3 : 3 + first + 1].tolist() == seen


def test_sampling_is_reproducible_with_a_seed():
    m = tiny_llama()
    ids = torch.tensor([[1, 2, 3]])
    a = lowbit.generate(m, ids, 10, temperature=1.0, top_k=20, seed=7, eos_token_id=[])
    b = lowbit.generate(m, ids, 10, temperature=1.0, top_k=20, seed=7, eos_token_id=[])
    assert torch.equal(a, b) and a.shape == (1, 13)


def test_bad_requests_get_one_clear_error():
    m = tiny_llama(context=16)
    with pytest.raises(GenerateError, match="empty prompt"):
        lowbit.generate(m, torch.tensor([], dtype=torch.long), 4)
    with pytest.raises(GenerateError, match="the prompt has 16 tokens; the model's context is 16"):
        lowbit.generate(m, torch.arange(16), 4)
    with pytest.raises(GenerateError, match=r"prompt \(10\) \+ max_new_tokens \(7\) exceed the model's context of 16"):
        lowbit.generate(m, torch.arange(10), 7)
    with pytest.raises(GenerateError, match="batch 1"):
        lowbit.generate(m, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(GenerateError, match="not a Llama-family decoder"):
        lowbit.generate(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.tensor([1]), 4)
    with pytest.raises(GenerateError, match="max_new_tokens must be at least 1"):
        lowbit.generate(m, torch.tensor([1]), 0)
    scaled = tiny_llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(GenerateError, match="rope type 'linear'"):
        lowbit.generate(scaled, torch.tensor([1]), 2)


def test_smollm2_greedy_tokens_equal_transformers_fp32_and_int4(smollm2):
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    for model in (smollm2.model, lowbit.quantize(copy.deepcopy(smollm2.model), "w4g64")):
        assert torch.equal(lowbit.generate(model, ids, 20, eos_token_id=[]), hf_greedy(model, ids, 20))


@pytest.mark.parametrize("scheme", ["w4g32", "int8", "w2g32-asym", "nf4g32"])
def test_the_one_call_layer_path_matches_the_torch_path(scheme, isa):
    """Packed-kernel models decode each step in one C call per layer; other formats (nf4) take
    the torch path. Both give the same logits."""
    m = lowbit.quantize(tiny_llama(), scheme)
    ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(5))
    fast, slow = Decoder(m, 12), Decoder(m, 12)
    assert (fast.fast is not None) == (scheme != "nf4g32")
    slow.fast = None
    fast.feed(ids[:5]), slow.feed(ids[:5])
    for t in ids[5:]:
        a, b = fast.feed(t.reshape(1)), slow.feed(t.reshape(1))
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_perplexity_through_the_decoder_cache(smollm2):
    from lowbit.evaluate.perplexity import perplexity

    base = perplexity(smollm2.model, smollm2.tokenizer, max_tokens=1024, seqlen=256)
    f32 = perplexity(smollm2.model, smollm2.tokenizer, max_tokens=1024, seqlen=256, kv_cache="float32")
    i8 = perplexity(smollm2.model, smollm2.tokenizer, max_tokens=1024, seqlen=256, kv_cache="int8")
    assert f32.ppl == pytest.approx(base.ppl, rel=1e-4)  # the decoder is the model's forward
    assert i8.ppl != f32.ppl and i8.ppl == pytest.approx(f32.ppl, rel=0.02)  # int8 keys/values: a small cost


def test_sampling_arguments_and_token_ids_are_checked():
    m = tiny_llama()
    for kw, msg in (({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                    ({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k")):  # fmt: skip
        with pytest.raises(GenerateError, match=msg):
            lowbit.generate(m, torch.tensor([1, 2]), 3, **kw)
    with pytest.raises(GenerateError, match="token ids must lie in 0 .. 127"):
        lowbit.generate(m, torch.tensor([1, 500]), 3)
    assert lowbit.generate(m, torch.tensor([1, 2], dtype=torch.int16), 2, eos_token_id=[]).shape == (1, 4)


def test_a_nan_in_the_residual_stream_reaches_the_logits_as_in_the_torch_path(isa):
    """Integer activations cannot carry NaN/inf: the one-call layer refuses them (leaving its
    input as it came) and the step runs in float, as the torch path does."""
    m = lowbit.quantize(tiny_llama(), "w4g32")
    with torch.no_grad():
        m.model.embed_tokens.weight[7, 3] = float("inf")
    ids = torch.tensor([1, 2, 3])
    fast, slow = Decoder(m, 8), Decoder(m, 8)
    slow.fast = None
    assert fast.fast is not None
    fast.feed(ids), slow.feed(ids)
    a, b = fast.feed(torch.tensor([7])), slow.feed(torch.tensor([7]))
    assert bool(b.isnan().any()) and torch.equal(a.isnan(), b.isnan())
    assert fast.pos == slow.pos == 4
    xv = torch.randn(64)
    xv[5] = float("nan")
    before = xv.clone()
    assert fast.fast[0](xv, 4) is False
    assert torch.equal(xv.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_cast_to_half_precision_decodes(dtype):
    """A model cast to fp16/bf16 (its float layers in that dtype, the quantized ones as stored):
    the decoder hands each float layer its own dtype; greedy tokens as transformers' (peaked
    distributions: far from ties that half precision could flip)."""
    m = lowbit.quantize(tiny_llama(), "w4g32").to(dtype)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    got = lowbit.generate(m, ids, 12, eos_token_id=[])
    assert torch.equal(got, hf_greedy(m, ids, 12))
