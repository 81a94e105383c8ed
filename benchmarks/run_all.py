"""Writes BENCHMARKS.md: every figure lowbit claims, with the command that produced it.

    python benchmarks/run_all.py                 # all sections (~20 min on 2 cores)
    python benchmarks/run_all.py --sections kernels decode

Sections (each a function below, each timed in one process, 2 threads, medians):

* ``kernels``: batch-1 GEMV 4096x4096 and 4096x11008, GEMM 512x4096x4096; lowbit int8/int4 vs
  torch FP32/BF16 and the peers that install here (benchmarks/peers.py).
* ``smollm2``: SmolLM2-135M size and held-out perplexity for FP32, BF16 and the RTN schemes.
* ``decode``: batch-1 greedy decode tokens/s of SmolLM2 in lowbit vs llama.cpp on the package's
  own Q4_1 GGUF (benchmarks/peer_llamacpp.py).
* ``digits``: digits-cnn test accuracy, FP32 vs INT8 vs INT4 weight-only.

Each section's results are kept as JSON in benchmarks/results/ so BENCHMARKS.md can be rebuilt
from any subset of re-run sections.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results"
THREADS = 2
PPL_TOKENS = 16384


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("lowbit", "transformers", "torchao", "optimum-quanto", "bitsandbytes", "hqq", "llama-cpp-python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


KERNEL_PEERS = ("torchao-int8", "torchao-int4g64", "torchao-int4g128", "quanto-int8", "quanto-int4g128",
                "bnb-int8", "bnb-nf4g64", "ort-w8a8")  # fmt: skip


def _kernel_isas() -> tuple[str, ...]:
    """The machine's best CPU-kernel ISA, and AVX2 beside it where the best is wider."""
    from lowbit.kernels import cpu

    best = cpu.available_isas()[0]
    return (best, "avx2") if best == "avx512" else (best,)


def _w8a8_same_sign_error(ort_adapter) -> dict | None:
    """Max relative error against FP32 of W8A8 on inputs whose adjacent products share a sign
    (positive activations near their maximum, as after a ReLU, times positive weights): where a
    pair of u8 x s8 products exceeds int16, vpmaddubsw saturates (MLAS's AVX2 U8S8 path);
    lowbit's AVX2 kernel keeps every pair below 2^15 (csrc/avx2.c)."""
    if ort_adapter is None:
        return None
    import lowbit

    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(512, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.rand(64, 512, generator=gen) * 0.5 + 0.5)
    x = torch.rand(8, 512, generator=gen) * 0.2 + 0.8
    with torch.no_grad():
        ref = x @ lin.weight.t()
        q = lowbit.quantize(torch.nn.Sequential(copy.deepcopy(lin)), "w8a8")
        err = lambda y: float(((y - ref).abs() / ref.abs()).max())  # noqa: E731
        return {"ort-w8a8": err(ort_adapter(lin)(x)), "lowbit w8a8": err(q(x)), "kernel": q[0].kernel}


def section_kernels(quick: bool) -> dict:
    from lowbit.evaluate.kernel_bench import SHAPES, read_bandwidth, run_kernel_bench

    sys.path.insert(0, str(HERE))
    from peers import available_peers  # type: ignore

    # Peers with a real CPU kernel; hqq's CPU path dequantizes the whole weight per call (and takes
    # ~10 s to quantize each 4096x4096 copy), so it is compared on accuracy, not here.
    peers = {k: v for k, v in available_peers().items() if k in KERNEL_PEERS}
    bandwidth = [read_bandwidth()]
    rows = run_kernel_bench(("int8", "w4g128", "w4g64", "w8a8"), shapes=SHAPES[:1] if quick else SHAPES,
                            reps=10 if quick else 40, peers=peers, isas=_kernel_isas(),
                            progress=lambda s: print("  ", s, file=sys.stderr))  # fmt: skip
    bandwidth.append(read_bandwidth())
    return {
        "command": "python benchmarks/run_all.py --sections kernels",
        "w8a8_same_sign_error": _w8a8_same_sign_error(peers.get("ort-w8a8")),
        "read_bandwidth_gbs": bandwidth,  # before and after the kernels
        "isas": list(_kernel_isas()),
        "rows": [{"shape": list(r.shape), "label": r.label, "variant": r.variant, "seconds": r.seconds,
                  "weight_bytes": r.weight_bytes, "copies": r.copies} for r in rows],  # fmt: skip
    }


PATH_SCHEMES = ("int8", "w4g128", "w4g64", "w4g64-asym", "w4g64-asym@hqq", "w2g64-asym", "w3g64", "nf4g64", "fp8",
                "w8a8", "w4g16", "bf16")  # fmt: skip


def section_paths(quick: bool) -> dict:
    """Every scheme on every kernel path this machine has (each ISA, and the reference), batch-1
    GEMV 4096x4096 with cold weights, against FP32 in the same run, one run per path."""
    from lowbit.evaluate.kernel_bench import read_bandwidth, run_kernel_bench
    from lowbit.kernels import cpu

    out = {"command": "python benchmarks/run_all.py --sections paths", "read_bandwidth_gbs": read_bandwidth(),
           "paths": {}}  # fmt: skip
    for isa in cpu.available_isas():
        print(f"  paths: {isa}", file=sys.stderr)
        rows = run_kernel_bench(PATH_SCHEMES, shapes=((1, 4096, 4096),), reps=5 if isa == "reference" else 15,
                                isas=(isa,), baselines=False, stream=False)  # fmt: skip
        out["paths"][isa] = [{"variant": r.variant, "seconds": r.seconds, "weight_bytes": r.weight_bytes} for r in rows]
    return out


SMOLLM2_SCHEMES = ("bf16", "int8", "w4g64", "w4g64-asym", "w4g32", "w4g128", "w3g64", "w3g64-asym",
                   "w2g32-asym", "nf4g64", "fp8")  # fmt: skip


def _head_recipe(scheme: str):
    import lowbit

    return lowbit.Recipe.from_scheme(scheme).add("model.embed_tokens", "int8").add("lm_head", "int8")


def section_smollm2(quick: bool) -> dict:
    import lowbit
    from lowbit.evaluate.perplexity import perplexity
    from lowbit.models.zoo import _smollm2_dir, load_model

    zoo = load_model("smollm2-135m")
    tokens = 4096 if quick else PPL_TOKENS
    fp32_file = (_smollm2_dir() / "model.safetensors").stat().st_size
    rows = []
    variants = [("fp32", None, "minmax")] + [(s, s, "minmax") for s in SMOLLM2_SCHEMES]
    variants += [("w4g64 clip=mse", "w4g64", "mse"), ("w3g64 clip=mse", "w3g64", "mse"),
                 ("w4g64 + int8 emb/head", "head", "minmax")]  # fmt: skip
    for label, scheme, clip in variants:
        print("  smollm2", label, file=sys.stderr)
        if scheme is None:
            m = zoo.model
        else:
            spec = _head_recipe("w4g64") if scheme == "head" else scheme
            opts = {"clip": clip} if scheme not in ("bf16", "fp8") else {}
            m = lowbit.quantize(copy.deepcopy(zoo.model), spec, **opts)
        r = perplexity(m, zoo.tokenizer, max_tokens=tokens)
        size = lowbit.size_of(m)
        row = {"variant": label, "ppl": r.ppl, "tokens": r.tokens, "text": r.source,
               "model_bytes": size.total_bytes, "linear_bpw": size.quantized_bits_per_weight or 32.0,
               "linear_compression": size.quantized_compression if size.quantized else 1.0}  # fmt: skip
        if label in ("int8", "w4g64", "w4g64 + int8 emb/head"):
            with tempfile.TemporaryDirectory() as d:
                lowbit.save(m, Path(d) / "m")
                row["file_bytes"] = (Path(d) / "m" / "model.safetensors").stat().st_size
        rows.append(row)
    return {
        "command": "python benchmarks/run_all.py --sections smollm2",
        "fp32_file_bytes": fp32_file,
        "rows": rows,
    }


def _llamacpp_python() -> str | None:
    """An interpreter that can import llama_cpp: this one, or the peers venv."""
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        alt = Path("/work/peers/llamacpp/bin/python")
        return str(alt) if alt.exists() else None


def _llamacpp_run(py: str, new_tokens: int, quantize: str | None = None) -> dict | None:
    from lowbit.evaluate.compare import DEMO_PROMPT

    print(f"  decode llama.cpp {quantize or 'Q4_1'}", file=sys.stderr)
    cmd = [py, str(HERE / "peer_llamacpp.py"), "--threads", str(THREADS), "--tokens", str(new_tokens),
           "--prompt", DEMO_PROMPT] + (["--quantize", quantize] if quantize else [])  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def _quant_layer_share(model, tokenizer, new_tokens: int) -> float | None:
    """Fraction of a decode run's time spent inside lowbit's quantized modules (timed by hooks in
    a separate run, so the hooks' own cost does not touch the speed figure)."""
    import time

    from lowbit.evaluate.compare import DEMO_PROMPT
    from lowbit.evaluate.speed import greedy_generate
    from lowbit.nn import QuantModule

    mods = [m for m in model.modules() if isinstance(m, QuantModule)]
    if not mods:
        return None
    spent = [0.0]
    start: dict[int, float] = {}

    def pre(mod, args):
        start[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        spent[0] += time.perf_counter() - start[id(mod)]

    handles = [h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    ids = tokenizer(DEMO_PROMPT, return_tensors="pt")["input_ids"]
    try:
        greedy_generate(model, ids, 4)
        spent[0] = 0.0
        _, total = greedy_generate(model, ids, new_tokens)
    finally:
        for h in handles:
            h.remove()
    # the first step (prompt) is outside `total`; its layer time is small next to 63 decode steps
    return min(1.0, spent[0] / total)


DECODE_VARIANTS = (("fp32", None), ("int8", "int8"), ("w4g64", "w4g64"), ("w4g64 + int8 emb/head", "head"),
                   ("w4g32 + int8 emb/head", "head32"))  # fmt: skip


def section_decode(quick: bool) -> dict:
    """Batch-1 greedy decode of SmolLM2-135M, 128 new tokens: lowbit's decoder (lowbit.generate)
    for each variant, transformers' step-by-step forward for the record, and llama.cpp on the
    package's Q4_1 GGUF and on llama.cpp's own Q4_0 requantization of it, run before and after
    lowbit's (its figure is the median over both runs)."""
    import lowbit
    from lowbit.evaluate.compare import DEMO_PROMPT
    from lowbit.evaluate.speed import decode_speed
    from lowbit.kernels import cpu
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    new_tokens = 32 if quick else 128
    py = _llamacpp_python()
    peers = {q: [_llamacpp_run(py, new_tokens, q if q != "Q4_1" else None)] if py else [] for q in ("Q4_0", "Q4_1")}
    rows = []
    for label, spec in DECODE_VARIANTS:
        m = zoo.model
        if spec is not None:
            recipe = {"head": _head_recipe("w4g64"), "head32": _head_recipe("w4g32")}.get(spec, spec)
            m = lowbit.quantize(copy.deepcopy(zoo.model), recipe)
        for decoder in ("lowbit", "transformers"):
            if decoder == "transformers" and "head" in (spec or ""):
                continue
            print(f"  decode {label} ({decoder})", file=sys.stderr)
            d = decode_speed(m, zoo.tokenizer, DEMO_PROMPT, new_tokens=new_tokens, reps=3 if quick else 5, decoder=decoder)
            rows.append({"variant": label, "decoder": decoder, "tok_s": d.tokens_per_s, "all": d.all_tokens_per_s,
                         "model_bytes": lowbit.size_of(m).total_bytes, "completion": d.text})  # fmt: skip
    out = {}
    for q, runs in peers.items():
        runs = [r for r in runs + ([_llamacpp_run(py, new_tokens, q if q != "Q4_1" else None)] if py else []) if r]
        if runs:
            peer = dict(runs[0])
            peer["decode_tok_s_all"] = sorted(x for r in runs for x in r["decode_tok_s_all"])
            peer["decode_tok_s_median"] = statistics.median(peer["decode_tok_s_all"])
            out[q] = peer
    return {"command": "python benchmarks/run_all.py --sections decode", "new_tokens": new_tokens,
            "isa": cpu.isa(), "rows": rows, "llama_cpp": out}  # fmt: skip


def section_decode_1b(quick: bool) -> dict:
    """The bandwidth-bound case: batch-1 greedy decode of a 1.1B Llama-shaped model with random
    weights (benchmarks/make_llama_1b.py, built on first use), lowbit w4g32 + int8 head through
    lowbit.generate vs llama.cpp's Q4_0 of the same weights."""
    import lowbit
    from lowbit.cache import cache_dir
    from lowbit.evaluate.compare import DEMO_PROMPT
    from lowbit.evaluate.speed import decode_speed
    from lowbit.kernels import cpu
    from lowbit.models.source import load_source

    sys.path.insert(0, str(HERE))
    import make_llama_1b  # type: ignore

    out = cache_dir("bench", "llama-1b")
    if not (out / "q4_0.gguf").exists() or not (out / "hf" / "config.json").exists():
        print("  making the 1.1B model (a few minutes)", file=sys.stderr)
        model = make_llama_1b.make_hf(out / "hf")
        make_llama_1b.make_gguf(model, out / "f16.gguf")
        del model
        make_llama_1b.quantize_gguf(out / "f16.gguf", out / "q4_0.gguf")
        (out / "f16.gguf").unlink()
    new_tokens = 32 if quick else 64
    py = _llamacpp_python()

    def peer() -> dict | None:
        if not py:
            return None
        print("  decode_1b llama.cpp Q4_0", file=sys.stderr)
        p = subprocess.run([py, str(HERE / "peer_llamacpp.py"), "--model", str(out / "q4_0.gguf"), "--threads",
                            str(THREADS), "--tokens", str(new_tokens), "--prompt", DEMO_PROMPT, "--reps", "3"],
                           capture_output=True, text=True)  # fmt: skip
        return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None

    before = peer()
    zm = load_source(str(out / "hf"))
    params = sum(p.numel() for p in zm.model.parameters())
    model = lowbit.quantize(zm.model.float(), lowbit.Recipe.from_scheme("w4g32").add("lm_head", "int8").add(
        "model.embed_tokens", "int8"))  # fmt: skip
    rows = []
    print("  decode_1b lowbit w4g32 + int8 emb/head", file=sys.stderr)
    d = decode_speed(model, zm.tokenizer, DEMO_PROMPT, new_tokens=new_tokens, reps=3, decoder="lowbit")
    rows.append({"variant": "lowbit w4g32 + int8 emb/head", "tok_s": d.tokens_per_s, "all": d.all_tokens_per_s,
                 "model_bytes": lowbit.size_of(model).total_bytes})  # fmt: skip
    after = peer()
    runs = [r for r in (before, after) if r]
    llama = None
    if runs:
        llama = dict(runs[0])
        llama["decode_tok_s_all"] = sorted(x for r in runs for x in r["decode_tok_s_all"])
        llama["decode_tok_s_median"] = statistics.median(llama["decode_tok_s_all"])
    return {"command": "python benchmarks/run_all.py --sections decode_1b", "new_tokens": new_tokens, "isa": cpu.isa(),
            "params": params, "rows": rows, "llama_cpp": llama}  # fmt: skip


def section_kv_cache(quick: bool) -> dict:
    """lowbit.generate's int8 KV cache on SmolLM2: held-out perplexity through the decoder with
    float32 vs int8 keys/values (FP32 and w4g64 + int8 emb/head weights), and the cache's bytes at
    the full 8192-token context."""
    import lowbit
    from lowbit.evaluate.perplexity import perplexity
    from lowbit.generate import Decoder
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    tokens = 2048 if quick else 8192
    rows = []
    for label, spec in (("fp32", None), ("w4g64 + int8 emb/head", "head")):
        m = zoo.model if spec is None else lowbit.quantize(copy.deepcopy(zoo.model), _head_recipe("w4g64"))
        for kv in ("float32", "int8"):
            print(f"  kv_cache {label} {kv}", file=sys.stderr)
            r = perplexity(m, zoo.tokenizer, max_tokens=tokens, kv_cache=kv)
            rows.append({"weights": label, "kv_cache": kv, "ppl": r.ppl, "tokens": r.tokens, "text": r.source})
    ctx = zoo.model.config.max_position_embeddings
    sizes = {kv: Decoder(zoo.model, ctx, kv).nbytes_cache() for kv in ("float32", "int8")}
    return {"command": "python benchmarks/run_all.py --sections kv_cache", "context": ctx, "cache_bytes": sizes,
            "rows": rows}  # fmt: skip


def section_digits(quick: bool) -> dict:
    import lowbit
    from lowbit.evaluate.classification import accuracy
    from lowbit.models.zoo import digits_data, load_model

    zoo = load_model("digits-cnn")
    data = digits_data()
    rows = []
    for scheme in (None, "int8", "w4g32", "w4g32-asym", "w4g16", "w2g16-asym"):
        m = zoo.model if scheme is None else lowbit.quantize(copy.deepcopy(zoo.model), scheme)
        rows.append({"variant": scheme or "fp32", "accuracy": accuracy(m, data["x_test"], data["y_test"]),
                     "model_bytes": lowbit.size_of(m).total_bytes})  # fmt: skip
    return {"command": "python benchmarks/run_all.py --sections digits", "test_images": len(data["y_test"]), "rows": rows}


ALGO_SCHEMES = ("w4g64", "w4g64-asym", "w3g64", "w3g64-asym", "w2g32-asym")
ALGO_METHODS = ("rtn", "gptq", "awq", "hqq", "awq+gptq")
CALIB = {"nsamples": 64, "seqlen": 512}


def _child_quantize(job: dict) -> dict:
    """One (scheme, method, seed) run in a fresh process: quantize, time it, peak RSS, perplexity."""
    import resource
    import time

    import lowbit
    from lowbit.algorithms import get_algorithm
    from lowbit.evaluate.data import calibration_batches
    from lowbit.evaluate.perplexity import perplexity
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cal = None
    if job["method"] != "fp32" and get_algorithm(job["method"]).uses_calibration:
        cal = calibration_batches(zoo.tokenizer, nsamples=CALIB["nsamples"], seqlen=CALIB["seqlen"], seed=job["seed"])
    t = time.perf_counter()
    model = zoo.model if job["method"] == "fp32" else lowbit.quantize(zoo.model, job["scheme"], method=job["method"],
                                                                      calibration=cal)  # fmt: skip
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = perplexity(model, zoo.tokenizer, max_tokens=job.get("tokens", PPL_TOKENS))
    return {**job, "ppl": r.ppl, "tokens": r.tokens, "text": r.source, "quant_seconds": seconds,
            "peak_rss_mb": rss, "rss_before_mb": rss0,
            "bits_per_weight": lowbit.size_of(model).quantized_bits_per_weight or 32.0}  # fmt: skip


def _child_hessian_memory(job: dict) -> dict:
    """One Hessian-trace sensitivity measurement in a fresh process: its seconds and peak RSS, with
    one backward graph per sequence (as shipped) or, for comparison, per batch (as before)."""
    import resource
    import time

    from lowbit import mixed
    from lowbit.evaluate.data import calibration_batches
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    batches = calibration_batches(zoo.tokenizer, nsamples=job["sequences"], seqlen=job["seqlen"], seed=1,
                                  batch_size=job["sequences"])  # fmt: skip
    if job["graph"] == "batch":
        mixed._micro_batches = lambda batch: [batch]  # the former behaviour: one graph for the whole batch
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    sens = mixed.sensitivity(zoo.model, list(job["candidates"]), batches, cost="hessian", draws=job["draws"])
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**job, "seconds": seconds, "peak_rss_mb": rss, "rss_before_mb": rss0, "layers": len(sens.loss)}


def section_hessian_memory(quick: bool) -> dict:
    """Peak memory of ``sensitivity(cost="hessian")`` on SmolLM2-135M, one batch of 8 x 512 tokens
    (what `lowbit compress --cost hessian --nsamples 64 --seqlen 512` measures on), each in a fresh
    process (peak RSS of that process, the model's load included): one backward graph per sequence,
    as lowbit runs it, beside one graph per batch (the former code path, by patching the split out)."""
    seqs, seqlen = (2, 128) if quick else (8, 512)
    rows = []
    for graph in ("sequence", "batch"):
        job = {"kind": "hessian_memory", "graph": graph, "sequences": seqs, "seqlen": seqlen,
               "candidates": ["w4g128", "w3g128", "w2g64"], "draws": 4}  # fmt: skip
        rows.append(_run_child(job))
    return {"command": "python benchmarks/run_all.py --sections hessian_memory", "rows": rows}


def _source_digest() -> str:
    """SHA-256 of lowbit's Python sources: a cached job result is reused only for the same code."""
    import hashlib

    import lowbit

    h = hashlib.sha256()
    for f in sorted(Path(lowbit.__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


JOB_CACHE = RESULTS / "jobs_cache.json"  # finished child jobs, so an interrupted run resumes


def _run_child(job: dict) -> dict:
    key = json.dumps({**job, "calib": CALIB, "code": _source_digest()}, sort_keys=True)
    cache = json.loads(JOB_CACHE.read_text()) if JOB_CACHE.exists() else {}
    if key in cache:
        return cache[key]
    print("  ", job, file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"child {job} failed:\n{p.stderr[-3000:]}")
    row = json.loads(p.stdout.strip().splitlines()[-1])
    cache = json.loads(JOB_CACHE.read_text()) if JOB_CACHE.exists() else {}
    cache[key] = row
    RESULTS.mkdir(exist_ok=True)
    tmp = JOB_CACHE.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1) + "\n")
    tmp.replace(JOB_CACHE)
    return row


def section_algorithms(quick: bool) -> dict:
    tokens = 4096 if quick else PPL_TOKENS
    rows = [_run_child({"scheme": "fp32", "method": "fp32", "seed": 0, "tokens": tokens})]
    for scheme in ALGO_SCHEMES:
        for method in ALGO_METHODS:
            rows.append(_run_child({"scheme": scheme, "method": method, "seed": 0, "tokens": tokens}))
    # robustness: the calibrated methods under two more calibration draws
    for scheme, method in (("w4g64", "gptq"), ("w4g64", "awq+gptq"), ("w3g64-asym", "awq+gptq")):
        for seed in (1, 2):
            rows.append(_run_child({"scheme": scheme, "method": method, "seed": seed, "tokens": tokens}))
    return {  # peer rows: results/peer_algorithms.json (benchmarks/peer_algorithms.py), read by the report
        "command": "python benchmarks/run_all.py --sections algorithms",
        "calibration": {**CALIB, "split": "calib"},
        "rows": rows,
    }


# one int8 scale per token, then per token and 128 / 64 input columns (scheme.py: a8g<group>)
W8A8_SCHEMES = ("w8a8", "w8a8g128", "w8a8g64")


def section_w8a8(quick: bool) -> dict:
    """W8A8 dynamic (RTN) and SmoothQuant: perplexity, and a 512-token prefill of a 4096x4096
    layer against FP32 and the int8 weight-only kernel."""
    from lowbit.evaluate.kernel_bench import run_kernel_bench

    tokens = 4096 if quick else PPL_TOKENS
    rows = [_run_child({"scheme": "fp32", "method": "fp32", "seed": 0, "tokens": tokens})]
    rows.append(_run_child({"scheme": "int8", "method": "rtn", "seed": 0, "tokens": tokens}))
    for scheme in W8A8_SCHEMES:
        for method in ("rtn", "smoothquant"):
            rows.append(_run_child({"scheme": scheme, "method": method, "seed": 0, "tokens": tokens}))
    speed = run_kernel_bench(("int8", *W8A8_SCHEMES), shapes=((512, 4096, 4096), (1, 4096, 4096)), reps=10 if quick else 30,
                             stream=False)
    return {
        "command": "python benchmarks/run_all.py --sections w8a8",
        "rows": rows,
        "speed": [{"label": r.label, "variant": r.variant, "seconds": r.seconds} for r in speed],
    }


def section_sweeps(quick: bool) -> dict:
    """The two tuned defaults, measured on the *train* split (disjoint from the eval split that
    BENCHMARKS.md reports and from the calib split the calibrated methods read): HQQ's error
    weighting exponent per scheme, SmoothQuant's alpha for W8A8, and the activation group size."""
    import copy

    import lowbit
    from lowbit.evaluate.data import calibration_batches
    from lowbit.evaluate.perplexity import perplexity
    from lowbit.models.zoo import load_model

    tokens = 1024 if quick else 2048
    zoo = load_model("smollm2-135m")

    def ppl(model):
        return perplexity(model, zoo.tokenizer, split="train", max_tokens=tokens).ppl

    fp = ppl(zoo.model)
    hqq_rows = []
    for scheme in ALGO_SCHEMES:
        row = {"scheme": scheme, "rtn": ppl(lowbit.quantize(copy.deepcopy(zoo.model), scheme))}
        for imp in (0.0, 0.5, 1.0, 1.5):
            m = lowbit.quantize(copy.deepcopy(zoo.model), scheme, method="hqq", importance=imp)
            row[str(imp)] = ppl(m)
        hqq_rows.append(row)
    cal = calibration_batches(zoo.tokenizer, nsamples=16, seqlen=512, seed=0)
    sq_rows = [{"alpha": "dynamic (no smoothing)", "ppl": ppl(lowbit.quantize(copy.deepcopy(zoo.model), "w8a8"))}]
    for alpha in (0.3, 0.4, 0.5, 0.6, 0.7, 0.85):
        m = lowbit.quantize(copy.deepcopy(zoo.model), "w8a8", method="smoothquant", calibration=cal, alpha=alpha)
        sq_rows.append({"alpha": alpha, "ppl": ppl(m)})
    act_rows = []
    for scheme in ("w8a8", "w8a8g128", "w8a8g64", "w8a8g32"):
        m = lowbit.quantize(copy.deepcopy(zoo.model), scheme, method="smoothquant", calibration=cal)
        act_rows.append({"scheme": scheme, "dynamic": ppl(lowbit.quantize(copy.deepcopy(zoo.model), scheme)), "smoothquant": ppl(m)})
    return {"command": "python benchmarks/run_all.py --sections sweeps", "tokens": tokens, "split": "train",
            "fp32": fp, "hqq": hqq_rows, "smoothquant": sq_rows, "act_groups": act_rows,
            "calibration": "16 x 512 tokens, calib split"}  # fmt: skip


PLOTS = HERE / "plots"


def section_mobilenet(quick: bool) -> dict:
    """MobileNetV2 static INT8 on photo crops: agreement with FP32 where it is confident, mean KL;
    per-tensor vs per-channel weights, observers, and sensitivity-driven mixed precision."""
    import lowbit
    from lowbit.evaluate.classification import confident_agreement, logits_of
    from lowbit.evaluate.images import photo_crops
    from lowbit.evaluate.plots import sensitivity_plot
    from lowbit.mixed import allocate, sensitivity
    from lowbit.models.zoo import load_model

    zoo = load_model("mobilenet-v2")
    fp = zoo.model.eval()
    n_eval, n_cal = (128, 32) if quick else (512, 64)
    ev = photo_crops(n_eval, split="eval")
    cal = photo_crops(n_cal, split="calib")
    calb = [cal[i : i + 16] for i in range(0, n_cal, 16)]
    ref = logits_of(fp, ev)
    rows = []

    def measure(label, spec, observer="percentile", m=None, bc=None):
        print("  mobilenet", label, observer, bc, file=sys.stderr)
        static = "static" in str(spec)
        if m is None:
            m = lowbit.quantize(copy.deepcopy(fp), spec, calibration=calb if static else None, observer=observer,
                                bias_correction=bc if static else None)  # fmt: skip
        r = confident_agreement(ref, logits_of(m, ev))
        size = lowbit.size_of(m)
        rows.append({"variant": label, "observer": observer if static else "-",
                     "bias_correction": ("no" if bc is False else "yes") if static else "-", **r,
                     "model_bytes": size.total_bytes, "bpw": size.quantized_bits_per_weight or 32.0})  # fmt: skip
        return m

    rows.append({"variant": "fp32", "observer": "-", "bias_correction": "-", **confident_agreement(ref, ref),
                 "model_bytes": lowbit.size_of(fp).total_bytes, "bpw": 32.0})  # fmt: skip
    measure("int8 weights only", "int8")
    for obs in ("minmax", "percentile"):
        for bc in (False, None):
            measure("w8a8 per-tensor weights", "w8a8-tensor-static", obs, bc=bc)
    for obs in ("minmax", "ema", "percentile", "mse", "entropy"):
        measure("w8a8 per-channel", "w8a8-static", obs, bc=False)
    for obs in ("minmax", "ema", "percentile", "mse", "entropy"):
        measure("w8a8 per-channel", "w8a8-static", obs)
    for bc in (False, None):
        measure("w8a8 per-channel, asym weights", "w8a8-asym-static", "percentile", bc=bc)
    for bc in (False, None):
        measure("w4a8 per-channel", "w4a8-static", "percentile", bc=bc)
    # sensitivity on other calibration crops than those that set the scales
    cands = ["w4a8-static", "w8a8-tensor-static", "w8a8-static", "skip"]
    sens = sensitivity(fp, cands, [photo_crops(32, split="calib", seed=1)], calibration=calb, observer="percentile")
    PLOTS.mkdir(exist_ok=True)
    tensor_bytes = sum(sens.nbytes[n]["w8a8-tensor-static"] for n in sens.layers)
    allocs = {
        "mixed: per-tensor, per-channel where it pays (+1% bytes)":
            allocate(sens, max_bytes=int(tensor_bytes * 1.01), candidates=["w8a8-tensor-static", "w8a8-static"]),
        "mixed: w4a8 / w8a8 / float at 6.0 bpw":
            allocate(sens, target_bpw=6.0, candidates=["w4a8-static", "w8a8-static", "skip"]),
    }  # fmt: skip
    mixed = []
    for label, a in allocs.items():
        measure(label, a.recipe())
        mixed.append({"variant": label, "counts": a.counts(), "predicted_kl": a.loss, "gap": a.gap,
                      "float_layers": [n for n, c in a.choice.items() if c == "skip"],
                      "wide_layers": [n for n, c in a.choice.items() if c == "w8a8-static"][:8]})  # fmt: skip
    sensitivity_plot(sens, PLOTS / "mobilenet_sensitivity.png", allocs["mixed: w4a8 / w8a8 / float at 6.0 bpw"].choice,
                     title="MobileNetV2: KL to FP32 when one layer is quantized (percentile observer)")  # fmt: skip
    top = sorted(sens.layers, key=lambda n: -sens.loss[n]["w8a8-static"])[:5]
    return {"command": "python benchmarks/run_all.py --sections mobilenet", "eval_crops": n_eval, "calib_crops": n_cal,
            "rows": rows, "mixed": mixed, 
            "most_sensitive": [{"layer": n, **{c: sens.loss[n][c] for c in cands if c != "skip"}} for n in top],
            "plot": "benchmarks/plots/mobilenet_sensitivity.png"}  # fmt: skip


def section_mobilenet_speed(quick: bool) -> dict:
    """MobileNetV2 per-channel W8A8 (static, percentile) vs FP32, batch of 16 crops: with the integer
    conv paths (pointwise on the W8A8 GEMM, depthwise in int32) and with every layer on the reference."""
    import lowbit
    from lowbit import kernels
    from lowbit.evaluate.images import photo_crops
    from lowbit.evaluate.speed import median_time
    from lowbit.models.zoo import load_model

    fp = load_model("mobilenet-v2").model.eval()
    cal = photo_crops(64, split="calib")
    q = lowbit.quantize(copy.deepcopy(fp), "w8a8-static", calibration=[cal[i : i + 16] for i in range(0, 64, 16)],
                        observer="percentile")  # fmt: skip
    ref_path = copy.deepcopy(q)
    kernels.use_kernel(ref_path, "reference")
    on_kernel: dict[str, int] = {}
    for mod in q.modules():
        if hasattr(mod, "kernel"):
            on_kernel[mod.kernel] = on_kernel.get(mod.kernel, 0) + 1
    x = photo_crops(16, split="eval")
    reps = 3 if quick else 9
    with torch.no_grad():
        t_fp = median_time(lambda: fp(x), reps=reps, warmup=1)
        t_q = median_time(lambda: q(x), reps=reps, warmup=1)
        t_ref = median_time(lambda: ref_path(x), reps=reps, warmup=1)
    return {"command": "python benchmarks/run_all.py --sections mobilenet_speed", "batch": 16, "reps": reps,
            "fp32_s": t_fp, "w8a8_static_s": t_q, "reference_s": t_ref, "kernels": on_kernel}  # fmt: skip


def section_mixed(quick: bool) -> dict:
    """SmolLM2 mixed precision (w3g64 / w4g64 / int8 per layer) vs uniform schemes at equal bits per
    weight: sensitivity on calibration windows, allocation, real perplexity of the result."""
    import lowbit
    from lowbit.evaluate.data import calibration_batches
    from lowbit.evaluate.perplexity import perplexity
    from lowbit.evaluate.plots import sensitivity_plot, tradeoff_plot
    from lowbit.mixed import allocate, sensitivity
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    tokens = 4096 if quick else PPL_TOKENS
    sens_batches = calibration_batches(zoo.tokenizer, nsamples=4, seqlen=256, seed=1, batch_size=4)
    cands = ["w3g64", "w4g64", "int8"]
    print("  mixed: sensitivity", file=sys.stderr)
    import time

    t0 = time.perf_counter()
    sens = sensitivity(zoo.model, cands, sens_batches)
    t_sens = time.perf_counter() - t0
    sens.save(RESULTS / "mixed_sensitivity.json")

    def ppl(m) -> float:
        return perplexity(m, zoo.tokenizer, max_tokens=tokens).ppl

    fp = ppl(zoo.model)
    uniform, mixed = [], []
    for scheme in cands:
        print("  mixed: uniform", scheme, file=sys.stderr)
        m = lowbit.quantize(copy.deepcopy(zoo.model), scheme)
        uniform.append({"variant": scheme, "method": "rtn", "bpw": lowbit.size_of(m).quantized_bits_per_weight,
                        "ppl": ppl(m)})  # fmt: skip
    targets = (3.5, 4.25) if quick else (3.5, 3.75, 4.0, 4.25, 4.5, 5.0, 6.0)
    allocs = {}
    for t in targets:
        print("  mixed: target", t, file=sys.stderr)
        a = allocate(sens, target_bpw=t)
        allocs[t] = a
        m = lowbit.quantize(copy.deepcopy(zoo.model), a.recipe())
        mixed.append({"variant": f"mixed @ {t} bpw", "method": "rtn", "target": t,
                      "bpw": lowbit.size_of(m).quantized_bits_per_weight, "ppl": ppl(m), "counts": a.counts(),
                      "predicted_kl": a.loss, "gap": a.gap})  # fmt: skip
    if not quick:  # the same comparison with GPTQ at the bits of w4g64
        batches = calibration_batches(zoo.tokenizer, nsamples=CALIB["nsamples"], seqlen=CALIB["seqlen"], seed=0)
        for label, spec in (("w4g64", "w4g64"), ("mixed @ 4.25 bpw", allocs[4.25].recipe())):
            print("  mixed: gptq", label, file=sys.stderr)
            m = lowbit.quantize(copy.deepcopy(zoo.model), spec, method="gptq", calibration=batches)
            row = {"variant": label, "method": "gptq", "bpw": lowbit.size_of(m).quantized_bits_per_weight, "ppl": ppl(m)}
            if label != "w4g64":
                row["counts"] = allocs[4.25].counts()
            (uniform if label == "w4g64" else mixed).append(row)
    PLOTS.mkdir(exist_ok=True)
    sensitivity_plot(sens, PLOTS / "smollm2_sensitivity.png", allocs[4.25].choice,
                     title="SmolLM2-135M: KL to FP32 per layer (chosen at 4.25 bpw circled)")  # fmt: skip
    pts = [{"label": f"{r['variant']} ({r['method']})", "bpw": r["bpw"], "ppl": r["ppl"]} for r in uniform + mixed]
    tradeoff_plot(pts, PLOTS / "smollm2_mixed.png", "bpw", "ppl", "bits per weight (quantized layers)",
                  "perplexity (held-out)", "SmolLM2-135M: mixed precision vs uniform schemes")  # fmt: skip
    return {"command": "python benchmarks/run_all.py --sections mixed", "tokens": tokens, "fp32": fp,
            "sensitivity_seconds": t_sens, "sensitivity_tokens": 4 * 256, "uniform": uniform, "mixed": mixed,
            "plots": ["benchmarks/plots/smollm2_mixed.png", "benchmarks/plots/smollm2_sensitivity.png"]}  # fmt: skip


def _mixed_allocations(quick: bool, zoo, sens, label: str) -> list[dict]:
    """Allocate ``sens`` at 4.0 / 4.25 / 4.5 bpw; quantize (RTN, and GPTQ at 4.25); perplexity."""
    import lowbit
    from lowbit.evaluate.data import calibration_batches
    from lowbit.evaluate.perplexity import perplexity
    from lowbit.mixed import allocate

    tokens = 4096 if quick else PPL_TOKENS
    rows = []
    for t in (4.0, 4.25, 4.5):
        print(f"  {label}: target", t, file=sys.stderr)
        a = allocate(sens, target_bpw=t)
        methods = ("rtn", "gptq") if t == 4.25 and not quick else ("rtn",)
        for method in methods:
            calib = None
            if method == "gptq":
                calib = calibration_batches(zoo.tokenizer, nsamples=CALIB["nsamples"], seqlen=CALIB["seqlen"], seed=0)
            m = lowbit.quantize(copy.deepcopy(zoo.model), a.recipe(), method=method, calibration=calib)
            rows.append({"variant": f"mixed @ {t} bpw ({label})", "method": method, "target": t,
                         "bpw": lowbit.size_of(m).quantized_bits_per_weight,
                         "ppl": perplexity(m, zoo.tokenizer, max_tokens=tokens).ppl, "counts": a.counts(),
                         "predicted_kl": a.loss, "gap": a.gap})  # fmt: skip
    return rows


def section_mixed_base(quick: bool) -> dict:
    """SmolLM2 mixed precision with the sensitivity measured around uniform w4g64 (each layer
    changed alone to w3g64 or int8 from the all-w4g64 model) instead of around FP32."""
    import time

    from lowbit.evaluate.data import calibration_batches
    from lowbit.mixed import sensitivity
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    sens_batches = calibration_batches(zoo.tokenizer, nsamples=4, seqlen=256, seed=1, batch_size=4)
    t0 = time.perf_counter()
    sens = sensitivity(zoo.model, ["w3g64", "w4g64", "int8"], sens_batches, base="w4g64")
    t_sens = time.perf_counter() - t0
    sens.save(RESULTS / "mixed_base_sensitivity.json")
    return {"command": "python benchmarks/run_all.py --sections mixed_base", "tokens": 4096 if quick else PPL_TOKENS,
            "sensitivity_seconds": t_sens, "base_kl": sens.info["base_loss"],
            "rows": _mixed_allocations(quick, zoo, sens, "around w4g64")}  # fmt: skip


def section_mixed_hessian(quick: bool) -> dict:
    """SmolLM2 mixed precision from the Hessian-trace estimate (sensitivity(cost="hessian")) on the
    same sensitivity tokens as the measured tables, and how well it predicts the measured KL."""
    import time

    from scipy.stats import spearmanr

    from lowbit.evaluate.data import calibration_batches
    from lowbit.mixed import Sensitivity, sensitivity
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    sens_batches = calibration_batches(zoo.tokenizer, nsamples=4, seqlen=256, seed=1, batch_size=4)
    draws = 8
    t0 = time.perf_counter()
    sens = sensitivity(zoo.model, ["w3g64", "w4g64", "int8"], sens_batches, cost="hessian", draws=draws)
    t_sens = time.perf_counter() - t0
    sens.save(RESULTS / "mixed_hessian_sensitivity.json")
    out = {"command": "python benchmarks/run_all.py --sections mixed_hessian", "draws": draws,
           "tokens": 4096 if quick else PPL_TOKENS, "sensitivity_seconds": t_sens}  # fmt: skip
    measured_path = RESULTS / "mixed_sensitivity.json"
    if measured_path.exists():  # the measured table of --sections mixed (same layers, candidates, tokens)
        measured = Sensitivity.load(measured_path)
        pairs = [(measured.loss[n][c], sens.loss[n][c]) for n in sens.layers for c in sens.candidates]
        per_cand = {c: spearmanr([measured.loss[n][c] for n in sens.layers], [sens.loss[n][c] for n in sens.layers])
                    .statistic for c in sens.candidates}  # fmt: skip
        ratio = sorted(p / m for m, p in pairs if m > 0)
        out["vs_measured"] = {"spearman_all": spearmanr(*zip(*pairs)).statistic, "spearman": per_cand,
                              "ratio_median": ratio[len(ratio) // 2], "ratio_p10": ratio[len(ratio) // 10],
                              "ratio_p90": ratio[9 * len(ratio) // 10]}  # fmt: skip
    out["rows"] = _mixed_allocations(quick, zoo, sens, "hessian")
    return out


def section_qat_mobilenet(quick: bool) -> dict:
    """MobileNetV2 QAT without labels: distillation from FP32 on fresh augmented crops of the bundled
    photos (calib split), static int8 activations; agreement and KL on the eval crops."""
    import time

    import lowbit
    from lowbit.evaluate.classification import confident_agreement, logits_of
    from lowbit.evaluate.images import photo_crops
    from lowbit.models.zoo import load_model
    from lowbit.qat import fit

    fp = load_model("mobilenet-v2").model.eval()
    n_eval = 128 if quick else 512
    ev = photo_crops(n_eval, split="eval")
    cal = photo_crops(64, split="calib")
    calb = [cal[i : i + 16] for i in range(0, 64, 16)]
    ref = logits_of(fp, ev)
    rows = []
    for scheme, minutes in (("w8a8-static", 4.0), ("w4a8-static", 8.0)):
        print("  qat_mobilenet", scheme, file=sys.stderr)
        ptq = lowbit.quantize(copy.deepcopy(fp), scheme, calibration=calb, observer="percentile")
        t0 = time.perf_counter()
        q = lowbit.prepare_qat(copy.deepcopy(fp), scheme, calibration=calb, observer="percentile")
        budget = (0.5 if quick else minutes) * 60
        # a fresh batch of 16 random crops each step (seeds 100+: never the eval or calibration views)
        losses = fit(q, lambda i: photo_crops(16, split="calib", seed=100 + i), steps=100_000, seconds=budget,
                     teacher=fp, lr=1e-5, step_lr=1e-4)  # fmt: skip
        lowbit.convert(q)
        t = time.perf_counter() - t0
        rows.append({"scheme": scheme, "ptq": confident_agreement(ref, logits_of(ptq, ev)),
                     "qat": confident_agreement(ref, logits_of(q, ev)), "steps": len(losses), "seconds": t,
                     "loss_first": sum(losses[:10]) / 10, "loss_last": sum(losses[-10:]) / 10})  # fmt: skip
    return {"command": "python benchmarks/run_all.py --sections qat_mobilenet", "eval_crops": n_eval, "rows": rows}


def section_qat_digits(quick: bool) -> dict:
    """digits-cnn (real labels), static int8 activations with 8/4/3/2-bit weights: PTQ vs QAT
    (distillation from FP32 on training images, no labels), each with and without bias correction."""
    import time

    import lowbit
    from lowbit.evaluate.classification import accuracy
    from lowbit.models.zoo import digits_data, load_model
    from lowbit.qat import fit

    zoo, data = load_model("digits-cnn"), digits_data()
    x, xt, yt = data["x_train"], data["x_test"], data["y_test"]
    cal = [x[:256]]
    g = torch.Generator().manual_seed(0)
    batches = [x[torch.randint(0, len(x), (64,), generator=g)] for _ in range(40)]
    rows = [{"variant": "fp32", "accuracy": accuracy(zoo.model, xt, yt)}]
    for scheme in ("w8a8-static", "w4a8-static", "w3a8-static", "w2a8-static"):
        for bc in (False, None):
            ptq = lowbit.quantize(copy.deepcopy(zoo.model), scheme, calibration=cal, bias_correction=bc)
            q = lowbit.prepare_qat(copy.deepcopy(zoo.model), scheme, calibration=cal, bias_correction=bc)
            t0 = time.perf_counter()
            fit(q, batches, steps=400, teacher=zoo.model, lr=1e-3, step_lr=1e-3)
            t = time.perf_counter() - t0
            lowbit.convert(q)
            rows.append({"variant": scheme, "bias_correction": bc is not False, "ptq": accuracy(ptq, xt, yt),
                         "qat": accuracy(q, xt, yt), "seconds": t})  # fmt: skip
    return {"command": "python benchmarks/run_all.py --sections qat_digits", "test_images": len(yt), "steps": 400,
            "batch": 64, "rows": rows}  # fmt: skip


def section_qat(quick: bool) -> dict:
    """QAT by distillation from FP32: SmolLM2 w4g128 within a 30-minute budget on 2 cores
    (training on calibration-split windows; perplexity on the eval split)."""
    import time

    import lowbit
    from lowbit.evaluate.data import calibration_batches
    from lowbit.evaluate.perplexity import perplexity
    from lowbit.models.zoo import load_model
    from lowbit.qat import fit

    out: dict = {"command": "python benchmarks/run_all.py --sections qat"}
    # SmolLM2-135M w4g128: QAT vs RTN (and GPTQ for reference)
    zoo = load_model("smollm2-135m")
    tokens = 4096 if quick else PPL_TOKENS
    budget = 120.0 if quick else 30 * 60.0
    scheme = "w4g128"

    def ppl(m) -> float:
        return perplexity(m, zoo.tokenizer, max_tokens=tokens).ppl

    fp = ppl(zoo.model)
    rtn = ppl(lowbit.quantize(copy.deepcopy(zoo.model), scheme))
    # the calib split holds ~233k tokens: 800 windows of 256 (random starts; some overlap)
    train = calibration_batches(zoo.tokenizer, nsamples=800, seqlen=256, seed=2, batch_size=4)
    t0 = time.perf_counter()
    q = lowbit.prepare_qat(copy.deepcopy(zoo.model), scheme)
    q.get_input_embeddings().weight.requires_grad_(False)  # float in the result (and tied to the head)
    steps = len(train)  # one pass at most; the time budget ends it first on 2 cores
    # (the budget counts from before prepare_qat; conversion comes after it)
    losses = fit(q, train, steps=steps, seconds=budget - (time.perf_counter() - t0), teacher=zoo.model,
                 lr=1e-5, step_lr=1e-4)  # fmt: skip
    lowbit.convert(q)
    t = time.perf_counter() - t0
    qat = ppl(q)
    out["smollm2"] = {"scheme": scheme, "tokens": tokens, "fp32": fp, "rtn": rtn, "qat": qat, "seconds": t,
                      "steps": len(losses), "planned_steps": steps, "train_tokens": len(losses) * 4 * 256,
                      "loss_first": sum(losses[:10]) / 10, "loss_last": sum(losses[-10:]) / 10,
                      "recovered": (rtn - qat) / (rtn - fp)}  # fmt: skip
    return out

LICENSES = Path("/usr/share/common-licenses")


def licence_text() -> str:
    """A second English domain that neither calibration nor any default saw: Debian's common
    licence texts (legal prose), each file once (symlinks resolved), in name order."""
    seen, parts = set(), []
    for f in sorted(LICENSES.iterdir()):
        r = f.resolve()
        if r in seen or not r.is_file():
            continue
        seen.add(r)
        parts.append(r.read_text(errors="replace"))
    return "\n\n".join(parts)


# (scheme, methods): GPTQ at 3 and 2 bits was left out for time (each row is a full GPTQ run and
# two perplexities on the reference kernels of an AVX2 machine); RTN covers every bit width.
SYM_ROWS = (("int8", ("rtn", "gptq")), ("w4g64", ("rtn", "gptq")), ("w3g64", ("rtn",)), ("w2g32", ("rtn",)))
SYM_CACHE = RESULTS / "sym_range_rows.json"  # finished rows, so an interrupted run resumes


def section_sym_range(quick: bool) -> dict:
    """Symmetric scale conventions per bit width (formats.Format.sym_range): "full" (the largest
    magnitude, signed, onto -2^(b-1)) vs "restricted" (max|x| / (2^(b-1) - 1)), RTN and GPTQ,
    perplexity on the held-out Python-doc split and on licence prose (a domain nothing tuned on).
    Each row patches the format table itself, so the rows do not depend on the shipped default."""
    import dataclasses

    import lowbit
    from lowbit import formats
    from lowbit.evaluate.data import calibration_batches
    from lowbit.evaluate.perplexity import perplexity
    from lowbit.models.zoo import load_model
    from lowbit.scheme import parse_scheme

    tokens = 2048 if quick else 8192
    zoo = load_model("smollm2-135m")
    prose = licence_text()
    cal = calibration_batches(zoo.tokenizer, nsamples=8 if quick else 32, seqlen=512, seed=0)
    cache = json.loads(SYM_CACHE.read_text()) if SYM_CACHE.exists() else {}

    def ppls(model) -> dict:
        doc = perplexity(model, zoo.tokenizer, max_tokens=tokens)
        lic = perplexity(model, zoo.tokenizer, max_tokens=tokens, text=prose, source="common-licenses")
        return {"pydoc": doc.ppl, "licences": lic.ppl, "text": doc.source}

    def row(scheme: str, method: str, rng: str, make) -> dict:
        key = f"{scheme}/{method}/{rng}/{tokens}"
        if key not in cache:
            cache[key] = {"scheme": scheme, "method": method, "sym_range": rng, **ppls(make())}
            print("  ", cache[key], file=sys.stderr, flush=True)
            SYM_CACHE.write_text(json.dumps(cache, indent=1) + "\n")
        return cache[key]

    original = dict(formats.FORMATS)
    rows = [row("fp32", "fp32", "-", lambda: zoo.model)]
    try:
        for scheme, methods in SYM_ROWS:
            fmt_name = parse_scheme(scheme).format
            for rng in ("full", "restricted"):
                formats.FORMATS[fmt_name] = dataclasses.replace(original[fmt_name], sym_range=rng)
                for method in methods:
                    rows.append(row(scheme, method, rng, lambda s=scheme, m=method: lowbit.quantize(
                        copy.deepcopy(zoo.model), s, method=m, calibration=cal if m == "gptq" else None)))
                formats.FORMATS[fmt_name] = original[fmt_name]
    finally:
        formats.FORMATS.update(original)
    return {"command": "python benchmarks/run_all.py --sections sym_range", "tokens": tokens,
            "calibration": f"{len(cal)} batches, {sum(b.shape[0] for b in cal)} x 512 tokens, calib split",
            "rows": rows}  # fmt: skip


DOMAIN_SCHEMES = ("w4g64", "w4g64-asym", "w3g64", "w3g64-asym", "w2g32-asym")
DOMAIN_METHODS = ("gptq", "awq", "awq+gptq")
DOMAIN_CALIBS = ("python-docs", "handbook")
DOMAIN_CACHE = RESULTS / "domains_rows.json"  # finished cells: the table takes hours, runs resume
DOMAIN_SEEDS = [0, 1, 2]  # calibration seeds of the domains section (--seeds: fewer, to render a partial run)
DOMAIN_CACHED_ONLY = [False]  # --cached-only: render the finished cells, compute none
MINILM_SCHEMES = ("w4g128", "w4g128-asym", "w3g64")


def section_domains_minilm(quick: bool) -> dict:
    """The sentence encoder beyond its calibration text (issue 13): all-MiniLM-L6-v2, GPTQ
    calibrated on sentences of one domain (seeded draws), mean cosine of mean-pooled embeddings
    to FP32 on 128 eval sentences of every domain; RTN beside."""
    import lowbit
    from lowbit.evaluate import domains as D
    from lowbit.models.zoo import load_model

    zoo = load_model("minilm")
    tok = zoo.tokenizer
    evals = D.available_domains()
    ncal, seeds, schemes = (128, (0,), MINILM_SCHEMES[:1]) if quick else (1024, (0, 1, 2), MINILM_SCHEMES)

    def embed(model, sents):
        b = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    held = {d: D.domain_sentences(d, "eval", 128) for d in evals}
    ref = {d: embed(zoo.model, s) for d, s in held.items()}

    def cosines(model) -> dict:
        return {d: round(float((ref[d] * embed(model, s)).sum(-1).mean()), 5) for d, s in held.items()}

    rows = []
    for scheme in schemes:
        rows.append({"scheme": scheme, "method": "rtn", "calib": "-", "seed": 0,
                     "cos": cosines(lowbit.quantize(copy.deepcopy(zoo.model), scheme))})  # fmt: skip
        for calib in [c for c in DOMAIN_CALIBS if c in evals]:
            for seed in seeds:
                sents = D.domain_sentences(calib, "calib", ncal, seed=seed)
                batches = [tok(sents[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
                           for i in range(0, len(sents), 32)]  # fmt: skip
                t0 = time.time()
                q = lowbit.quantize(copy.deepcopy(zoo.model), scheme, method="gptq", calibration=batches)
                rows.append({"scheme": scheme, "method": "gptq", "calib": calib, "seed": seed, "cos": cosines(q),
                             "quantize_seconds": round(time.time() - t0, 1)})  # fmt: skip
                print("  ", rows[-1], file=sys.stderr, flush=True)
    return {"command": "python benchmarks/run_all.py --sections domains_minilm", "evals": evals,
            "calibration": f"{ncal} sentences of the calib split, batches of 32 padded to 128 tokens at most",
            "held_out": "128 sentences of each eval split", "rows": rows}  # fmt: skip


DOMAIN_MACHINE_CHECK = RESULTS / "domains_machine_check.json"  # cells computed here and on another machine
DOMAIN_CLAIMS = RESULTS / "domains_claims.json"  # cell key -> pid computing it now (ignored by git)


def domain_cell_key(scheme: str, method: str, calib: str, seed: int, tokens: int, nsamples: int, seqlen: int) -> str:
    """A domains cell's key in ``DOMAIN_CACHE`` (also how ``peer_algorithms.py --skip-done`` finds it)."""
    return f"{scheme}/{method}/{calib}/{seed}/{tokens}/{nsamples}x{seqlen}"


def _update_json(path: Path, update) -> dict:
    """Read ``path`` (a JSON object; {} when absent), apply ``update(data)`` in place, write it back
    atomically and return it, under an exclusive lock on ``path.lock``: runs side by side (two
    seeds, an import) never drop each other's cells."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        update(data)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    return data


def _claim_cell(key: str) -> bool:
    """Claim a domains cell for this process (False: a live process on this machine holds it), so
    runs side by side, even of one seed, split the cells instead of computing one twice. A claim
    whose process has died is taken over; ``_release_cell`` drops it once the cell is cached."""
    got = [False]

    def claim(data: dict) -> None:
        pid = data.get(key)
        if pid not in (None, os.getpid()):
            try:
                os.kill(pid, 0)
                return
            except ProcessLookupError:
                pass
            except PermissionError:  # alive, another user's
                return
        data[key] = os.getpid()
        got[0] = True

    _update_json(DOMAIN_CLAIMS, claim)
    return got[0]


def _release_cell(key: str) -> None:
    _update_json(DOMAIN_CLAIMS, lambda d: d.pop(key, None) if d.get(key) == os.getpid() else None)


def import_domain_rows(path: Path) -> tuple[int, int]:
    """Take lowbit's own domain cells computed elsewhere (``peer_algorithms.py --peer lowbit --data
    FROZEN``: the same ``lowbit.quantize`` call on the same calibration windows and eval texts, on
    another machine's CPU cores) into the domains cache, each marked with that machine. A cell the
    cache already holds is kept as it is; the other machine's figures for it go to
    ``DOMAIN_MACHINE_CHECK`` (the report prints both, so the machine's own effect is visible).
    Returns (cells added, cells checked)."""
    rows = [r for r in json.loads(Path(path).read_text())
            if r.get("peer") == "lowbit" and r.get("status") == "ok" and r.get("ppl_by_domain")]  # fmt: skip
    news, checks, added = {}, {}, []
    for r in rows:
        method = r["algorithm"].removeprefix("lowbit ")
        key = domain_cell_key(r["scheme"], method, r["calib_domain"], r["seed"], r["tokens"], r["calib_samples"],
                              r.get("calib_seqlen", 512))  # rows before calib_seqlen: 512, the script's then-fixed length
        # env: "torch X, transformers Y, N threads[, GPU present]"; these cells ran on the CPU cores alone
        machine = f"{r['cpu']}; {', '.join(r['env'].split(', ')[:3])}"
        news[key] = {"scheme": r["scheme"], "method": method, "calib": r["calib_domain"], "seed": r["seed"],
                     "ppl": r["ppl_by_domain"], "quantize_seconds": r["quant_seconds"], "machine": machine}

    def add(cache: dict) -> None:
        for key, cell in news.items():
            if key not in cache:
                cache[key] = cell
                added.append(key)
            elif "machine" not in cache[key]:  # computed here: kept; the other machine's figures beside it
                checks[key] = cell

    _update_json(DOMAIN_CACHE, add)

    def check(data: dict) -> None:
        for key, cell in checks.items():
            data[key] = [c for c in data.get(key, []) if c["machine"] != cell["machine"]] + [
                {"ppl": cell["ppl"], "machine": cell["machine"]}]

    _update_json(DOMAIN_MACHINE_CHECK, check)
    return len(added), len(checks)


def section_domains(quick: bool) -> dict:
    """Accuracy beyond the calibration text (issue 13): SmolLM2-135M, each calibrated method x
    scheme x calibration domain (python-docs, handbook: each leaves three unseen) x seed, perplexity on
    the eval split of every domain (lowbit.evaluate.domains); RTN, data-free HQQ and FP32 beside them. A cell
    whose calibration domain is its evaluation domain is in-domain; the others are the claim."""
    import lowbit
    from lowbit.evaluate import domains as D
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    tok = zoo.tokenizer
    evals = D.available_domains()
    tokens, nsamples, seqlen = (1024, 4, 256) if quick else (4096, 32, 512)
    schemes, methods = (DOMAIN_SCHEMES[:1], DOMAIN_METHODS[:1]) if quick else (DOMAIN_SCHEMES, DOMAIN_METHODS)
    seeds = (0,) if quick else tuple(DOMAIN_SEEDS)
    # Two single-domain calibrations (each leaves three domains unseen: the claim) keep the full
    # table to ~90 cells of ~5 minutes; the mixed default is in-domain everywhere.
    cals = ["python-docs"] if quick else [c for c in DOMAIN_CALIBS if c in evals]
    cache = json.loads(DOMAIN_CACHE.read_text()) if DOMAIN_CACHE.exists() else {}

    def cell(scheme: str, method: str, calib: str, seed: int, make) -> dict | None:
        key = domain_cell_key(scheme, method, calib, seed, tokens, nsamples, seqlen)
        if key in cache or DOMAIN_CACHED_ONLY[0]:
            return cache.get(key)
        if not _claim_cell(key):
            print("  ", key, "is being computed by another run beside this one", file=sys.stderr, flush=True)
            return None
        try:
            # read after claiming: a run beside this one caches a cell before it drops its claim, and an
            # import may have brought it, so a cell finished meanwhile is taken, never computed again
            if DOMAIN_CACHE.exists():
                cache.update({k: v for k, v in json.loads(DOMAIN_CACHE.read_text()).items() if k not in cache})
            if key not in cache:
                t0 = time.time()
                model = make()
                seconds = time.time() - t0
                ppl = {d: r.ppl for d, r in D.domain_perplexities(model, tok, evals, max_tokens=tokens,
                                                                  seqlen=512).items()}  # fmt: skip
                done = {"scheme": scheme, "method": method, "calib": calib, "seed": seed, "ppl": ppl,
                        "quantize_seconds": round(seconds, 1)}  # fmt: skip
                print("  ", key, {d: round(v, 3) for d, v in ppl.items()}, file=sys.stderr, flush=True)
                # atomic, locked and merged with what is on disk: an interrupted run keeps every finished
                # cell, and runs side by side (--seeds 1 / --seeds 2 --threads 1) keep each other's
                cache.update(_update_json(DOMAIN_CACHE, lambda d: d.update({key: done})))
        finally:
            _release_cell(key)
        return cache[key]

    rows = [cell("fp32", "fp32", "-", 0, lambda: zoo.model)]
    rows += [cell(s, "rtn", "-", 0, lambda s=s: lowbit.quantize(copy.deepcopy(zoo.model), s)) for s in schemes]
    # HQQ needs no data: one cell per scheme, every domain unseen (the data-free baseline beside RTN).
    rows += [cell(s, "hqq", "-", 0, lambda s=s: lowbit.quantize(copy.deepcopy(zoo.model), s, method="hqq"))
             for s in schemes]  # fmt: skip
    for seed in seeds:  # seed outermost: an interrupted run has every cell once before any twice
        for scheme in schemes:
            for method in methods:
                for calib in cals:
                    def make(s=scheme, m=method, c=calib, sd=seed):
                        batches = lowbit.calibration_batches(tok, c, nsamples=nsamples, seqlen=seqlen, seed=sd)
                        return lowbit.quantize(copy.deepcopy(zoo.model), s, method=m, calibration=batches)

                    rows.append(cell(scheme, method, calib, seed, make))
    rows = [r for r in rows if r is not None]
    return {"command": "python benchmarks/run_all.py --sections domains", "tokens": tokens, "evals": evals,
            "calibration": f"{nsamples} x {seqlen} tokens per cell", "seeds": list(seeds),
            "domains": {d: D.DOMAINS[d][0] for d in evals}, "rows": rows}  # fmt: skip


def section_shrink_intensity(quick: bool) -> dict:
    """issue 13: the moment-shrinkage intensity d of ``moments.shrink_to_diagonal`` on 16 sampled
    SmolLM2-135M linears, with the data-estimated entry variances (the default) and the Gaussian
    form, from FP32 inputs on 32 x 512 tokens of the mixed calibration text (seed 0)."""
    import lowbit
    from lowbit.algorithms import moments
    from lowbit.calibrate import Stats
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    stats: dict = {}
    for i in (0, 5, 15, 29):
        for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            mod = zoo.model.get_submodule(f"model.layers.{i}.{n}")
            st = stats[f"model.layers.{i}.{n}"] = Stats(mod.in_features, frozenset({"hessian", "fourth"}))
            mod.register_forward_pre_hook(lambda m, a, st=st: st.add(a[0]))
    with torch.no_grad():
        for b in lowbit.calibration_batches(zoo.tokenizer, "mixed", nsamples=4 if quick else 32, seqlen=512, seed=0):
            zoo.model(b)

    def d(st, data: bool) -> float:  # read off the result: 1 - <shrunk, S> / <S, S> off the diagonal
        h = st.hessian
        got = moments.shrink_to_diagonal(h, st.tokens, st.kurtosis if data else None, st.channels if data else None)
        off = ~torch.eye(h.shape[0], dtype=torch.bool)
        return 1 - float((got[off] * h[off]).sum() / (h[off] * h[off]).sum())

    rows = [{"layer": n, "k": st.k, "tokens": st.tokens, "d_data": round(d(st, True), 5),
             "d_gaussian": round(d(st, False), 5)} for n, st in stats.items()]  # fmt: skip
    return {"command": "python benchmarks/run_all.py --sections shrink_intensity", "rows": rows}


def section_sparse_speed(quick: bool) -> dict:
    """issue 16: a 2:4-pruned w4g64 layer against the dense w4g64 layer, both as lowbit runs them,
    batch 1 (GEMV) and batch 16, weights cold (rotating copies), timed interleaved in one run; the
    bytes each stores beside. A pruned layer keeps its mask and kept codes on disk and runs the
    dense codes (removed weights as code-valued zeros) on the same integer kernel."""
    import time

    import lowbit
    from lowbit.evaluate.kernel_bench import _copies

    torch.manual_seed(0)
    reps = 15 if quick else 61
    rows = []
    for n, k in ((4096, 4096), (11008, 4096))[: 1 if quick else 2]:
        lin = torch.nn.Linear(k, n, bias=False)
        variants = {"w4g64": {}, "w4g64 2:4": {"method": "magnitude", "nm": "2:4"}}
        layers = {}
        for label, kw in variants.items():
            first = lowbit.quantize(torch.nn.Sequential(copy.deepcopy(lin)), "w4g64", **kw)[0]
            layers[label] = [first] + [copy.deepcopy(first) for _ in range(_copies(first.nbytes, 1) - 1)]
        for m in (1, 16):
            x = torch.randn(m, k)
            times = {label: [] for label in variants}
            with torch.no_grad():
                for i in range(reps):
                    for label, mods in layers.items():  # interleaved: drift hits both alike
                        mod = mods[i % len(mods)]
                        t = time.perf_counter()
                        mod(x)
                        times[label].append(time.perf_counter() - t)
            for label, mods in layers.items():
                rows.append({"shape": [m, n, k], "variant": label, "seconds": statistics.median(times[label][2:]),
                             "stored_bytes": mods[0].nbytes, "kernel": mods[0].kernel,
                             "sparsity": mods[0].sparsity})  # fmt: skip
                print("  sparse_speed", rows[-1], file=sys.stderr)
    return {"command": "python benchmarks/run_all.py --sections sparse_speed", "reps": reps, "rows": rows}


SECTIONS = {"kernels": section_kernels, "sparse_speed": section_sparse_speed, "paths": section_paths, "decode_1b": section_decode_1b, "kv_cache": section_kv_cache, "smollm2": section_smollm2, "decode": section_decode, "digits": section_digits,
            "algorithms": section_algorithms, "w8a8": section_w8a8, "sweeps": section_sweeps,
            "mobilenet": section_mobilenet, "mobilenet_speed": section_mobilenet_speed, "mixed": section_mixed, "mixed_base": section_mixed_base,
            "mixed_hessian": section_mixed_hessian,
            "qat": section_qat, "qat_digits": section_qat_digits, "qat_mobilenet": section_qat_mobilenet,
            "sym_range": section_sym_range, "domains": section_domains,
            "domains_minilm": section_domains_minilm, "hessian_memory": section_hessian_memory,
            "shrink_intensity": section_shrink_intensity}  # fmt: skip


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    # (the default runs every section: about 2 hours on 2 cores, the algorithms table most of it)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and tokens (smoke run)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="calibration seeds of the domains section (default 0 1 2; finished cells are cached, "
                         "so a subset renders what an interrupted run has)")  # fmt: skip
    ap.add_argument("--cached-only", action="store_true",
                    help="domains section: render the cells already finished, compute no new one")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch threads (default 2; the accuracy-only sections can run as two 1-thread processes)")
    ap.add_argument("--import-domain-rows", type=Path, default=None, metavar="FILE",
                    help="take lowbit's domain cells computed on another machine (peer_algorithms.py --peer lowbit "
                         "--data FROZEN --out FILE) into the domains cache, then exit")  # fmt: skip
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one quantize-and-evaluate job
    args = ap.parse_args()
    THREADS = args.threads
    if args.seeds is not None:
        DOMAIN_SEEDS[:] = args.seeds
    DOMAIN_CACHED_ONLY[0] = args.cached_only
    if args.import_domain_rows:
        added, checked = import_domain_rows(args.import_domain_rows)
        print(f"{added} cells added to {DOMAIN_CACHE.name}; {checked} already there, kept in {DOMAIN_MACHINE_CHECK.name}")
        return
    if args.child:
        warnings.filterwarnings("ignore")
        torch.set_num_threads(THREADS)
        job = json.loads(args.child)
        print(json.dumps(_child_hessian_memory(job) if job.get("kind") == "hessian_memory" else _child_quantize(job)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    RESULTS.mkdir(exist_ok=True)
    from lowbit.evaluate.kernel_bench import machine_info

    for name in args.sections:
        print(f"section {name}", file=sys.stderr)
        res = SECTIONS[name](args.quick)
        res.update(date=datetime.date.today().isoformat(), machine=machine_info(), versions=_versions(), quick=args.quick)
        (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    sys.path.insert(0, str(HERE))
    from report import write_benchmarks  # type: ignore

    write_benchmarks(RESULTS, HERE.parent / "BENCHMARKS.md")
    print("wrote BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
