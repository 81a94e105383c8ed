"""Float layers that keep a bf16/fp16 checkpoint's storage (lowbit.nn.HalfStoredLinear / Embedding)."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import HalfStoredEmbedding, HalfStoredLinear, keep_half_storage


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_half_stored_linear_is_the_float32_linear_of_the_stored_values(monkeypatch, dtype, bias):
    import lowbit.nn as lnn

    monkeypatch.setattr(lnn, "HALF_TILE_BYTES", 4 * 37 * 16)  # several tiles, the last one short
    torch.manual_seed(0)
    ref = nn.Linear(37, 53, bias=bias)
    half = nn.Linear(37, 53, bias=bias)
    half.load_state_dict(ref.state_dict())
    half.weight.data = half.weight.data.to(dtype)
    ref.weight.data = half.weight.data.float()  # the stored values, exactly
    assert keep_half_storage(half) and type(half) is HalfStoredLinear and half.weight.dtype == dtype
    for shape in [(37,), (1, 37), (3, 5, 37), (0, 37)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(half(x), ref(x), rtol=1e-6, atol=1e-6)
        assert half(x).dtype == torch.float32 and half(x).shape == ref(x).shape
    x = torch.randn(4, 37, requires_grad=True)  # gradients flow to the input (QAT, attribution)
    half(x).sum().backward()
    torch.testing.assert_close(x.grad, ref.weight.sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)
    if not bias:  # a model cast to the storage dtype: plain nn.Linear
        assert half(torch.randn(2, 37).to(dtype)).dtype == dtype
    assert sorted(half.state_dict()) == sorted(ref.state_dict())


def test_half_stored_embedding_returns_float32_rows_and_only_plain_layers_convert():
    emb = nn.Embedding(11, 6, padding_idx=0)
    emb.weight.data = emb.weight.data.bfloat16()
    assert keep_half_storage(emb) and type(emb) is HalfStoredEmbedding
    out = emb(torch.tensor([[0, 3, 10]]))
    assert out.dtype == torch.float32 and torch.equal(out, emb.weight[[0, 3, 10]].float().unsqueeze(0))
    assert not keep_half_storage(nn.Linear(3, 3))  # float32: nothing to keep
    conv = nn.Conv2d(3, 3, 1).to(torch.bfloat16)
    assert not keep_half_storage(conv) and type(conv) is nn.Conv2d
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    keep_half_storage(lin)
    model = nn.Sequential(lin)
    lowbit.quantize(model, "int8")  # still a Linear lowbit quantizes, recording its stored dtype
    assert type(model[0]).__name__ == "QuantLinear" and model[0].orig_dtype == "bfloat16"
