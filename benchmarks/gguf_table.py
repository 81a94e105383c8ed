"""SmolLM2-135M in llama.cpp: lowbit's exports (RTN, GPTQ, AWQ+GPTQ written as exact Q4_0 / Q8_0)
against llama.cpp's own quantizer (Q4_0, Q4_0 with an importance matrix, Q4_K_M, Q5_0, Q8_0) from
the same F32 GGUF, every perplexity *computed by llama.cpp* (issue 15).

* The F32 GGUF is lowbit's export of the float model (every tensor F32, exact); llama.cpp's
  ``llama-quantize`` makes its variants from it, the ``imatrix`` one with an importance matrix
  that ``llama-imatrix`` computes on the calibration text lowbit's calibrated methods use
  (``--calib-domains``, default python-docs + handbook: the licences and quotes domains are seen
  by neither).
* lowbit's variants are quantized in memory and exported with :func:`lowbit.export`; 4-bit ones
  are w4g32 (one float16 scale per 32 weights: Q4_0's layout, so the same size as llama.cpp's
  Q4_0) with the tied embedding / head in w8g32 (Q8_0), the types llama.cpp's own Q4_0 mix picks
  for this model (its head type, Q6_K, falls back to Q8_0 on 576-wide rows).
* ``lowbit-gptq-mixed@Q4_K_M``: mixed precision at llama.cpp's Q4_K_M file size: each decoder
  layer exact Q4_0 or Q8_0, chosen by ``lowbit.mixed`` (KL of each layer measured around the
  all-w4g32 GPTQ model on calibration-domain windows, then the least predicted KL within the bytes).
* ``llamacpp-*+lowbit-imatrix``: llama.cpp's quantizer fed the importance matrix lowbit measures
  (``lowbit.export(..., llama_quantize=, importance=)``) on the same calibration windows, beside
  the files ``llama-imatrix`` + ``llama-quantize`` make.
* Perplexity: llama.cpp (llama-cpp-python, F32 KV cache, 2 threads) on the same token ids lowbit
  evaluates (``lowbit.evaluate.domains``, eval split, 4,096 tokens per domain, windows of 512):
  the mean NLL of every next token of every window.
* Decode: every file loaded in one process and run round-robin (``--rounds``, default 7; each
  round decodes 64 tokens at batch 1 with every model in turn, llama.cpp's own counters through
  ``peer_llamacpp.run_once``), the median per file: a noisy spell of the machine hits every row,
  not one (runs one after another drifted from 103 to 149 tok/s on one file).

    python benchmarks/gguf_table.py --tools /path/to/llama.cpp/build/bin [--again] [--only ppl|speed]

``--tools``: a llama.cpp build holding ``llama-quantize`` and ``llama-imatrix`` (``make
peers-llamacpp-tools`` builds them from the llama-cpp-python sdist). Results:
``benchmarks/results/gguf_table.json`` (resumable; ``--again`` redoes every row).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gguf_table.json"
WORK = Path("/tmp/lowbit-gguf")
DOMAINS_TOKENS = 4096
SEQLEN = 512
LOWBIT = {  # name -> (method, decoder scheme, embedding / head scheme, size budget: a llama.cpp row)
    "lowbit-rtn-Q4_0": ("rtn", "w4g32", "w8g32", None),
    "lowbit-gptq-Q4_0": ("gptq", "w4g32", "w8g32", None),
    "lowbit-awq+gptq-Q4_0": ("awq+gptq", "w4g32", "w8g32", None),
    "lowbit-rtn-Q8_0": ("rtn", "w8g32", "w8g32", None),
    # mixed precision at Q4_K_M's file size: each decoder layer Q4_0 or Q8_0, chosen by lowbit.mixed
    "lowbit-gptq-mixed@Q4_K_M": ("gptq", "w4g32|w8g32", "w8g32", "llamacpp-Q4_K_M"),
    # llama.cpp's quantizer fed lowbit's importance matrix (lowbit.export(..., llama_quantize=))
    "llamacpp-Q4_0+lowbit-imatrix": ("llama:Q4_0", "", "", None),
    "llamacpp-Q4_K_M+lowbit-imatrix": ("llama:Q4_K_M", "", "", None),
}
PROMPT = "The Python programming language is"
DECODE_TOKENS = 64
SENSITIVITY_WINDOWS = 8  # calibration-domain windows (seed 1) on which the mixed rows' KL is measured
LLAMACPP = {  # name -> (llama-quantize type, with the importance matrix)
    "llamacpp-Q4_0": ("Q4_0", False),
    "llamacpp-Q4_0-imatrix": ("Q4_0", True),
    "llamacpp-Q4_K_M": ("Q4_K_M", False),
    "llamacpp-Q4_K_M-imatrix": ("Q4_K_M", True),
    "llamacpp-Q5_0": ("Q5_0", False),
    "llamacpp-Q8_0": ("Q8_0", False),
}


def _save(data: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(RESULTS)


def _calibration(tok, domains: tuple[str, ...], nsamples: int, seed: int = 0):
    import lowbit

    return lowbit.calibration_batches(tok, domains, nsamples=nsamples, seqlen=SEQLEN, seed=seed)


def _mixed_recipe(zoo, cands: list[str], method: str, cal, domains: tuple[str, ...], extra_bytes: int, cache: Path):
    """Per-layer schemes from lowbit.mixed: the KL of changing one layer from the narrowest candidate
    to another, measured around the all-narrowest model (``base=``) quantized by ``method``, on
    calibration-domain windows; then the least predicted KL whose weights take at most
    ``extra_bytes`` more than the all-narrowest ones."""
    import lowbit.mixed as mixed

    if cache.exists():
        sens = mixed.Sensitivity.load(cache)
    else:
        batches = _calibration(zoo.tokenizer, domains, SENSITIVITY_WINDOWS, seed=1)
        sens = mixed.sensitivity(zoo.model, cands, batches, calibration=cal, method=method, base=cands[0])
        sens.save(cache)
    base_bytes = sum(sens.nbytes[n][cands[0]] for n in sens.layers)
    alloc = mixed.allocate(sens, max_bytes=base_bytes + extra_bytes)
    info = {"schemes": alloc.counts(), "predicted_kl": round(alloc.loss, 5), "gap": round(alloc.gap, 6),
            "base_kl": round(float(sens.info["base_loss"]), 5), "sensitivity_windows": SENSITIVITY_WINDOWS}  # fmt: skip
    return alloc.recipe(), info


def make_lowbit(name: str, out: Path, domains: tuple[str, ...], nsamples: int, extra_bytes: int = 0) -> dict:
    import lowbit
    from lowbit.io.report import is_tied
    from lowbit.models.zoo import load_model

    method, base, embed, _budget = LOWBIT[name]
    zoo = load_model("smollm2-135m")
    cal = _calibration(zoo.tokenizer, domains, nsamples) if method != "rtn" else None
    t0 = time.perf_counter()
    if method.startswith("llama:"):
        from lowbit.io.gguf import importance_matrix

        rep = lowbit.export(zoo.model, "gguf", out, overwrite=True, llama_quantize=method.split(":")[1],
                            importance=importance_matrix(zoo.model, cal))  # fmt: skip
        return {"quantize_seconds": round(time.perf_counter() - t0, 1), "mappings": rep.counts()}
    extra: dict = {}
    if "|" in base:
        decoder, extra = _mixed_recipe(zoo, base.split("|"), method, cal, domains, extra_bytes,
                                       out.with_suffix(".sensitivity.json"))  # fmt: skip
    else:
        decoder = lowbit.Recipe(lowbit.parse_scheme(base))
    # The tied embedding / head first, round-to-nearest, as one tensor (a calibrated method would
    # fit the head to its inputs and untie it: a second 8-bit copy in the file); then the decoder.
    model = lowbit.quantize(copy.deepcopy(zoo.model), lowbit.Recipe(None).add("*embed_tokens", embed).add("lm_head", embed),
                            method="rtn", progress=False)  # fmt: skip
    decoder = decoder.add("*embed_tokens", "skip").add("lm_head", "skip")
    model = lowbit.quantize(model, decoder, method=method, calibration=cal)
    assert is_tied(model)
    secs = time.perf_counter() - t0
    rep = lowbit.export(model, "gguf", out, overwrite=True)
    return {"quantize_seconds": round(secs, 1), "mappings": rep.counts(), **extra}


def make_fp32(out: Path) -> None:
    import lowbit
    from lowbit.models.zoo import load_model

    lowbit.export(load_model("smollm2-135m").model, "gguf", out, float_type="F32", overwrite=True)


def make_calib_text(out: Path, domains: tuple[str, ...], nsamples: int) -> int:
    """The calibration windows lowbit's methods see, decoded to text for llama-imatrix (which
    tokenizes it again with the same vocabulary)."""
    from lowbit.models.zoo import load_model

    tok = load_model("smollm2-135m").tokenizer
    windows = _calibration(tok, domains, nsamples)
    text = "".join(tok.decode(w.reshape(-1).tolist()) for w in windows)
    out.write_text(text)
    return sum(w.numel() for w in windows)


def child_ppl(path: str) -> dict:
    """Perplexity computed by llama.cpp on every available domain's eval tokens."""
    import llama_cpp
    import numpy as np

    from lowbit.evaluate.domains import available_domains, domain_token_ids
    from lowbit.models.zoo import load_model

    tok = load_model("smollm2-135m").tokenizer
    llm = llama_cpp.Llama(model_path=path, n_ctx=SEQLEN, n_batch=SEQLEN, n_ubatch=SEQLEN, n_threads=2,
                          logits_all=True, type_k=0, type_v=0, flash_attn=False, verbose=False)  # fmt: skip
    out = {}
    for d in available_domains():
        ids = domain_token_ids(tok, d, "eval", DOMAINS_TOKENS)
        n = len(ids) // SEQLEN
        nll, count = 0.0, 0
        for w in ids[: n * SEQLEN].reshape(n, SEQLEN).tolist():
            llm.reset()
            llm.eval(w)
            logits = np.array(llm.scores[: SEQLEN - 1], dtype=np.float64)
            m = logits.max(-1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
            nll += float((lse - logits[np.arange(SEQLEN - 1), w[1:]]).sum())
            count += SEQLEN - 1
        out[d] = round(float(np.exp(nll / count)), 4)
    return out


def _child(fn: str, arg: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", fn, arg], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    if p.returncode:
        raise RuntimeError(f"{fn} {arg} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def child_decode(paths: list[str], rounds: int) -> dict:
    """Batch-1 greedy decode of every file in one process, interleaved: each round runs every
    model once (64 new tokens, llama.cpp's own decode counters, ``peer_llamacpp.run_once``), so
    a slow spell of the machine lands on every row alike; the median over rounds per file."""
    import statistics

    import llama_cpp

    sys.path.insert(0, str(HERE))
    from peer_llamacpp import run_once

    llms = {p: llama_cpp.Llama(model_path=p, n_ctx=SEQLEN, n_threads=2, n_threads_batch=2, verbose=False) for p in paths}
    prompts = {p: llm.tokenize(PROMPT.encode(), add_bos=True) for p, llm in llms.items()}
    rates: dict[str, list[float]] = {p: [] for p in paths}
    for p, llm in llms.items():  # warm-up
        run_once(llm, prompts[p], DECODE_TOKENS)
    for _ in range(rounds):
        for p, llm in llms.items():
            rates[p].append(round(run_once(llm, prompts[p], DECODE_TOKENS)[1], 2))
    return {p: {"decode_tok_s_median": statistics.median(r), "decode_tok_s_all": r, "rounds": rounds,
                "new_tokens": DECODE_TOKENS, "threads": 2, "version": f"llama-cpp-python {llama_cpp.__version__}"}
            for p, r in rates.items()}  # fmt: skip


def _types_list(path: Path) -> list[str]:
    import gguf

    return [t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors]


def _types(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in _types_list(path):
        out[t] = out.get(t, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--tools", type=Path, help="llama.cpp build bin/ with llama-quantize and llama-imatrix")
    ap.add_argument("--calib-domains", default="python-docs,handbook")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--again", action="store_true")
    ap.add_argument("--only", choices=["ppl", "speed"], help="one half (speed needs a quiet machine)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved decode rounds (median)")
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out of this run")
    a = ap.parse_args()
    if a.child:
        fn, arg = a.child
        if fn == "ppl":
            print(json.dumps(child_ppl(arg)))
        elif fn == "decode":
            spec = json.loads(arg)
            print(json.dumps(child_decode(spec["paths"], spec["rounds"])))
        elif fn == "fp32":
            make_fp32(Path(arg))
            print("{}")
        else:
            spec = json.loads(arg)
            print(json.dumps(make_lowbit(spec["name"], Path(spec["out"]), tuple(spec["domains"]), spec["nsamples"],
                                         spec.get("extra_bytes", 0))))  # fmt: skip
        return
    domains = tuple(d for d in a.calib_domains.split(",") if d)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() and not a.again else {}
    data.setdefault("rows", {})
    data["calibration"] = {"domains": list(domains), "windows": a.nsamples, "seqlen": SEQLEN}
    WORK.mkdir(parents=True, exist_ok=True)
    fp32 = WORK / "smollm2-f32.gguf"
    if not fp32.exists():
        _child("fp32", str(fp32))
    files = {"F32": fp32}
    skip = set(a.skip.split(","))
    if any(imat for _t, imat in LLAMACPP.values()):
        imatrix = WORK / "imatrix.gguf"
        if not imatrix.exists():
            if a.tools is None:
                raise SystemExit("--tools is needed for llama.cpp's quantizer and imatrix")
            calib = WORK / "calib.txt"
            ntok = make_calib_text(calib, domains, a.nsamples)
            subprocess.run([str(a.tools / "llama-imatrix"), "-m", str(fp32), "-f", str(calib), "-o", str(imatrix),
                            "-c", str(SEQLEN), "-t", "2", "--chunks", str(a.nsamples), "-b", str(SEQLEN)],
                           check=True, capture_output=True)  # fmt: skip
            data["imatrix"] = {"calibration_tokens": ntok, "chunks": a.nsamples, "ctx": SEQLEN}
            _save(data)
        data.setdefault("imatrix", {"chunks": a.nsamples, "ctx": SEQLEN})  # made by an earlier run
    for name, (qtype, imat) in [kv for kv in LLAMACPP.items() if kv[0] not in skip]:
        f = WORK / f"{name}.gguf"
        row = data["rows"].setdefault(name, {})
        if not f.exists():
            if a.tools is None:
                raise SystemExit("--tools is needed for llama.cpp's quantizer")
            cmd = [str(a.tools / "llama-quantize")] + (["--imatrix", str(WORK / "imatrix.gguf")] if imat else [])
            p = subprocess.run(cmd + [str(fp32), str(f), qtype, "2"], capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(p.stderr[-3000:])
            row["fallbacks"] = sorted({ln.strip() for ln in p.stdout.splitlines() + p.stderr.splitlines()
                                       if "fallback" in ln.lower()})[:5]  # fmt: skip
        files[name] = f
    for name in [n for n in LOWBIT if n not in skip]:
        f = WORK / f"{name}.gguf"
        row = data["rows"].setdefault(name, {})
        if not f.exists() or "mappings" not in row:
            spec = {"name": name, "out": str(f), "domains": domains, "nsamples": a.nsamples}
            budget = LOWBIT[name][3]
            if budget is not None:  # the bytes left over the all-Q4_0 file, less a 32-byte alignment per tensor
                narrow = WORK / "lowbit-rtn-Q4_0.gguf"
                if budget not in files or not narrow.exists():
                    raise SystemExit(f"{name} needs the rows {budget} and lowbit-rtn-Q4_0 first")
                spec["extra_bytes"] = files[budget].stat().st_size - narrow.stat().st_size - 32 * len(_types_list(narrow))
            print(f"  {name} ...", flush=True)
            row.update(_child("make", json.dumps(spec)))
            _save(data)
            if budget is not None and f.stat().st_size > files[budget].stat().st_size:
                raise RuntimeError(f"{name}: {f.stat().st_size} bytes, over {budget}'s {files[budget].stat().st_size}")
        files[name] = f
    for name, f in files.items():
        row = data["rows"].setdefault(name, {})
        row["file_bytes"] = f.stat().st_size
        row["types"] = _types(f)
        if a.only != "speed" and "ppl" not in row:
            print(f"  {name}: perplexity ...", flush=True)
            row["ppl"] = _child("ppl", str(f))
            _save(data)
    if a.only != "ppl":
        print(f"  decode: {len(files)} files, {a.rounds} interleaved rounds ...", flush=True)
        speeds = _child("decode", json.dumps({"paths": [str(f) for f in files.values()], "rounds": a.rounds}))
        for name, f in files.items():
            data["rows"][name]["decode"] = speeds[str(f)]
        _save(data)
    from lowbit.kernels import cpu

    data["isa"] = cpu.isa()
    data["command"] = "python benchmarks/gguf_table.py --tools LLAMA_CPP_BUILD/bin"
    _save(data)


if __name__ == "__main__":
    main()
