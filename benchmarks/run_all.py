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
                "bnb-int8", "bnb-nf4g64")  # fmt: skip


def section_kernels(quick: bool) -> dict:
    from lowbit.evaluate.kernel_bench import SHAPES, run_kernel_bench

    sys.path.insert(0, str(HERE))
    from peers import available_peers  # type: ignore

    # Peers with a real CPU kernel; hqq's CPU path dequantizes the whole weight per call (and takes
    # ~10 s to quantize each 4096x4096 copy), so it is compared on accuracy, not here.
    peers = {k: v for k, v in available_peers().items() if k in KERNEL_PEERS}
    rows = run_kernel_bench(("int8", "w4g128", "w4g64"), shapes=SHAPES[:1] if quick else SHAPES,
                            reps=10 if quick else 40, peers=peers,
                            progress=lambda s: print("  ", s, file=sys.stderr))  # fmt: skip
    return {
        "command": "python benchmarks/run_all.py --sections kernels",
        "rows": [{"shape": list(r.shape), "label": r.label, "variant": r.variant, "seconds": r.seconds,
                  "weight_bytes": r.weight_bytes, "copies": r.copies} for r in rows],  # fmt: skip
    }


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


def _llamacpp_run(py: str, new_tokens: int) -> dict | None:
    from lowbit.evaluate.compare import DEMO_PROMPT

    print("  decode llama.cpp", file=sys.stderr)
    p = subprocess.run([py, str(HERE / "peer_llamacpp.py"), "--threads", str(THREADS), "--tokens", str(new_tokens),
                        "--prompt", DEMO_PROMPT], capture_output=True, text=True)  # fmt: skip
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


def section_decode(quick: bool) -> dict:
    import lowbit
    from lowbit.evaluate.compare import DEMO_PROMPT
    from lowbit.evaluate.speed import decode_speed
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    new_tokens = 64
    py = _llamacpp_python()
    before = _llamacpp_run(py, new_tokens) if py else None
    rows = []
    for label, spec in (("fp32", None), ("bf16", "bf16"), ("int8", "int8"), ("w4g64", "w4g64"),
                        ("w4g64 + int8 emb/head", "head")):  # fmt: skip
        print("  decode", label, file=sys.stderr)
        m = zoo.model if spec is None else lowbit.quantize(
            copy.deepcopy(zoo.model), _head_recipe("w4g64") if spec == "head" else spec)
        d = decode_speed(m, zoo.tokenizer, DEMO_PROMPT, new_tokens=new_tokens, reps=3 if quick else 5)
        rows.append({"variant": f"lowbit {label}", "tok_s": d.tokens_per_s, "all": d.all_tokens_per_s,
                     "model_bytes": lowbit.size_of(m).total_bytes, "completion": d.text,
                     "quant_layer_share": _quant_layer_share(m, zoo.tokenizer, new_tokens)})  # fmt: skip
    peer = None
    if py:
        # llama.cpp runs in its own process, before and after lowbit's runs; its figure is the
        # median over both runs' repetitions, so a drift of the machine shows in its spread.
        runs = [before, _llamacpp_run(py, new_tokens)]
        runs = [r for r in runs if r]
        if runs:
            peer = dict(runs[0])
            peer["decode_tok_s_all"] = sorted(x for r in runs for x in r["decode_tok_s_all"])
            peer["decode_tok_s_median"] = statistics.median(peer["decode_tok_s_all"])
    return {"command": "python benchmarks/run_all.py --sections decode", "new_tokens": new_tokens,
            "rows": rows, "llama_cpp": peer}  # fmt: skip


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


SECTIONS = {"kernels": section_kernels, "smollm2": section_smollm2, "decode": section_decode, "digits": section_digits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and tokens (smoke run)")
    args = ap.parse_args()
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
