"""all-MiniLM-L6-v2 (offline zoo): a BERT encoder's sentence embeddings survive int8 and int4."""

import copy

import pytest
import torch

import lowbit

SENTENCES = ["The cat sits on the mat.", "Quantization makes models smaller.", "A dog runs in the park.",
             "Integer kernels are fast on this CPU."]  # fmt: skip


def _embed(model, tok):
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    e = (h * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does
    return torch.nn.functional.normalize(e, dim=-1)


@pytest.fixture(scope="module")
def minilm():
    from lowbit.models.zoo import load_model

    return load_model("minilm")


@pytest.mark.parametrize("scheme, floor", [("int8", 0.999), ("w4g32", 0.95)])
def test_sentence_embeddings_stay_close(minilm, scheme, floor):
    ref = _embed(minilm.model, minilm.tokenizer)
    q = lowbit.quantize(copy.deepcopy(minilm.model), scheme)
    got = _embed(q, minilm.tokenizer)
    cos = (ref * got).sum(-1)
    assert float(cos.min()) > floor, cos
    assert len(lowbit.size_of(q).quantized) == 6 * 6 + 1  # 6 layers x (q, k, v, o, up, down) + pooler
