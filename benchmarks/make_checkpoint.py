"""Write a synthetic transformers checkpoint in a real model's shapes, tensor by tensor, for the
larger-than-memory benchmarks (issue 14). Nothing here is committed; the files are rebuilt on demand.

    python benchmarks/make_checkpoint.py OUT [--shapes mistral-24b] [--layers N] [--shard-gb 4]

Shapes (``--shapes``; ``--layers`` keeps the shapes but fewer decoder layers):

* ``mistral-24b``: Mistral-Small-24B's (hidden 5120, 40 layers, 32 query / 8 key-value heads of
  128, FFN 32768, vocabulary 131072, untied head): 23.6B parameters, 47.1 GB in bf16, twice this
  machine's RAM.
* ``tinyllama-1.1b``: TinyLlama-1.1B's (hidden 2048, 22 layers, 32/4 heads, FFN 5632,
  vocabulary 32000).

Weights are N(0, 0.02) (one seeded generator per tensor: a tensor's values do not depend on the
shard size), RMSNorm weights 1, written in ``--dtype`` (bf16 default) into safetensors shards of
at most ``--shard-gb`` with transformers' index file and a ``LlamaForCausalLM`` config. Peak memory
is one shard plus one tensor in float32, whatever the model's size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = {
    "mistral-24b": dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=131072, max_position_embeddings=32768,
                        rope_theta=100000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048,
                           rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}  # fmt: skip


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama-architecture checkpoint, in transformers' order."""
    h, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.q_proj.weight", (q, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, q)),
                (f"{p}.mlp.gate_proj.weight", (f, h)), (f"{p}.mlp.up_proj.weight", (f, h)),
                (f"{p}.mlp.down_proj.weight", (h, f)), (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,))]  # fmt: skip
    out += [("model.norm.weight", (h,))]
    if not c["tie_word_embeddings"]:
        out += [("lm_head.weight", (c["vocab_size"], h))]
    return out


def write(out: Path, shapes: str, layers: int | None, dtype: torch.dtype, shard_bytes: int, seed: int = 0) -> dict:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    c = dict(SHAPES[shapes])
    if layers is not None:
        c["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    names = tensor_shapes(c)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, files, weight_map, total = 0, [], {}, 0
    t0 = time.perf_counter()

    def flush() -> None:
        i = len(files) + 1
        tmp = out / f"part-{i:05d}.safetensors"
        save_file(shards[-1], str(tmp), metadata={"format": "pt"})
        files.append((tmp, list(shards[-1])))
        shards[-1] = {}

    for k, (name, shape) in enumerate(names):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += t.numel()
    flush()
    n = len(files)
    for i, (tmp, tnames) in enumerate(files, 1):
        final = out / (f"model-{i:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors")
        tmp.rename(final)
        weight_map.update(dict.fromkeys(tnames, final.name))
    if n > 1:
        nbytes = sum(p.stat().st_size for p in out.glob("model-*.safetensors"))
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, indent=1))
    LlamaConfig(**c, architectures=["LlamaForCausalLM"], torch_dtype=str(dtype).replace("torch.", "")).save_pretrained(out)
    return {"params": total, "files": n, "seconds": round(time.perf_counter() - t0, 1),
            "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shapes", choices=list(SHAPES), default="mistral-24b")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the real model's)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    a = ap.parse_args()
    info = write(a.out, a.shapes, a.layers, getattr(torch, a.dtype), int(a.shard_gb * 1e9))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
