"""Render benchmarks/results/*.json (written by run_all.py) as BENCHMARKS.md."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from lowbit.evaluate.table import markdown_table


def _load(results: Path, name: str) -> dict | None:
    f = results / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def _header(res: dict) -> str:
    m, v = res["machine"], res["versions"]
    peers = ", ".join(f"{k} {v[k]}" for k in ("torchao", "optimum-quanto", "bitsandbytes", "hqq", "llama-cpp-python") if k in v)
    quick = " (quick run: fewer repetitions)" if res.get("quick") else ""
    return (
        f"Measured {res['date']} on {m['cpu']}"
        + (f" (lowbit's CPU kernels: {m['isa']}; this CPU runs {', '.join(m['isas'])})" if m.get("isa") else "")
        + f", {m['threads']} threads, torch {m['torch']}, "
        f"transformers {v.get('transformers', '-')}{', ' + peers if peers else ''}{quick}.  \n"
        f"Command: `{res['command']}`"
    )


def _kernels(res: dict) -> str:
    base = {tuple(r["shape"]): r["seconds"] for r in res["rows"] if r["variant"] == "torch fp32"}
    bw = res.get("read_bandwidth_gbs")
    stream = {tuple(r["shape"]): r["weight_bytes"] / r["seconds"] / 1e9 for r in res["rows"]
              if r["variant"] == "read bandwidth (torch sum)"}  # fmt: skip
    rows = []
    for r in res["rows"]:
        mb = f"{r['weight_bytes'] / 2**20:.1f}" if r["weight_bytes"] > 0 else "-"
        gbs = r["weight_bytes"] / r["seconds"] / 1e9 if r["weight_bytes"] > 0 and r["shape"][0] == 1 else None
        ref = stream.get(tuple(r["shape"])) or (max(bw) if bw else None)
        eff = f"{gbs:.1f} ({100 * gbs / ref:.0f}%)" if gbs and ref else "-"
        speed = "-" if r["variant"] == "read bandwidth (torch sum)" else f"{base[tuple(r['shape'])] / r['seconds']:.2f}x"
        rows.append([r["label"], r["variant"], f"{r['seconds'] * 1e3:.3f}", speed, mb, eff, str(r["copies"])])
    isas = ", ".join(res.get("isas", ["avx512"]))
    bw_note = (f" The machine's streaming read bandwidth, measured in the same run (torch `sum` over 512 MiB, before "
               f"and after): {bw[0]:.1f} / {bw[1]:.1f} GB/s. A GEMV's effective GB/s is its weight bytes over its "
               "time; the percentage is of the `read bandwidth (torch sum)` row of its shape, a plain read of the "
               "FP32 copies timed in the same rounds as the kernels (so a neighbour's load on this shared machine "
               "hits both alike), or, where a run has no such row, of the higher before/after figure.") if bw else ""
    return "\n".join([
        "## Kernels: quantized linear layers vs FP32",
        "",
        _header(res),
        "",
        "Median time of one `y = x @ W^T` (x float32). Batch-1 rows rotate through `copies` distinct "
        "weights (>= 160 MiB per variant) so no variant runs from the 32 MiB L3 cache. lowbit's kernels "
        f"run the packed codes as stored, on the CPU-kernel ISA in brackets ({isas}; int16 activations for "
        "weight-only, int8 for W8A8); peers as noted in benchmarks/peers.py (several want bf16 activations "
        "and cast the input themselves; ort-w8a8 is onnxruntime's dynamic int8 MatMul on its MLAS kernels)." + bw_note,
        "",
        markdown_table(["shape", "variant", "ms", "speed vs fp32", "weight MiB", "GB/s (of bandwidth)", "copies"], rows),
    ] + _w8a8_exactness(res.get("w8a8_same_sign_error")))


def _w8a8_exactness(e: dict | None) -> list[str]:
    if not e:
        return []
    why = ("MLAS's u8 x s8 `vpmaddubsw` path saturates where a pair of products exceeds int16"
           if e["ort-w8a8"] > 0.01 else "no saturation on this CPU's MLAS path")
    return ["", f"Exactness, same run: W8A8 on positive activations near their maximum (as after a ReLU) times positive "
            f"weights, 8x512 @ 512x64, max relative error against FP32: onnxruntime {100 * e['ort-w8a8']:.1f}% "
            f"({why}), lowbit {100 * e['lowbit w8a8']:.2f}% ({e['kernel']}; on AVX2 every pair of products is kept "
            "below 2^15 by a sign trick, which costs one more vector instruction per 32 multiply-adds than "
            "MLAS's saturating path)."]


def _paths(res: dict) -> str:
    paths = res["paths"]
    schemes, table = [], {}
    for isa, rows in paths.items():
        fp = next(r for r in rows if r["variant"] == "torch fp32")
        for r in rows:
            if r["variant"] == "torch fp32":
                continue
            name, kern = r["variant"].removeprefix("lowbit ").split(" (", 1)
            if name not in schemes:
                schemes.append(name)
            table[(name, isa)] = f"{fp['seconds'] / r['seconds']:.2f}x ({kern.rstrip(')').split('/')[0]})"
    isas = list(paths)
    rows = [[s] + [table.get((s, i), "-") for i in isas] for s in schemes]
    return "\n".join([
        "## Every scheme on every kernel path: batch-1 speed vs FP32",
        "",
        _header(res),
        "",
        "GEMV 1x4096x4096, weights cold (rotating >= 160 MiB), one run per path with torch FP32 timed beside it; "
        "cell: FP32 time / lowbit time (kernel that ran). The `reference` column is LOWBIT_ISA=reference: no C "
        "kernels at all, what runs on a machine without a compiler, where `float-copy` keeps each layer's "
        "dequantized float32 weight after its first call (FP32's memory for the layer; dequantizing on every call, "
        "the reference kernel that defines the math, measured 0.02-0.05x FP32 here on 2026-11-30). `cpu-any` is "
        "the any-format kernel (rows dequantized once per call in C); `@hqq` rows carry HQQ's fractional zero points. "
        f"Streaming read bandwidth in this run: {res['read_bandwidth_gbs']:.1f} GB/s.",
        "",
        markdown_table(["scheme"] + isas, rows),
    ])


def _smollm2(res: dict) -> str:
    fp = next(r for r in res["rows"] if r["variant"] == "fp32")
    rows = []
    for r in res["rows"]:
        rows.append([
            r["variant"], f"{r['linear_bpw']:.3f}", f"{r['linear_compression']:.2f}x", f"{r['model_bytes'] / 1e6:.1f}",
            f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / fp['ppl'] - 1):+.2f}%",
            f"{r['file_bytes'] / 1e6:.1f}" if "file_bytes" in r else "-",
        ])  # fmt: skip
    return "\n".join([
        "## SmolLM2-135M: size and perplexity (RTN, weight-only)",
        "",
        _header(res),
        "",
        f"Perplexity on {fp['tokens']} held-out tokens of {fp['text']} text (windows of 512, disjoint from the "
        "calibration split). The 210 Linear layers of the decoder blocks are quantized; the tied "
        "embedding/LM head (28.3M params) stays FP32 unless the row says otherwise. Bits/weight and "
        "compression count the quantized layers' codes, scales and zero points. The FP32 checkpoint "
        f"file is {res['fp32_file_bytes'] / 1e6:.1f} MB.",
        "",
        markdown_table(["variant", "bits/weight", "Linear vs fp32", "model MB", "ppl", "Δppl", "lowbit file MB"], rows),
    ])


def _decode(res: dict) -> str:
    lean = [r for r in res["rows"] if r.get("decoder", "transformers") == "lowbit"]
    if not lean:  # results written before lowbit.generate existed
        return ""
    fp = next(r for r in lean if r["variant"] == "fp32")
    rows = [[r["variant"], r["decoder"], f"{r['tok_s']:.1f}", f"{r['tok_s'] / fp['tok_s']:.2f}x", f"{r['model_bytes'] / 1e6:.1f}"]
            for r in res["rows"]]  # fmt: skip
    peers = res.get("llama_cpp") or {}
    notes = []
    for q, peer in sorted(peers.items()):
        rows.append([f"llama.cpp {q} ({peer['model']})", peer["version"], f"{peer['decode_tok_s_median']:.1f}",
                     f"{peer['decode_tok_s_median'] / fp['tok_s']:.2f}x", f"{peer['file_bytes'] / 1e6:.1f} (file)"])  # fmt: skip
    if peers:
        best = max(lean, key=lambda r: r["tok_s"])
        ratios = ", ".join(f"{best['tok_s'] / p['decode_tok_s_median']:.2f}x llama.cpp {q}" for q, p in sorted(peers.items()))
        spread = "; ".join(f"{q} {min(p['decode_tok_s_all']):.1f}-{max(p['decode_tok_s_all']):.1f}" for q, p in sorted(peers.items()))
        notes.append(f"lowbit's fastest variant ({best['variant']}, lowbit.generate) decodes at {ratios}. llama.cpp's spread "
                     f"over its runs before and after lowbit's: {spread} tok/s.")  # fmt: skip
    return "\n".join([
        "## SmolLM2-135M: batch-1 decode speed",
        "",
        _header(res),
        "",
        f"Greedy decoding of {res['new_tokens']} tokens after a short prompt, tokens/s of the decode steps (prompt "
        f"excluded), median of repetitions, lowbit's CPU kernels on {res.get('isa', '?')}. `lowbit` rows run "
        "lowbit.generate (preallocated KV cache, the model's own quantized modules); `transformers` rows run the "
        "model's forward step by step with transformers' cache, for the record. llama.cpp through llama-cpp-python "
        "with its own counters (benchmarks/peer_llamacpp.py), run before and after lowbit's variants, median over "
        "both runs; Q4_0 is llama.cpp's own requantization of the package's Q4_1 file.",
        "",
        markdown_table(["variant", "decoder", "decode tok/s", "vs fp32", "MB"], rows),
        "",
        *notes,
    ])


def _decode_1b(res: dict) -> str:
    r = res["rows"][0]
    peer = res.get("llama_cpp")
    rows = [[r["variant"], f"{r['tok_s']:.1f}", f"{r['model_bytes'] / 1e9:.2f}"]]
    note = ""
    if peer:
        rows.append([f"llama.cpp Q4_0 ({peer['version']})", f"{peer['decode_tok_s_median']:.1f}",
                     f"{peer['file_bytes'] / 1e9:.2f} (file)"])  # fmt: skip
        note = (f"lowbit decodes at {r['tok_s'] / peer['decode_tok_s_median']:.2f}x llama.cpp's speed (llama.cpp's spread "
                f"over its runs before and after: {min(peer['decode_tok_s_all']):.1f}-{max(peer['decode_tok_s_all']):.1f} tok/s).")
    return "\n".join([
        "## A 1.1B Llama-shaped model: batch-1 decode speed (bandwidth-bound)",
        "",
        _header(res),
        "",
        f"Random weights in TinyLlama-1.1B's shapes with SmolLM2's tokenizer ({res['params'] / 1e9:.2f}B parameters; "
        "benchmarks/make_llama_1b.py writes the same weights as a transformers directory and as a GGUF file, which "
        "llama.cpp's own quantizer turns into Q4_0). Greedy decoding of "
        f"{res['new_tokens']} tokens, tokens/s of the decode steps, lowbit's kernels on {res.get('isa', '?')}.",
        "",
        markdown_table(["variant", "decode tok/s", "GB"], rows),
        "",
        note,
    ])


def _kv_cache(res: dict) -> str:
    rows = []
    for r in res["rows"]:
        base = next(x for x in res["rows"] if x["weights"] == r["weights"] and x["kv_cache"] == "float32")
        rows.append([r["weights"], r["kv_cache"], f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%"])
    b = res["cache_bytes"]
    return "\n".join([
        "## SmolLM2-135M: int8 KV cache (lowbit.generate)",
        "",
        _header(res),
        "",
        f"Perplexity on {res['rows'][0]['tokens']} held-out tokens of {res['rows'][0]['text']} text, each 512-token "
        "window run through lowbit's decoder with float32 or int8 keys/values (one float32 scale per layer, head and "
        f"position). Cache at the full {res['context']}-token context: {b['float32'] / 1e6:.0f} MB float32, "
        f"{b['int8'] / 1e6:.0f} MB int8.",
        "",
        markdown_table(["weights", "KV cache", "ppl", "vs float32 cache"], rows),
    ])


def _digits(res: dict) -> str:
    fp = res["rows"][0]
    rows = [[r["variant"], f"{100 * r['accuracy']:.2f}%", f"{100 * (r['accuracy'] - fp['accuracy']):+.2f}",
             f"{r['model_bytes'] / 1e3:.1f}"] for r in res["rows"]]  # fmt: skip
    return "\n".join([
        "## digits-cnn: accuracy (real labels)",
        "",
        _header(res),
        "",
        f"Test accuracy on {res['test_images']} held-out images of scikit-learn's digits; weight-only RTN, "
        "every Conv2d and Linear layer quantized.",
        "",
        markdown_table(["variant", "accuracy", "Δ points", "model KB"], rows),
    ])


def _loss_kept(ppl: float, rtn: float, fp: float) -> str:
    return f"{(ppl - fp) / (rtn - fp):.2f}" if rtn > fp else "-"


def _algorithms(res: dict) -> str:
    rows = [r for r in res["rows"] if r["seed"] == 0]
    fp = next(r for r in rows if r["method"] == "fp32")["ppl"]
    methods = [m for m in ("rtn", "gptq", "awq", "hqq", "awq+gptq") if any(r["method"] == m for r in rows)]
    schemes = list(dict.fromkeys(r["scheme"] for r in rows if r["method"] != "fp32"))
    table = []
    for sch in schemes:
        by = {r["method"]: r for r in rows if r["scheme"] == sch}
        rtn = by["rtn"]["ppl"]
        best = min((r for m, r in by.items() if m != "rtn"), key=lambda r: r["ppl"])
        cells = [sch]
        for m in methods:
            r = by.get(m)
            cells.append("-" if r is None else f"{r['ppl']:.2f}" + ("" if m == "rtn" else f" ({_loss_kept(r['ppl'], rtn, fp)})"))
        cells += [best["method"], _loss_kept(best["ppl"], rtn, fp), f"{best['ppl'] / fp:.2f}x", f"{rtn / best['ppl']:.1f}x"]
        table.append(cells)
    cost = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        cost.append([m, f"{sorted(r['quant_seconds'] for r in rs)[len(rs) // 2]:.0f}", f"{max(r['peak_rss_mb'] for r in rs):.0f}"])
    seeds = [r for r in res["rows"] if r["method"] in ("gptq", "awq+gptq") and r["scheme"] in ("w4g64", "w3g64-asym")]
    spread = []
    for sch in ("w4g64", "w3g64-asym"):
        for m in ("gptq", "awq+gptq"):
            ps = sorted(r["ppl"] for r in seeds if r["scheme"] == sch and r["method"] == m)
            if len(ps) > 1:
                spread.append([sch, m, ", ".join(f"{p:.3f}" for p in ps), f"{ps[-1] - ps[0]:.3f}",
                               f"{100 * (ps[-1] - ps[0]) / ps[0]:.1f}%"])  # fmt: skip
    cal = res["calibration"]
    parts = [
        "## SmolLM2-135M: GPTQ, AWQ, HQQ vs RTN at 4, 3 and 2 bits",
        "",
        _header(res),
        "",
        f"Perplexity on {rows[0]['tokens']} held-out tokens (FP32 {fp:.3f}); calibrated methods use {cal['nsamples']} "
        f"samples of {cal['seqlen']} tokens from the disjoint calibration split (seed 0). Each cell: perplexity "
        "(loss kept = (ppl - FP32) / (ppl_RTN - FP32), RTN of the same scheme). Every run is a fresh process.",
        "",
        markdown_table(["scheme", *[m.upper() if m != "awq+gptq" else "AWQ+GPTQ" for m in methods],
                        "best", "best loss kept", "best vs FP32", "RTN / best"], table),  # fmt: skip
        "",
        "Quantization cost on 2 threads (median wall seconds over the schemes; peak resident memory of the "
        "process, model load included):",
        "",
        markdown_table(["method", "seconds", "peak RSS MB"], cost),
    ]
    if spread:
        parts += ["", "Calibration-draw robustness (seeds 0, 1, 2 pick different calibration windows):", "",
                  markdown_table(["scheme", "method", "ppl per seed", "spread", "spread / ppl"], spread)]  # fmt: skip
    peers = res.get("peers")
    if peers:
        prow = peers if isinstance(peers, list) else peers.get("rows", [])
        ours = {r["scheme"]: r["ppl"] for r in rows if r["method"] == "rtn"}
        ptab = []
        order = {s: i for i, s in enumerate(["fp32", *ours])}  # lowbit's scheme order, then peer name
        for r in sorted(prow, key=lambda r: (order.get(r.get("scheme", ""), 99), r.get("peer", ""), r.get("algorithm", ""))):
            p, sch = r.get("ppl"), r.get("scheme", "")
            kept = _loss_kept(p, ours[sch], fp) if p is not None and sch in ours else "-"
            status = "" if r.get("status") == "ok" else r.get("status", "")
            calib = (r.get("calib") or "-").split(" tokens")[0]
            ptab.append([r.get("peer", ""), r.get("version", ""), r.get("algorithm", ""), sch, calib,
                         "-" if p is None else f"{p:.2f}", kept,
                         "-" if r.get("quant_seconds") is None else f"{r['quant_seconds']:.0f}",
                         (status + ": " if status else "") + (r.get("notes") or "")[:100]])  # fmt: skip
        parts += ["", "Peers on the same model, text and split (benchmarks/peer_algorithms.py; see its docstring for "
                  "exactly what each row runs). Loss kept is against lowbit's RTN of the same scheme; peer timings "
                  "were taken while the machine was shared (load average in results/peer_algorithms.json):", "",
                  markdown_table(["peer", "version", "algorithm", "scheme", "calibration", "ppl", "loss kept", "seconds", "notes"],
                                 ptab)]  # fmt: skip
    return "\n".join(parts)


def _w8a8(res: dict) -> str:
    fp = res["rows"][0]["ppl"]
    rows = [[f"{r['scheme']} ({r['method']})", f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / fp - 1):+.2f}%"] for r in res["rows"]]
    base = {r["label"]: r["seconds"] for r in res["speed"] if r["variant"] == "torch fp32"}
    speed = [[r["label"], r["variant"], f"{r['seconds'] * 1e3:.2f}", f"{base[r['label']] / r['seconds']:.2f}x"] for r in res["speed"]]
    return "\n".join([
        "## W8A8: int8 weights x int8 activations",
        "",
        _header(res),
        "",
        "Dynamic int8 activations times per-channel int8 weights on the VNNI integer GEMM (vpdpbusd). "
        "`w8a8`: one activation scale per token; `w8a8g128` / `w8a8g64`: one per token and per 128 / 64 "
        "input columns (the kernel converts each block's int32 sums to float once). `rtn`: weights rounded, "
        "activations quantized as they come; `smoothquant` (alpha 0.5) first migrates activation outliers "
        "into the weights (64 x 512 calibration tokens, calib split, seed 0).",
        "",
        markdown_table(["variant", "ppl", "Δppl"], rows),
        "",
        markdown_table(["shape", "variant", "ms", "speed vs fp32"], speed),
    ])


def _sweeps(res: dict) -> str:
    fp = res["fp32"]
    imps = [k for k in res["hqq"][0] if k not in ("scheme", "rtn")]
    hqq = [[r["scheme"], f"{r['rtn']:.2f}", *[f"{r[k]:.2f}" for k in imps]] for r in res["hqq"]]
    sq = [[str(r["alpha"]), f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / fp - 1):+.2f}%"] for r in res["smoothquant"]]
    return "\n".join([
        "## Tuned defaults: HQQ error weighting and SmoothQuant alpha",
        "",
        _header(res),
        "",
        f"Perplexity on {res['tokens']} tokens of the *train* split (disjoint from the eval split above and from "
        f"the calibration split), FP32 {fp:.3f}. HQQ weights each weight's error by |w|^importance (0 = the "
        "paper's objective); lowbit's defaults are 1.5 for symmetric and 0.5 for asymmetric schemes.",
        "",
        markdown_table(["scheme", "RTN", *[f"HQQ importance {k}" for k in imps]], hqq),
        "",
        f"W8A8 SmoothQuant alpha ({res['calibration']}); lowbit's default is 0.5:",
        "",
        markdown_table(["alpha", "ppl", "Δppl"], sq),
    ] + ([
        "",
        "W8A8 activation group size (one int8 scale per token, or per token and block of columns), "
        "dynamic and with SmoothQuant (alpha 0.5):",
        "",
        markdown_table(["scheme", "dynamic", "Δppl", "SmoothQuant", "Δppl"],
                       [[r["scheme"], f"{r['dynamic']:.3f}", f"{100 * (r['dynamic'] / fp - 1):+.2f}%",
                         f"{r['smoothquant']:.3f}", f"{100 * (r['smoothquant'] / fp - 1):+.2f}%"]
                        for r in res["act_groups"]]),
    ] if "act_groups" in res else []))


def _domains(res: dict) -> str:
    """One table per scheme: method <- calibration domain, per evaluation domain the perplexity and
    the fraction of RTN's loss kept (mean over seeds, with their spread); * marks in-domain cells."""
    evals, rows = res["evals"], res["rows"]
    fp = next(r for r in rows if r["method"] == "fp32")["ppl"]
    out = ["## Accuracy beyond the calibration text: SmolLM2-135M across text domains", "", _header(res), "",
           f"Perplexity on {res['tokens']} eval-split tokens of each domain ({'; '.join(f'{k}: {v}' for k, v in res['domains'].items())}); "
           f"calibration: {res['calibration']}, from the calib split of the named domain (`mixed`: equal parts of every domain), "
           f"seeds {res['seeds']}. Cell: perplexity, then the fraction of RTN's loss (ppl - FP32) the method keeps (lower is better), "
           "mean over seeds and its range; * = calibrated on the evaluation domain itself. FP32: "
           + ", ".join(f"{d} {fp[d]:.2f}" for d in evals) + "."]  # fmt: skip
    out += ["", domains_overview(res)]
    for scheme in dict.fromkeys(r["scheme"] for r in rows if r["method"] != "fp32"):
        rtn = next(r for r in rows if r["scheme"] == scheme and r["method"] == "rtn")["ppl"]
        cells: dict = {}
        for r in rows:
            if r["scheme"] == scheme and r["method"] not in ("fp32", "rtn"):
                cells.setdefault((r["method"], r["calib"]), []).append(r["ppl"])
        peers: dict = {}
        for r in res.get("peers") or []:
            if r["scheme"] == scheme and r.get("status") == "ok" and r.get("ppl_by_domain"):
                name = f"{_PEER_NAMES.get(r['peer'], r['peer'])} {r['version']}: {r['algorithm'].split(' (')[0]}"
                peers.setdefault((name, r["calib_domain"]), []).append(r["ppl_by_domain"])
        table = [["rtn", "-"] + [f"{rtn[d]:.2f}" for d in evals]]
        for (method, calib), runs in list(cells.items()) + list(peers.items()):
            line = [method, calib]
            for d in evals:
                ppl = statistics.mean(p[d] for p in runs)
                kept = [(p[d] - fp[d]) / (rtn[d] - fp[d]) for p in runs]
                spread = f" [{min(kept):.2f}-{max(kept):.2f}]" if len(kept) > 1 else ""
                line.append(f"{ppl:.2f} ({statistics.mean(kept):.2f}{spread}){' *' if calib == d else ''}")
            table.append(line)
        out += ["", f"**{scheme}**", "", markdown_table(["method", "calibration", *evals], table)]
        calibrated = {k: v for k, v in cells.items() if k[1] != "-"}  # data-free rows (HQQ) are no claim
        out += ["", _unseen_summary(calibrated, fp, rtn, evals)]
        if peers:
            out[-1] += " Peers (same calibration windows): " + _unseen_summary(peers, fp, rtn, evals)
    if res.get("peers"):
        out += ["", "Peer rows: `benchmarks/peer_algorithms.py --peer llmc|torchao --calib-domains python-docs handbook` "
                "(each peer calibrated on exactly the windows of lowbit's cells, its weights scored by the same "
                "perplexity code; see the script's docstring)." + _peer_devices(res["peers"], res.get("device_check"))]
    machines = _cell_machines(rows, res.get("machine_check"))
    if machines:
        out += ["", machines]
    return "\n".join(out)


def _cell_machines(rows: list, check: dict | None) -> str:
    """Which of lowbit's cells were computed on another machine (a cell's ``machine``, set by
    ``run_all.py --import-domain-rows``), and the cells run on both, so the machine's own effect shows."""
    where: dict = {}
    for r in rows:
        if r.get("machine"):
            where.setdefault(r["machine"], []).append(r)
    if not where:
        return ""
    seeds = {m: sorted({r["seed"] for r in rs}) for m, rs in where.items()}
    parts = [f"{len(rs)} on {m} (seed{'s' if len(seeds[m]) > 1 else ''} {', '.join(map(str, seeds[m]))})"
             for m, rs in where.items()]
    text = ("lowbit cells computed on another machine's CPU cores (`benchmarks/peer_algorithms.py --peer lowbit "
            "--data FROZEN`: the same `lowbit.quantize` call on the same calibration windows and eval texts; taken "
            "in by `run_all.py --import-domain-rows`): " + "; ".join(parts) + "; the rest on this project's CPU "
            "machines.")
    by_key = {f"{r['scheme']}/{r['method']}/{r['calib']}/{r['seed']}": r for r in rows}
    for key, c in [(k, c) for k, cs in (check or {}).items() for c in cs]:
        mine = by_key.get(key.rsplit("/", 2)[0])
        if mine is None:
            continue
        pairs = ", ".join(f"{d} {v:.2f} vs {c['ppl'][d]:.2f}" for d, v in mine["ppl"].items() if d in c["ppl"])
        text += (f" The table's cell {key.rsplit('/', 2)[0]} vs the same cell rerun on {c['machine']}: {pairs} "
                 "(the machine, its thread count and torch build alone move a cell by this much: float sums in another order).")
    return text


def _peer_devices(peers: list, check: list | None) -> str:
    """Where the peer rows ran (a row's ``env`` names the GPU when it had one), and the one job
    run on both, so a reader sees how far a device change alone moves a peer's figures."""
    where: dict = {}
    for r in peers:
        if r.get("status") == "ok" and r.get("ppl_by_domain"):
            env = r.get("env", "")
            dev = env.rsplit(", ", 1)[-1] if "threads, " in env else "CPU"
            where.setdefault(dev, {}).setdefault(f"{_PEER_NAMES.get(r['peer'], r['peer'])} "
                                                 f"{r['algorithm'].split(' (')[0]}", set()).add(r.get("seed"))
    if len(where) < 2:
        return ""
    text = " Rows ran on: " + "; ".join(
        f"{dev}: " + ", ".join(f"{name} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, sorted(s)))})"
                           for name, s in sorted(names.items()))
        for dev, names in sorted(where.items()))  # fmt: skip
    for c in check or []:
        twin = next((r for r in peers if r.get("status") == "ok" and r.get("ppl_by_domain") and
                     all(r.get(k) == c.get(k) for k in ("peer", "algorithm", "scheme", "calib_domain", "seed"))), None)
        if twin is None or twin.get("env") == c.get("env"):
            continue
        pairs = ", ".join(f"{d} {twin['ppl_by_domain'][d]:.2f} vs {c['ppl_by_domain'][d]:.2f}" for d in c["ppl_by_domain"])
        text += (f". The same job ({_PEER_NAMES.get(c['peer'], c['peer'])} {c['algorithm'].split(' (')[0]} "
                 f"{c['scheme']}, {c['calib_domain']} seed {c['seed']}) on both: {pairs} (its table row vs the rerun "
                 f"on {c['env'].rsplit(', ', 1)[-1]}): the device alone moves its figures by this much")
    return text + "."


def _shrink_intensity(res: dict) -> str:
    table = [[r["layer"], str(r["k"]), str(r["tokens"]), f"{r['d_data']:.4f}", f"{r['d_gaussian']:.4f}"] for r in res["rows"]]
    return "\n".join(["## Moment shrinkage intensity: SmolLM2-135M", "", _header(res), "",
                      "The intensity d with which GPTQ/AWQ's E[x x^T] is shrunk toward its diagonal "
                      "(`lowbit.algorithms.moments.shrink_to_diagonal`), per sampled linear, from FP32 inputs on "
                      "mixed calibration text: with each entry's sampling variance estimated from the data (the "
                      "default) and with the Gaussian form.", "",
                      markdown_table(["layer", "K", "tokens", "d (data)", "d (Gaussian)"], table)])  # fmt: skip


_PEER_NAMES = {"llmc": "llm-compressor", "torchao": "torchao"}


def domains_overview(res: dict) -> str:
    """The headline of the domains section (README copies it): per scheme and method (lowbit's and
    the peers'), the share of RTN's loss kept on the evaluation domains calibration did not use,
    averaged over every (calibration, unseen evaluation) pair and seed, and the worst single run."""
    evals, rows = res["evals"], res["rows"]
    fp = next(r for r in rows if r["method"] == "fp32")["ppl"]
    runs: dict = {}  # (scheme, method) -> {(calib, eval): [kept per seed]}
    rtn = {r["scheme"]: r["ppl"] for r in rows if r["method"] == "rtn"}
    named = [(r["scheme"], r["method"], r["calib"], r["ppl"]) for r in rows if r["method"] not in ("fp32", "rtn")]
    peer: set = set()
    for r in res.get("peers") or []:
        if r.get("status") == "ok" and r.get("ppl_by_domain") and r["scheme"] in rtn:
            name = f"{_PEER_NAMES.get(r['peer'], r['peer'])} {r['algorithm'].split(' (')[0]}"
            named.append((r["scheme"], name, r["calib_domain"], r["ppl_by_domain"]))
            peer.add(name)
    for scheme, method, calib, ppl in named:
        for d in evals:
            if d != calib:
                kept = (ppl[d] - fp[d]) / (rtn[scheme][d] - fp[d])
                runs.setdefault((scheme, method), {}).setdefault((calib, d), []).append(kept)
    free = {m for _, m, c, _ in named if c == "-"}  # data-free (HQQ): every domain unseen
    methods = sorted(dict.fromkeys(m for _, m in runs), key=lambda m: (m in peer, m in free))
    table = []
    for scheme in rtn:
        line = [scheme]
        for m in methods:
            pairs = runs.get((scheme, m))
            if not pairs:
                line.append("-")
                continue
            mean = statistics.mean(statistics.mean(v) for v in pairs.values())
            worst = max(max(v) for v in pairs.values())
            lo, hi = min(len(v) for v in pairs.values()), max(len(v) for v in pairs.values())
            seeds = f"{lo}-{hi} seeds" if lo < hi else f"{lo} seed{'s' if lo > 1 else ''}"
            line.append(f"{mean:.2f} (worst {worst:.2f}; {seeds})")
        table.append(line)
    heads = [f"{m} (no data)" if m in free else m for m in methods]
    return ("Overview: the share of RTN's loss (perplexity - FP32) each method keeps on the domains its calibration "
            "did not use (lower is better; 1 = no better than RTN): mean over every (calibration, unseen domain) "
            "pair and seed, and the worst single run.\n\n" + markdown_table(["scheme", *heads], table))


def _unseen_summary(cells: dict, fp: dict, rtn: dict, evals: list) -> str:
    """The claim on domains calibration did not use: the best method's share of RTN's loss (mean
    over seeds) in the worst (calibration, evaluation) pair, the worst single run of any method,
    and RTN's perplexity over the best method's in the least favourable pair."""
    best, worst, ratio = [], [], []
    for calib in dict.fromkeys(c for _, c in cells):
        for d in evals:
            if d == calib:
                continue
            means = {}
            for (method, c), runs in cells.items():
                if c != calib:
                    continue
                kept = [(p[d] - fp[d]) / (rtn[d] - fp[d]) for p in runs]
                means[method] = statistics.mean(kept)
                worst.append((max(kept), method, calib, d))
                ratio.append((rtn[d] / statistics.mean(p[d] for p in runs), method, calib, d))
            if means:
                m = min(means, key=means.get)
                best.append((means[m], m, calib, d))
    if not best:
        return "(no cell has an evaluation domain its calibration did not use)"
    b, w = max(best), max(worst)
    r = min(max((x for x in ratio if x[2:] == pair[2:]), default=(0,)) for pair in best)
    return (f"Unseen domains: the best method keeps at most {b[0]:.2f} of RTN's loss ({b[1]}, {b[2]} → {b[3]}); "
            f"the worst single run of any method {w[0]:.2f} ({w[1]}, {w[2]} → {w[3]}); the best method's "
            f"perplexity is at least {r[0]:.1f}× below RTN's ({r[2]} → {r[3]}).")


def _domains_minilm(res: dict) -> str:
    evals = res["evals"]
    table = []
    groups: dict = {}
    for r in res["rows"]:
        groups.setdefault((r["scheme"], r["method"], r["calib"]), []).append(r["cos"])
    for (scheme, method, calib), runs in groups.items():
        line = [scheme, method, calib]
        for d in evals:
            v = [c[d] for c in runs]
            spread = f" [{min(v):.4f}-{max(v):.4f}]" if len(v) > 1 else ""
            line.append(f"{statistics.mean(v):.4f}{spread}{' *' if calib == d else ''}")
        table.append(line)
    return "\n".join(["## Accuracy beyond the calibration text: MiniLM sentence embeddings", "", _header(res), "",
                      f"all-MiniLM-L6-v2, mean-pooled sentence embeddings; cell: mean cosine to FP32 over "
                      f"{res['held_out']} (mean over seeds and its range; * = calibrated on that domain). "
                      f"Calibration: {res['calibration']}, seeded draws.", "",
                      markdown_table(["scheme", "method", "calibration", *evals], table), "",
                      minilm_unseen(res)])  # fmt: skip


def minilm_unseen(res: dict) -> str:
    """Per scheme, the calibrated rows on the domains their calibration did not use (README copies
    it): the lowest (calibration, domain) mean cosine over seeds, the worst single run, and RTN's range."""
    out = []
    for scheme in dict.fromkeys(r["scheme"] for r in res["rows"]):
        rtn = [c for r in res["rows"] if r["scheme"] == scheme and r["method"] == "rtn" for c in r["cos"].values()]
        pairs: dict = {}
        for r in res["rows"]:
            if r["scheme"] == scheme and r["calib"] != "-":
                for d, c in r["cos"].items():
                    if d != r["calib"]:
                        pairs.setdefault((r["method"], r["calib"], d), []).append(c)
        for method in dict.fromkeys(k[0] for k in pairs):
            mine = {k: v for k, v in pairs.items() if k[0] == method}
            (_, calib, d), low = min(((k, statistics.mean(v)) for k, v in mine.items()), key=lambda kv: kv[1])
            runs = [c for v in mine.values() for c in v]
            seeds = sorted({len(v) for v in mine.values()})
            out.append(f"{scheme} {method}: mean cosine at least {low:.4f} on every unseen (calibration, domain) "
                       f"pair (lowest {calib} → {d}), worst single run {min(runs):.4f}, "
                       f"{'-'.join(map(str, seeds))} seed(s) per pair; RTN {min(rtn):.4f}-{max(rtn):.4f}.")
    return "Unseen domains: " + " ".join(out)


def _sym_range(res: dict) -> str:
    fp = next(r for r in res["rows"] if r["method"] == "fp32")
    rows = []
    for r in res["rows"]:
        if r["method"] == "fp32":
            continue
        rows.append([r["scheme"], r["method"], r["sym_range"],
                     f"{r['pydoc']:.3f}", f"{100 * (r['pydoc'] / fp['pydoc'] - 1):+.2f}%",
                     f"{r['licences']:.3f}", f"{100 * (r['licences'] / fp['licences'] - 1):+.2f}%"])  # fmt: skip
    return "\n".join([
        "## Symmetric scale convention per bit width",
        "",
        _header(res),
        "",
        "`full`: the group's largest magnitude, signed, onto the most negative code (`s = m / -2^(b-1)`, "
        "ggml's Q4_0); `restricted`: `s = max|x| / (2^(b-1) - 1)` (Q8_0, ONNX, compressed-tensors int8). "
        f"SmolLM2-135M perplexity on {res['tokens']} tokens of each text: the held-out Python-doc split "
        f"(FP32 {fp['pydoc']:.3f}) and Debian's licence texts (`/usr/share/common-licenses`, legal prose "
        f"no default was tuned on, FP32 {fp['licences']:.3f}). RTN at every bit width, GPTQ at 8 and 4 bits "
        f"(calibration: {res['calibration']}). "
        "The format table (`lowbit/formats.py`, `sym_range`) takes, per bit width, the convention that "
        "wins on both texts.",
        "",
        markdown_table(["scheme", "method", "convention", "pydoc ppl", "Δ", "licences ppl", "Δ"], rows),
    ])


def _mobilenet_speed(sp: dict | None) -> str:
    if sp is None:
        return ""
    counts = ", ".join(f"{k} x{v}" for k, v in sorted(sp["kernels"].items()))
    return (
        f"Speed (per-channel W8A8, percentile; `{sp['command']}`), batch of {sp['batch']} crops, medians of "
        f"{sp['reps']} side by side: FP32 {sp['fp32_s'] * 1e3:.0f} ms; lowbit {sp['w8a8_static_s'] * 1e3:.0f} ms "
        f"(**{sp['fp32_s'] / sp['w8a8_static_s']:.2f}x** FP32) with the pointwise (1x1) convolutions and the "
        f"classifier on the W8A8 GEMM (`cpu-vnni-a8`: pixels as rows, static int8 inputs, channels-last between "
        f"layers) and the depthwise ones in int32 arithmetic on int8-rounded inputs (`cpu-dw-a8`); only the first "
        f"3x3 convolution (3 input channels) runs the reference path -- {counts}. Every layer on the reference path "
        f"(input rounded to its int8 grid, dequantized weight, float conv): {sp['reference_s'] * 1e3:.0f} ms "
        f"({sp['fp32_s'] / sp['reference_s']:.2f}x)."
    )


def _mobilenet(res: dict) -> str:
    rows = [[r["variant"], r["observer"], r.get("bias_correction", "no"), f"{100 * r['agreement']:.1f}%",
             f"{100 * r['agreement_all']:.1f}%",
             f"{r['mean_kl']:.3f}", f"{r['bpw']:.2f}", f"{r['model_bytes'] / 1e6:.2f}"] for r in res["rows"]]  # fmt: skip
    conf = res["rows"][0]["confident"]
    mixed = []
    for m in res["mixed"]:
        counts = ", ".join(f"{c} x{k}" for c, k in sorted(m["counts"].items()))
        floats = ", ".join(m["float_layers"]) or "none"
        mixed.append(f"* {m['variant']}: {counts}; float layers: {floats}; predicted KL {m['predicted_kl']:.3f}, "
                     f"optimality gap {m['gap']:.2g}")  # fmt: skip
    sens = [[s["layer"], *[f"{s[c]:.4f}" for c in ("w8a8-tensor-static", "w8a8-static", "w4a8-static")]]
            for s in res["most_sensitive"]]  # fmt: skip
    return "\n".join([
        "## MobileNetV2: static INT8 (Conv2d), observers, mixed precision",
        "",
        _header(res),
        "",
        f"ImageNet MobileNetV2 (BatchNorms folded) on {res['eval_crops']} augmented crops of the 10 photos bundled "
        f"with scikit-image and scikit-learn (eval split); scales calibrated on {res['calib_crops']} other crops "
        f"(calib split). No labels: *agreement* = top-1 agreement with FP32 on the {conf} crops where FP32 is "
        "confident (p >= 0.5; near-ties flip on noise), *all* = agreement on every crop, KL = mean KL(FP32 || "
        "quantized). Static activations: one scale and zero point per layer input (unsigned codes after "
        "ReLU6); weights per channel unless 'per-tensor'. bpw: stored bits per weight of the quantized layers. "
        "*bias corr.*: `quantize(..., bias_correction=)`, one more calibration pass that moves each layer's mean "
        "output error per channel into its bias (the default for static schemes; Nagel et al. 2019). "
        "Noise: re-running this table with kernels that differ from the reference only in float rounding at "
        "ties moved agreement by up to 1.5 points (4 crops) and KL by at most 0.005; KL is the finer measure.",
        "",
        markdown_table(["variant", "observer", "bias corr.", "agreement", "all", "KL", "bpw", "model MB"], rows),
        "",
        "Mixed precision (`lowbit.mixed`: each layer quantized alone on 32 other calibration crops, KL to FP32, "
        "then the knapsack):",
        "",
        *mixed,
        "",
        "Most sensitive layers (KL when quantized alone):",
        "",
        markdown_table(["layer", "w8a8 per-tensor", "w8a8 per-channel", "w4a8 per-channel"], sens),
        "",
        f"![MobileNetV2 sensitivity]({res['plot']})",
        "",
        _mobilenet_speed(res.get("speed_run")),
    ])


def _mixed(res: dict) -> str:
    fp = res["fp32"]
    rows = []
    for r in res["uniform"] + res["mixed"]:
        counts = ", ".join(f"{c} x{k}" for c, k in sorted(r.get("counts", {}).items())) or "uniform"
        rows.append([r["variant"], r["method"], f"{r['bpw']:.3f}", f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / fp - 1):+.2f}%",
                     counts])  # fmt: skip
    return "\n".join([
        "## SmolLM2-135M: mixed precision vs uniform",
        "",
        _header(res),
        "",
        f"Sensitivity: each of the 210 block linears quantized alone with w3g64, w4g64 and int8 (RTN), KL of the "
        f"next-token distributions to FP32 on {res['sensitivity_tokens']} calibration tokens "
        f"({res['sensitivity_seconds']:.0f} s). Allocation: the knapsack at each target bits per weight (over the "
        f"block linears; embeddings and head stay float in every row). Perplexity on {res['tokens']} held-out "
        f"tokens, FP32 {fp:.3f}.",
        "",
        markdown_table(["variant", "method", "bpw", "ppl", "Δppl", "layers"], rows),
        "",
        *[f"![{Path(p).stem}]({p})" for p in res["plots"]],
    ] + _mixed_base(res.get("base"), fp) + _mixed_hessian(res.get("hessian"), fp, res["sensitivity_seconds"]))


def _mixed_rows(res: dict, fp: float) -> list[list[str]]:
    return [[r["variant"], r["method"], f"{r['bpw']:.3f}", f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / fp - 1):+.2f}%",
             ", ".join(f"{c} x{k}" for c, k in sorted(r["counts"].items())), f"{r['predicted_kl']:.3f}"]
            for r in res["rows"]]  # fmt: skip


def _mixed_hessian(res: dict | None, fp: float, measured_seconds: float) -> list[str]:
    if res is None:
        return []
    vs = res.get("vs_measured")
    agree = ""
    if vs:
        per = ", ".join(f"{c} {v:.2f}" for c, v in vs["spearman"].items())
        agree = (f" Against the measured table above: Spearman rank correlation {vs['spearman_all']:.2f} over all "
                 f"(layer, candidate) pairs ({per} within each candidate); predicted / measured KL: median "
                 f"{vs['ratio_median']:.2f}, 10th-90th percentile {vs['ratio_p10']:.2f}-{vs['ratio_p90']:.2f}.")  # fmt: skip
    return [
        "",
        f"Predicted instead of measured (`sensitivity(..., cost=\"hessian\")`, `lowbit sensitivity --cost hessian`): "
        f"KL ~ 1/2 tr(H_l)/n_l ||dW_l||^2 with the Hessian traces estimated from {res['draws']} sampled outputs per "
        f"position (Fisher identity at FP32), on the same sensitivity tokens: {res['sensitivity_seconds']:.0f} s "
        f"instead of {measured_seconds:.0f} s.{agree} Command: `{res['command']}`.",
        "",
        markdown_table(["variant", "method", "bpw", "ppl", "Δppl", "layers", "predicted KL"], _mixed_rows(res, fp)),
    ]


def _mixed_base(res: dict | None, fp: float) -> list[str]:
    if res is None:
        return []
    rows = _mixed_rows(res, fp)
    return [
        "",
        f"Around an operating point (`sensitivity(..., base=\"w4g64\")`, `lowbit sensitivity --base w4g64`): "
        f"every layer starts at w4g64 and one at a time changes to w3g64 or int8; the cost is the change of the "
        f"KL ({res['sensitivity_seconds']:.0f} s). The all-w4g64 model's KL on the sensitivity tokens is "
        f"{res['base_kl']:.3f} nats. Per-layer costs interact: measured around FP32 (table above), the 4.25 bpw "
        f"allocation predicted less KL than uniform w4g64 but measured worse with RTN; measured around the "
        f"point the allocation lands near, it beats uniform w4g64 with RTN and GPTQ. Command: `{res['command']}`.",
        "",
        markdown_table(["variant", "method", "bpw", "ppl", "Δppl", "layers", "predicted KL"], rows),
    ]


def _qat_digits(d: dict | None) -> list[str]:
    if d is None:
        return []
    fp = d["rows"][0]["accuracy"]
    rows = [["fp32", "-", f"{100 * fp:.2f}%", "-", "-", "-"]]
    for r in d["rows"][1:]:
        lost = fp - r["ptq"]
        rec = f"{100 * (r['qat'] - r['ptq']) / lost:.0f}%" if lost > 0 else "(nothing lost)"
        rows.append([r["variant"], "yes" if r.get("bias_correction") else "no", f"{100 * r['ptq']:.2f}%",
                     f"{100 * r['qat']:.2f}%", rec, f"{r['seconds']:.0f}"])  # fmt: skip
    return [
        f"digits-cnn, real labels ({d['test_images']} test images; one image is 0.2 points): PTQ = static "
        f"calibration on 256 training images; QAT = `prepare_qat` from the same start, {d['steps']} steps of "
        f"distillation (batch {d['batch']}, training images, no labels), `convert`, then the same packed modules "
        f"as PTQ. *bias corr.*: PTQ, and QAT's starting point, with each layer's mean output error moved into its "
        f"bias (`{d['command']}`).",
        "",
        markdown_table(["scheme", "bias corr.", "PTQ accuracy", "QAT accuracy", "PTQ loss recovered", "QAT seconds"],
                       rows),  # fmt: skip
        "",
    ]


def _qat(res: dict) -> str:
    s = res["smollm2"]
    return "\n".join([
        "## QAT: learned step sizes, distillation from FP32",
        "",
        _header(res),
        "",
        *_qat_digits(res.get("digits")),
        f"SmolLM2-135M {s['scheme']}: RTN vs QAT (LSQ steps, every block linear, embeddings/head float, "
        f"distillation from FP32 on {s['train_tokens']:,} calibration-split tokens, {s['steps']} steps of 4 x 256, "
        f"{s['seconds'] / 60:.1f} min wall on 2 threads including conversion). Perplexity on {s['tokens']} held-out "
        "tokens.",
        "",
        markdown_table(["variant", "ppl", "Δppl", "RTN loss recovered"], [
            ["fp32", f"{s['fp32']:.3f}", "-", "-"],
            [f"{s['scheme']} RTN", f"{s['rtn']:.3f}", f"{100 * (s['rtn'] / s['fp32'] - 1):+.1f}%", "0%"],
            [f"{s['scheme']} QAT", f"{s['qat']:.3f}", f"{100 * (s['qat'] / s['fp32'] - 1):+.1f}%",
             f"{100 * s['recovered']:.0f}%"],
        ]),  # fmt: skip
        "",
        f"Distillation loss (KL, nats/token): first 10 steps {s['loss_first']:.3f}, last 10 {s['loss_last']:.3f}.",
    ] + _qat_mobilenet(res.get("mobilenet")))


def _qat_mobilenet(res: dict | None) -> list[str]:
    if res is None:
        return []
    rows = []
    for r in res["rows"]:
        p, q = r["ptq"], r["qat"]
        rows.append([r["scheme"], f"{100 * p['agreement']:.1f}%", f"{p['mean_kl']:.3f}", f"{100 * q['agreement']:.1f}%",
                     f"{q['mean_kl']:.3f}", str(r["steps"]), f"{r['seconds'] / 60:.1f}"])  # fmt: skip
    conf = res["rows"][0]["ptq"]["confident"]
    return [
        "",
        f"MobileNetV2 without labels: QAT by distillation from FP32 on fresh random crops of the bundled photos "
        f"(16 per step, calib split, never the eval views), per-channel weights, static int8 activations "
        f"(percentile start), a wall-time budget per scheme. Agreement on the {conf} confident of "
        f"{res['eval_crops']} eval crops, as in the MobileNetV2 section. Command: `{res['command']}`.",
        "",
        markdown_table(["scheme", "PTQ agreement", "PTQ KL", "QAT agreement", "QAT KL", "steps", "minutes"], rows),
    ]


def _streaming(res: dict) -> str:
    """Issue 14: benchmarks/streaming.py's runs (each its own process; peak RSS is the process's VmHWM)."""
    def gb(b):
        return f"{b / 1e9:.2f} GB"

    def mib(x):
        return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"

    lines = ["## Larger than memory: streamed quantization (issue 14)", "",
             "Command: `python benchmarks/streaming.py` (sections slice, big, calibrated, identity, ray). Every run "
             "is its own process; peak RSS is that process's VmHWM (interpreter and torch included); the page "
             "cache is dropped before each run, so the checkpoint is read from disk. Synthetic checkpoints "
             "(`benchmarks/make_checkpoint.py`: random bf16 weights in the real models' shapes) are removed "
             "afterwards."]  # fmt: skip
    isas = sorted({r.get("isa", "?") for r in res.values() if isinstance(r, dict)})
    lines[-1] += (f" 2 threads. The machines differ between runs (this project's machines are AVX-512 VNNI or AVX2 "
                  f"only; here: {', '.join(isas)}): each row states the ISA lowbit's CPU kernels ran on.")  # fmt: skip
    rows = []
    for key, r in res.items():
        if not key.startswith(("slice/", "big/")) or "seconds" not in r:
            continue
        inp = r.get("input_bytes")
        rate = f"{inp / 1e9 / r['seconds']:.2f}" if inp else "-"
        peak = r.get("peak_rss_mib")
        extra = ""
        if "rss_anon_peak_mib" in r:
            extra = f" (anonymous {mib(r['rss_anon_peak_mib'])}, file pages {mib(r.get('rss_file_peak_mib', 0))})"
        rows.append([key.split("/")[1], key.split("/")[2], gb(inp) if inp else "-", gb(r.get("out_bytes") or
                     r.get("output_bytes") or 0), f"{r['seconds']:.1f}", rate, (mib(peak) if peak else "-") + extra,
                     r.get("isa", "?")])  # fmt: skip
    if rows:
        lines += ["", "Quantizing (lowbit streamed vs llama.cpp's quantizer on the same tensors as a bf16 GGUF):", "",
                  markdown_table(["checkpoint", "tool / method", "input", "output", "seconds", "input GB/s",
                                  "peak RSS", "ISA"], rows)]  # fmt: skip
        pairs = (("lowbit-rtn-w4g128", "llamacpp-Q4_0", "defaults (lowbit keeps embedding and head bf16; llama.cpp's "
                  "Q4_0 mix: embedding Q4_0, head Q6_K)"),
                 ("lowbit-rtn-w4g128-all", "llamacpp-Q4_0-pure", "every weight in 4 bits (lowbit w4g128 everywhere; "
                  "llama.cpp --pure Q4_0)"))  # fmt: skip
        pairs += tuple((m.replace("rtn", "hqq"), p, w) for m, p, w in pairs)
        for key in [k for k in res if k.startswith("slice/") and k.endswith("/lowbit-rtn-w4g128")]:
            base = key.rsplit("/", 1)[0]
            for mine, peer, what in pairs:
                r, p = res.get(f"{base}/{mine}"), res.get(f"{base}/{peer}")
                if r and p:
                    lines.append(f"\nThroughput, lowbit {mine.split('-')[1]} / llama.cpp, {what}: "
                                 f"**{(r['input_bytes'] / r['seconds']) / (p['input_bytes'] / p['seconds']):.2f}x**")  # fmt: skip
    for key, load in res.items():
        if key.startswith("big/mistral-24b/load-generate"):
            lines += ["", f"Loading the 24B-shaped result {key.split('load-generate-', 1)[1]} "
                      f"(`lowbit.load`, then 16 greedy tokens): file {gb(load['file_bytes'])}, peak RSS "
                      f"{mib(load['peak_rss_mib'])} (file + {(load['peak_rss_mib'] * 2**20 - load['file_bytes']) / 2**30:.2f} "
                      f"GiB), load {load['load_seconds']:.0f} s, {load['tokens']} tokens in {load['generate_seconds']:.1f} s "
                      f"({load.get('isa', '?')})."]  # fmt: skip
    cal = [(k, r) for k, r in res.items() if k.startswith("calibrated/")]
    if cal:
        size = cal[0][1].get("calibration", "16 x 512")
        lines += ["", f"Calibrated methods on a TinyLlama-1.1B-shaped checkpoint (bf16, 2.2 GB; {size} calibration tokens, "
                  "random ids; command: `python benchmarks/streaming.py --sections calibrated --nsamples N`):",
                  "", markdown_table(["method", "path", "seconds", "peak RSS", "ISA", "note"],
                                     [[k.split("/")[2], k.split("/")[3], f"{r['seconds']:.0f}", mib(r["peak_rss_mib"]),
                                       r.get("isa", "?"), r.get("note", "")] for k, r in cal])]  # fmt: skip
    ident = [(k, r) for k, r in res.items() if k.startswith("identity/")]
    if ident:
        lines += ["", "SmolLM2-135M (float32 checkpoint), streamed vs in memory, w4g64:", "",
                  markdown_table(["method", "identical bytes", "streamed s / peak", "in-memory s / peak"],
                                 [[k.split("/")[2], "yes" if r["identical_bytes"] else "**no**",
                                   f"{r['streamed']['seconds']:.0f} / {mib(r['streamed']['peak_rss_mib'])}",
                                   f"{r['in-memory']['seconds']:.0f} / {mib(r['in-memory']['peak_rss_mib'])}"]
                                  for k, r in ident])]  # fmt: skip
    ray = [(k, r) for k, r in res.items() if k.startswith("ray/")]
    if ray:
        lines += ["", "Ray (4-layer TinyLlama-shaped checkpoint, rtn w4g128, a local cluster on this 2-core machine: "
                  "Ray's own processes compete for the same cores, so this shows correctness and overhead, not scaling; "
                  "the Ray times start after `ray.init`, whose start-up took ~8 s more):", "",
                  markdown_table(["run", "seconds", "identical bytes"],
                                 [[k.split("/")[2], f"{r['seconds']:.1f}",
                                   "-" if "identical_bytes" not in r else ("yes" if r["identical_bytes"] else "**no**")]
                                  for k, r in ray])]  # fmt: skip
    rayc = [(k, r) for k, r in res.items() if k.startswith("ray-gptq/")]
    if rayc:
        lines += ["", "Ray with a calibrated method (same checkpoint, GPTQ w4g128, 8 x 512 calibration tokens split "
                  "across the workers, which send back each block's Hessian sums; one process with 1 thread; the "
                  "same caveat on 2 cores). Against one process:", "",
                  markdown_table(["run", "seconds", "codes that differ", "largest code step", "logits rel. diff",
                                  "KL to float: one process / this run"],
                                 [[k.split("/")[2], f"{r['seconds']:.1f}",
                                   f"{r['codes_changed']:.2e}" if "codes_changed" in r else "-",
                                   str(r.get("max_code_step", "-")),
                                   f"{r['logits_rel_diff']:.1e}" if "logits_rel_diff" in r else "-",
                                   " / ".join(f"{v:.4f}" for v in r["kl_to_float"]) if "kl_to_float" in r else "-"]
                                  for k, r in rayc])]  # fmt: skip
    return "\n".join(lines)


def _gguf_table(res: dict) -> str:
    """issue 15: SmolLM2 in llama.cpp, lowbit's exact exports vs llama.cpp's quantizer."""
    rows = res["rows"]
    cal = res["calibration"]
    domains = sorted({d for r in rows.values() for d in r.get("ppl", {})})
    seen = set(cal["domains"])
    head = ["file", "tensor types", "size"] + [f"{d}{'' if d in seen else ' (unseen)'}" for d in domains] + ["decode tok/s"]
    table = []
    for name, r in rows.items():
        if "file_bytes" not in r:
            continue  # not measured yet
        types = ", ".join(f"{k} {v}" for k, v in sorted(r.get("types", {}).items(), key=lambda kv: -kv[1]))
        dec = r.get("decode", {}).get("decode_tok_s_median")
        table.append([name, types, f"{r['file_bytes'] / 1e6:.1f} MB"] + [f"{r['ppl'][d]:.3f}" if d in r.get("ppl", {}) else "-"
                      for d in domains] + [f"{dec:.1f}" if dec else "-"])  # fmt: skip
    im = res.get("imatrix", {})
    lines = [
        "## SmolLM2-135M in llama.cpp: lowbit's exports vs llama.cpp's quantizer (issue 15)",
        "",
        f"Command: `{res.get('command', 'python benchmarks/gguf_table.py')}`. Every perplexity is computed by llama.cpp "
        "(llama-cpp-python, F32 KV cache, 2 threads) on the same token ids lowbit evaluates: the eval split of each "
        "domain, 4,096 tokens in windows of 512. lowbit's rows are lowbit's models exported with `lowbit.export` "
        "(4-bit: w4g32 written as exact Q4_0, the tied embedding/head w8g32 as exact Q8_0, the types llama.cpp's "
        "own Q4_0 picks for this model); llama.cpp's rows come from `llama-quantize` on the F32 export of the float "
        f"model. Calibration (GPTQ, AWQ) and the importance matrix: {cal['windows']} x {cal['seqlen']} tokens of "
        f"{', '.join(cal['domains'])} (imatrix: {im.get('chunks', '-')} chunks of {im.get('ctx', '-')}); the domains "
        "marked unseen were seen by neither.",
        "",
        markdown_table(head, table),
    ]
    rounds = {r.get("decode", {}).get("rounds") for r in rows.values() if r.get("decode")}
    if rounds and None not in rounds:
        lines += ["", f"Decode: every file loaded in one process and run round-robin, {max(rounds)} rounds of 64 new "
                  "tokens at batch 1 with every model in turn (llama.cpp's own counters; the median per file), so a "
                  f"slow spell of the shared machine lands on every row alike; 2 threads, ISA {res.get('isa', '-')}. "
                  "Files of the same tensor types run the same kernels: their differences are the noise."]  # fmt: skip
    elif rounds:
        lines += ["", "Decode: `benchmarks/peer_llamacpp.py` (llama.cpp's counters, batch 1, 64 tokens, median of 5), "
                  f"one file after another, ISA {res.get('isa', '-')}; one file's rate drifted from 103 to 149 tok/s "
                  "within minutes on this shared machine, more than any difference between files of the same types."]
    if any(n.endswith("+lowbit-imatrix") for n in rows):
        lines += ["", "`*+lowbit-imatrix`: llama.cpp's quantizer (`llama_model_quantize`) given the importance matrix lowbit "
                  "measures (`lowbit.export(model, \"gguf\", path, llama_quantize=TYPE, importance=importance_matrix(model, "
                  "calibration))`, CLI `lowbit export --llama-quantize TYPE`) on the same calibration windows as "
                  "`llama-imatrix`: the mean square of each layer's input columns."]  # fmt: skip
    mixed = {n: r for n, r in rows.items() if r.get("schemes")}
    for name, r in mixed.items():
        lines += ["", f"`{name}`: each decoder layer w4g32 (Q4_0) or w8g32 (Q8_0), chosen by `lowbit.mixed.allocate` "
                  f"({', '.join(f'{c} {k}' for c, k in r['schemes'].items())}) for the least predicted KL within the "
                  "bytes of the llama.cpp file named after the @; the per-layer KL was measured by "
                  "`lowbit.mixed.sensitivity` around the all-w4g32 GPTQ model on "
                  f"{r.get('sensitivity_windows', '-')} windows of the calibration domains (predicted KL "
                  f"{r['predicted_kl']} nats, all-w4g32 {r['base_kl']}). Quantize time includes the sensitivity."]
    fb = sorted({f for r in rows.values() for f in r.get("fallbacks", [])})
    if fb:
        lines += ["", "llama-quantize's fallbacks (rows not a multiple of 256): " + "; ".join(fb)]
    return "\n".join(lines)


def _onnx_table(res: dict) -> str:
    """issue 15: lowbit's ONNX exports in ONNX Runtime vs ONNX Runtime's own quantizers."""
    lines = ["## ONNX Runtime: lowbit's exports vs ONNX Runtime's quantizers (issue 15)", "",
             f"Command: `{res.get('command', 'python benchmarks/onnx_table.py')}`, onnxruntime {res.get('onnxruntime', '-')}. "
             "Every output below is computed by ONNX Runtime (CPU execution provider, 2 threads) unless the row "
             "says lowbit."]  # fmt: skip
    sm = res.get("smollm2")
    if sm:
        cal = res.get("smollm2_calibration", {"domains": [], "windows": "-", "seqlen": "-"})
        domains = sorted({d for r in sm.values() for d in r.get("ppl", {})})
        seen = set(cal["domains"])
        head = ["model", "MatMulNBits", "file"] + [f"{d}{'' if d in seen else ' (unseen)'}" for d in domains] + ["quantize s"]
        table = [[name, str(r.get("matmul_nbits", "-")), f"{r['file_bytes'] / 1e6:.1f} MB" if "file_bytes" in r else "-"]
                 + [f"{r['ppl'][d]:.3f}" if d in r.get("ppl", {}) else "-" for d in domains]
                 + [str(r.get("quantize_seconds", "-"))] for name, r in sm.items()]  # fmt: skip
        lines += ["", "### SmolLM2-135M, 4-bit groups of 64: perplexity computed by ONNX Runtime", "",
                  "The graph is `input_ids -> logits` (no KV cache); 4,096 eval tokens per domain in windows of 512. "
                  "lowbit's rows: lowbit's models exported with `lowbit.export(model, \"onnx\", path)` (MatMulNBits on "
                  "lowbit's codes, accuracy level 1). ONNX Runtime's rows: `MatMulNBitsQuantizer` (block 64, 4 bits) "
                  "on lowbit's float32 export of the float model. The tied embedding / head stays float on both "
                  f"sides. Calibrated methods (GPTQ, AWQ) see {cal['windows']} x {cal['seqlen']} tokens of "
                  f"{', '.join(cal['domains'])}; domains marked unseen were seen by no calibration.", "",
                  markdown_table(head, table)]  # fmt: skip
        lines += [f"\n{name}: {r['note']}." for name, r in sm.items() if r.get("note")]
    gv = res.get("gemv")
    if gv:
        names = list(gv["rows"][0]["ms"])
        table = [[r["shape"], r["scheme"], str(r["tokens"])] + [f"{r['ms'][n]:.3f}" for n in names] for r in gv["rows"]]
        lines += ["", f"### One layer: ONNX Runtime's MatMulNBits on lowbit's weights vs lowbit's kernel (ms, ISA {gv['isa']}, "
                  f"{gv['threads']} threads)", "",
                  "Medians of round-robin repetitions (`median_times_interleaved`, ONNX Runtime's thread spinning off): "
                  "each call finds its weights evicted from cache by the others' (as in decoding, where they come from "
                  "memory). Accuracy level 1 computes in float32 on the exact weights (what the "
                  "export writes by default); level 4 (`--accuracy-level 4`) rounds the activations to int8 per block "
                  "(not lowbit's arithmetic). lowbit's kernel keeps float activations for weight-only schemes.", "",
                  markdown_table(["N x K", "scheme", "tokens"] + names, table)]  # fmt: skip
    mb = res.get("mobilenet")
    if mb:
        table = [[r["variant"], f"{100 * r['agreement']:.1f}% of {r['confident']}", f"{100 * r['agreement_all']:.1f}%",
                  f"{r['mean_kl']:.4f}", f"{r['file_bytes'] / 1e6:.2f} MB" if r.get("file_bytes") else "-",
                  r.get("int8_convs", "-"), f"{r['latency_ms']:.2f}"] for r in mb["rows"]]  # fmt: skip
        lines += ["", f"### MobileNetV2 static W8A8 (ISA {mb['isa']}, {mb['threads']} threads)", "",
                  f"Agreement with FP32 (top-1) on the {mb['eval_crops']} eval crops where FP32 is confident, on all of "
                  f"them, and mean KL(FP32 || model). Both quantizers calibrate on the same {mb['calib_crops']} crops; "
                  "ONNX Runtime's `quantize_static` with QDQ, per-channel int8 weights, int8 activations. Latency: batch 1, "
                  "median of 100 round-robin repetitions (ONNX Runtime's thread spinning off, so that one session's idle "
                  "threads do not take the cores the next one is timed on). int8 convs: how many convolutions ONNX Runtime runs as "
                  "QLinearConv (int8 in and out) after its graph optimizations; the others run in float32 on dequantized "
                  "weights. lowbit's graph rounds a convolution's output only where lowbit's model does (before the next "
                  "layer, through the ReLU6): the projections into the residual additions stay float, where "
                  "`quantize_static` adds its own calibrated rounding of each addition.", "",
                  markdown_table(["model", "agreement (confident)", "agreement (all)", "mean KL", "file", "int8 convs",
                                  "latency ms"], table)]  # fmt: skip
    return "\n".join(lines)


def _ct_ppl(res: dict) -> str:
    """issue 15: compressed-tensors exports loaded by transformers compute lowbit's perplexity."""
    domains = list(res["rows"][0]["lowbit"])
    table = [[r["scheme"], ", ".join(f"{k} {v}" for k, v in r["formats"].items())]
             + [f"{r['lowbit'][d]:.4f} / {r['transformers'][d]:.4f}" for d in domains]
             + [f"{100 * r['max_rel_diff']:.4f}%"] for r in res["rows"]]  # fmt: skip
    return "\n".join([
        "## compressed-tensors exports in transformers (issue 15)", "",
        f"Command: `{res['command']}`, transformers {res['transformers']}. SmolLM2-135M quantized by lowbit "
        "(round-to-nearest), exported with `lowbit.export(model, \"compressed-tensors\", dir)`, loaded by "
        "`AutoModelForCausalLM.from_pretrained` on CPU in float32; perplexity lowbit / transformers, 4,096 eval "
        "tokens per domain. w4g128 shows the requantize path: groups of 128 do not divide SmolLM2's rows of 576, "
        "so those layers are requantized (to w8) with their error reported, and the perplexity moves with them. "
        "W8A8: transformers runs the int8 weights with float activations on CPU, lowbit "
        "rounds activations to int8 per token, so that row differs by the activation rounding. vLLM reads the "
        "same `quantization_config`; no GPU here to run it.", "",
        markdown_table(["scheme", "written as"] + domains + ["largest difference"], table)])  # fmt: skip


def _compress_digits(res: dict) -> str:
    """issue 16: digits-cnn compressed with quantization, pruning, low-rank corrections and distillation."""
    rows, fp = res["rows"], res["rows"][0]
    table = [[r["label"], r["choice"], f"{r['file_bytes']:,}", f"{r['file_ratio']:.2f}x", f"{r['tensor_ratio']:.2f}x",
              f"{100 * r['accuracy']:.1f}%", f"{100 * (r['accuracy'] - fp['accuracy']):+.1f}",
              f"{r['kl']:.4f}" if "kl" in r else "-", f"{r['seconds']:.1f}"] for r in rows]  # fmt: skip
    return "\n".join([
        "## Compression beyond quantization: digits-cnn (issue 16)", "",
        _header(res), "",
        "`lowbit.compress(model, target_ratio=R, ...)` per row: each layer's choice among the candidates "
        "(dense schemes w8/w4g64/w3g64/w2g64; `+50%`/`+75%`: SparseGPT-pruned; `+r2`: a rank-2 float16 "
        "correction) measured alone (KL to FP32 on 512 training images), the bytes allocated by the knapsack "
        "of the mixed-precision search; structured pruning removes half of the channels of every "
        "conv/linear chain first (the layers shrink); distillation: 800 steps from the FP32 model on training "
        "images, no labels. Calibration: 512 training images. **Accuracy on the held-out labelled test "
        f"images** ({res['test_images']}, never seen by any step), measured on the model saved and loaded back "
        "into the original class. *File*: the FP32 safetensors file vs the saved lowbit directory, every byte (manifest and "
        "headers included: ~3.7 KB here, a quarter of the smallest files); *tensors*: stored tensor bytes "
        "(what `--target-ratio` budgets). Wall time of the whole `compress` call on this machine.", "",
        markdown_table(["pipeline", "choice per layer", "file bytes", "x smaller (file)", "x smaller (tensors)",
                        "accuracy", "Δ pts", "KL", "seconds"], table),  # fmt: skip
        "",
        "Low-rank corrections are never chosen here: a rank-2 correction of a 64-row layer costs more than "
        "the bits it saves buy back. The combined row's allocation picked no unstructured pruning either at "
        "this ratio: after channel pruning, int8 and w4 weights were the cheapest way to the bytes.",
    ])


def _compress_minilm(res: dict) -> str:
    """issue 16: all-MiniLM-L6-v2 compressed; cosine to FP32 sentence embeddings on held-out text."""
    evals = res["evals"]
    mean = lambda r: sum(r["cos"].values()) / len(evals)  # noqa: E731
    table = [[r["label"], r["choice"], f"{r['file_bytes'] / 1e6:.2f}", f"{r['file_ratio']:.2f}x",
              f"{r['tensor_ratio']:.2f}x", *(f"{r['cos'][d]:.3f}" for d in evals),
              f"{mean(r):.3f}", f"{r['seconds']:.0f}"] for r in res["rows"]]  # fmt: skip
    fixed = ", ".join(f"`{k}` {v}" for k, v in res["fixed"].items())
    words = res.get("word_embedding_choice")
    chosen = "" if not words else (
        " The word embedding's scheme is the one whose quantization-alone result was closest to FP32 on the "
        "measurement sentences (calib split), cosine distance "
        + ", ".join(f"{w} {d:.4f}" for w, d in words.items()) + ".")  # fmt: skip
    ok = [r for r in res["rows"][1:] if r["file_ratio"] >= 10 and mean(r) >= 0.95]
    best = max(res["rows"][1:], key=mean)
    return "\n".join([
        "## Compression beyond quantization: MiniLM (issue 16)", "",
        _header(res), "",
        "all-MiniLM-L6-v2 through `lowbit.compress(model, target_ratio=10, ...)`: the embeddings fixed "
        f"({fixed}; rounded to nearest), every encoder "
        "linear layer choosing among the candidates by its measured cosine distance of mean-pooled embeddings "
        "(GPTQ; SparseGPT for the pruned `+50%` candidates); structured pruning removes half of every FFN's "
        "neurons first (config `intermediate_size` 1536 -> 768) and moves their mean contribution on the "
        "calibration sentences into the output layer's bias; distillation: 300 steps from FP32 on "
        "calibration sentences by embedding and token-state direction. Calibration, costs and distillation: "
        "sentences of the calib split of every domain; **cosine: mean cosine to FP32 sentence embeddings on "
        f"{res['held_out']}** (never seen by any step), measured on the saved model loaded back from its "
        f"config. File: the FP32 safetensors file vs the saved lowbit directory (model files, no tokenizer).{chosen}",
        "",
        markdown_table(["pipeline", "choice per layer", "MB", "x smaller (file)", "x smaller (tensors)",
                        *(f"cos {d}" for d in evals), "mean cos", "seconds"], table),  # fmt: skip
        "",
        (f"At >= 10x the file, {len(ok)} of {len(res['rows']) - 1} pipelines keep a mean cosine >= 0.95; the best "
         f"is {best['label']!r} ({mean(best):.3f}).") if ok else
        f"No pipeline reaches a mean cosine of 0.95 at 10x; the best is {best['label']!r} ({mean(best):.3f}).",
    ])  # fmt: skip


def _compress_mobilenet(res: dict) -> str:
    """issue 16: MobileNetV2 compressed; top-1 agreement with FP32 on confident crops."""
    table = [[r["label"], r["choice"], f"{r['file_bytes'] / 1e6:.2f}", f"{r['file_ratio']:.2f}x",
              f"{r['tensor_ratio']:.2f}x", f"{100 * r['agreement']['agreement']:.1f}%",
              f"{100 * r['agreement']['agreement_all']:.1f}%", f"{r['agreement']['mean_kl']:.3f}",
              f"{r['seconds']:.0f}"] for r in res["rows"]]  # fmt: skip
    conf = res["rows"][0]["agreement"]["confident"]
    unpruned = [r["label"] for r in res["rows"][1:] if "%" in "".join(r.get("args", {}).get("candidates", []))
                and "%" not in r["choice"]]  # fmt: skip
    note = (" In the rows " + " and ".join(f"'{u}'" for u in unpruned) + " the search chose no pruned candidate at this ratio (each costs more KL than "
            "it saves bytes); the method (SparseGPT at 0% sparsity for the dense layers, instead of GPTQ) is what "
            "differs." if unpruned else "")  # fmt: skip
    return "\n".join([
        "## Compression beyond quantization: MobileNetV2 (issue 16)", "",
        _header(res), "",
        "MobileNetV2 (ImageNet weights) through `lowbit.compress(model, target_ratio=R, ...)`: every "
        "convolution and the classifier choose among the candidates by their measured KL to FP32 (GPTQ; "
        "SparseGPT for the pruned `+50%` candidates); the depthwise convolutions, which GPTQ cannot take, are "
        "fixed at int8 (rounded to nearest, 1.8% of the weights); structured pruning first removes 25% of the "
        "channels of every expand/depthwise/project chain (the tensors shrink), then re-estimates the "
        "BatchNorm statistics on the calibration crops; distillation: 300 steps "
        "from FP32, 16 fresh random crops of the calib split per step, no labels. Calibration (64 crops) "
        f"and costs (32 crops): calib split. **Agreement: top-1 agreement with FP32 on the {conf} confident "
        f"of {res['eval_crops']} eval crops** (FP32 top probability >= 0.5), all crops and mean KL beside it. "
        "Low-rank corrections apply to linear layers only (here the classifier): no row." + note, "",
        markdown_table(["pipeline", "choice per layer", "MB", "x smaller (file)", "x smaller (tensors)",
                        "agreement (confident)", "agreement (all)", "KL", "seconds"], table),  # fmt: skip
    ])


def _block_gains(rows: list) -> str:
    """What block distillation did in each row that ran it (``qat.fit_blocks``' per-block errors)."""
    return "; ".join(f"'{r['label']}': each decoder layer's output error relative to FP32's, per token, mean "
                     f"{statistics.mean(b for b, _ in r['block_error']):.4f} before, "
                     f"{statistics.mean(a for _, a in r['block_error']):.4f} after"
                     for r in rows if r.get("block_error"))  # fmt: skip


def _compress_smollm2(res: dict) -> str:
    """issue 16: SmolLM2-135M compressed; perplexity on the eval split of every text domain."""
    fp = res["rows"][0]
    doms = list(fp["ppl"])
    rel = lambda r: sum(r["ppl"][d] / fp["ppl"][d] for d in doms) / len(doms)  # noqa: E731
    emb = res["fixed"].get("model.embed_tokens")
    emb = emb if isinstance(emb, str) else "-"  # rows measured before the embedding's width was searched
    table = [[r["label"], r.get("embedding") or emb if r["label"] != "FP32" else "-", r["choice"], f"{r['decoder_bpw']:.3f}",
              f"{32 / r['decoder_bpw']:.2f}x", f"{r['file_bytes'] / 1e6:.1f}", f"{r['file_ratio']:.2f}x",
              *(f"{r['ppl'][d]:.2f}" for d in doms), f"{rel(r):.3f}x", f"{r['seconds']:.0f}"]
             for r in res["rows"]]  # fmt: skip
    fixed = ", ".join(f"`{k}` {' or '.join(v) if isinstance(v, list) else v}" for k, v in res["fixed"].items())
    kl_rows = [r for r in res["rows"][1:] if r.get("cost", "kl") == "kl"]
    costs = next((r["embedding_kl"] for r in kl_rows if r.get("embedding_kl")), {})
    costs = ", ".join(f"{k} {v:.3f}" for k, v in costs.items())
    hess = [r for r in res["rows"] if r.get("cost") == "hessian"]
    hess_note = []
    if hess:
        h = hess[0]["args"]
        emb = h["fixed"]["model.embed_tokens"]
        blocks = _block_gains(hess)
        hess_note = [
            "", f"The rows {', '.join(repr(r['label']) for r in hess)}: the decoder table's recipe for the whole model "
            f"in one call, `lowbit.compress(model, target_ratio={h['target_ratio']:g}, method=\"{h['method']}\", "
            f"cost=\"hessian\", candidates=({', '.join(h['candidates'])}), fixed=...)`: each layer's cost predicted "
            "from Hessian traces (HAWQ-V2; measured with RTN, AWQ moving scales between layers; "
            f"{hess[0]['measure_seconds']:.0f} s, counted in these rows' seconds instead of the KL measurement), the "
            f"embedding's width searched among {' / '.join(emb)} (KL of the embedding alone: "
            + ", ".join(f"{k} {v:.3f}" for k, v in hess[0]["embedding_kl"].items()) + " nats), the allocation "
            "quantized by AWQ+GPTQ on the same calibration windows"
            + (f"; block distillation: `distill_blocks={hess[-1]['args'].get('distill_blocks')}` "
               f"(`lowbit.qat.fit_blocks` on the calibration windows, its default rates; {blocks})" if blocks else "")
            + ".",
        ]
    return "\n".join([
        "## Compression beyond quantization: SmolLM2-135M (issue 16)", "",
        _header(res), "",
        "`lowbit.compress(model, target_ratio=R, method=\"sparsegpt\", ...)` per row: the tied embedding / LM "
        f"head outside the per-layer search ({fixed}; rounded to nearest; when several, compress measures each "
        "alone and takes the one whose KL plus the decoder's least predicted KL within the bytes is smallest"
        + (f"; KL of the embedding alone: {costs} nats" if costs else "") + "), each of the 210 decoder linear "
        "layers choosing among the row's candidates by its measured KL to FP32 (8 x 256 tokens of the calib "
        "split). One measurement of "
        f"every candidate ({res['measure_seconds'] / 60:.0f} min, counted in every such row's seconds) serves all "
        f"{len(kl_rows)} of those rows (`measured=`). `+25%`/`+50%`: SparseGPT-pruned with the quantization, as in its paper; `+r16`: "
        "a rank-16 float16 correction of the quantization error (EoRA); distillation: from FP32 on 256 x 256 "
        "tokens of the calib split. Calibration: 64 x 512 tokens of the calib split. **Perplexity on 4096 "
        "held-out tokens of every domain's eval split**; bits per weight of the decoder layers count codes, "
        "scales, zero points, masks and corrections; file: the FP32 safetensors file vs the saved lowbit "
        "directory (model files).", "",
        markdown_table(["pipeline", "embedding", "choice per layer", "decoder bits/weight", "decoder x smaller",
                        "MB", "x smaller (file)", *(f"ppl {d}" for d in doms), "ppl / FP32 (mean)", "seconds"],
                       table),  # fmt: skip
        *hess_note,
        *_sparse_peers(res.get("peers") or [], res.get("lowbit_sparse") or {}, fp, doms, rel),
    ])



def _compress_smollm2_decoder(res: dict) -> str:
    """issue 16: SmolLM2-135M's decoder at <= 3.2 bits per weight, the embedding kept wider."""
    fp = res["rows"][0]
    doms = list(fp["ppl"])
    rel = lambda r: sum(r["ppl"][d] / fp["ppl"][d] for d in doms) / len(doms)  # noqa: E731
    uniform = f"{res['scheme']} x{res['layers']}"
    table = [[r["label"], "-" if r is fp else r.get("choice", uniform), f"{r['decoder_bpw']:.3f}",
              f"{32 / r['decoder_bpw']:.2f}x", f"{r['file_bytes'] / 1e6:.1f}",
              f"{r['file_ratio']:.2f}x", *(f"{r['ppl'][d]:.2f}" for d in doms), f"{rel(r):.3f}x",
              f"{r['kl']:.3f}" if "kl" in r else "-", f"{r['seconds']:.0f}"] for r in res["rows"]]  # fmt: skip
    blocks = next((r for r in res["rows"] if r.get("block_epochs")), None)
    gain = _block_gains(res["rows"])
    mixed = res.get("mixed")
    return "\n".join([
        "## SmolLM2-135M: the decoder at <= 3.2 bits per weight (issue 16)", "",
        _header(res), "",
        f"The tied embedding / LM head at int8 per channel, rounded to nearest (`{res['embedding']}`); the decoder "
        f"linear layers all {res['scheme']} (codes and a float16 scale per group of 128; SmolLM2's rows of 576 end "
        "in a half group; the one uniform scheme within 3.2 bits, w3g64 is 3.25)"
        + (f", or mixed: one of {' / '.join(mixed['candidates'])} per layer at <= {mixed['bpw']:g} bits per weight on "
           "the decoder, allocated from Hessian-predicted costs (`lowbit.mixed.sensitivity(..., cost=\"hessian\")` "
           "on 8 x 256 calib-split tokens, then `allocate(target_bpw=...)`)" if mixed else "")
        + ". Quantized by RTN or AWQ+GPTQ (calibration: 64 x 512 tokens of the calib split), "
        + (f"then distilled block by block from FP32 (`lowbit.prepare_qat` + `lowbit.qat.fit_blocks`: each "
           "decoder layer's steps (codes held), weights and norms trained to reproduce the FP32 layer's output, "
           "token by token, from what the distilled layers before it give, "
           f"{blocks['block_epochs']} passes over the calibration windows, lr {blocks['lr']:g}, step_lr {blocks['step_lr']:g}; "
           f"{gain}). " if blocks else "")
        + "Perplexity on 4096 held-out tokens of every domain's eval split; KL: to FP32 on 8 x 256 calib-split "
        "tokens; seconds: quantization (+ allocation, + distillation) on 2 threads.", "",
        markdown_table(["pipeline", "decoder layers", "decoder bits/weight", "decoder x smaller", "MB",
                        "x smaller (file)", *(f"ppl {d}" for d in doms), "ppl / FP32 (mean)", "KL", "seconds"],
                       table),  # fmt: skip
    ])


def _sparse_peers(peers: list, ours: dict, fp: dict, doms: list, rel) -> list[str]:
    """llm-compressor's 2:4 recipes (``benchmarks/peer_sparse.py``) beside lowbit's own 2:4 runs on the
    same calibration windows (``benchmarks/compress_table.py``)."""
    if not peers:
        return []
    table = [["llm-compressor", f"{r['label']} ({r['recipe']})", f"{100 * r['decoder_sparsity']:.1f}%",
              f"{r['groups_of_4_over_2']:,}",
              f"{r['saved_format']['quantization'] or 'float'} / {r['saved_format']['sparsity'] or 'dense'}",
              f"{r['decoder_bpw']:.3f}", *(f"{r['ppl'][d]:.2f}" for d in doms), f"{rel(r):.3f}x",
              f"{r['seconds']:.0f}"] for r in peers]  # fmt: skip
    mine = {k: v for k, v in ours.items() if k.startswith("2:4-") or k == "w4g64-gptq"}
    for label, r in sorted(mine.items(), key=lambda kv: kv[0] != "w4g64-gptq"):
        nm = r["options"].get("nm")
        table.append(["lowbit", f"{label} (`quantize(..., method=\"{r['method']}\"" + (f", nm=\"{nm}\"" if nm else "")
                      + f")`, {r['scheme']})", "50% (2:4)" if nm == "2:4" else "0%", "0" if nm else "-",
                      "lowbit (bitmask + kept codes)"
                      if nm else "lowbit", f"{r['decoder_bits_per_weight']:.3f}", *(f"{r['ppl'][d]:.2f}" for d in doms),
                      f"{rel(r):.3f}x", f"{r['seconds']:.0f}"])  # fmt: skip
    p = peers[0]
    return [
        "", f"Peer: llm-compressor {p['version']} ({p['env']}, {p['threads']} threads), "
        "`/work/peers/llmc/bin/python benchmarks/peer_sparse.py` (`make peers-llmc`), beside lowbit's "
        "`python benchmarks/compress_table.py --only 2:4-sparsegpt-w4g64 2:4-wanda-w4g64` (and its dense w4g64 GPTQ "
        "row). Both prune and quantize the decoder's 210 linear layers only (embedding in float32), calibrated on "
        f"the same windows ({p['calib']}). llm-compressor's weights are 4-bit symmetric in groups of 64 (it refuses "
        "group 128 on SmolLM2's 576 columns), lowbit's w4g64 has a zero point per group. Bits per weight: "
        "llm-compressor's as it saves the model (`save_pretrained(save_compressed=True)`, compressed-tensors; every "
        "tensor stored for a decoder layer), lowbit's as `size_of` counts them (codes, scales, zero points, masks); "
        "perplexity: the same held-out tokens (llm-compressor's effective weights in a float32 model). "
        "seconds: `oneshot` / `quantize` only. *Groups of 4 keeping > 2*: where the result is no longer 2:4 "
        "(llm-compressor's GPTQ after SparseGPT updates pruned weights; lowbit keeps the mask, by construction).", "",
        markdown_table(["tool", "recipe", "decoder zeros", "groups of 4 keeping > 2", "stored as", "decoder bits/weight",
                        *(f"ppl {d}" for d in doms), "ppl / FP32 (mean)", "seconds"], table),  # fmt: skip
    ]


def _sparse_speed(res: dict) -> str:
    """issue 16: a 2:4-pruned w4g64 layer vs the dense one, as lowbit runs them."""
    dense = {tuple(r["shape"]): r for r in res["rows"] if r["variant"] == "w4g64"}
    table = [["x".join(map(str, r["shape"])), r["variant"], f"{r['sparsity']:.0%}", f"{r['stored_bytes'] / 1e6:.2f}",
              f"{r['seconds'] * 1e3:.3f}", f"{dense[tuple(r['shape'])]['seconds'] / r['seconds']:.2f}x",
              f"{dense[tuple(r['shape'])]['stored_bytes'] / r['stored_bytes']:.2f}x"] for r in res["rows"]]  # fmt: skip
    return "\n".join([
        "## 2:4 sparse + int4 vs dense int4, layer speed (issue 16)", "",
        _header(res), "",
        "One linear layer (M x N x K), w4g64 rounded to nearest, dense vs 2:4-pruned (magnitude), as lowbit "
        f"runs them: median of {res['reps']} calls each, interleaved, weights cold (rotating copies). A pruned layer "
        "stores its bitmask and only the kept codes, and runs the dense codes (removed weights as zeros) on the "
        "same integer kernel: its speed is the dense layer's, and no sparse CPU kernel is built. The bytes "
        "column bounds what one could win: a GEMV that read only the stored bytes would move that much less "
        "memory, before the cost of expanding the mask.", "",
        markdown_table(["M x N x K", "weight", "sparsity", "stored MB", "ms", "speed vs dense", "bytes vs dense"],
                       table),  # fmt: skip
    ])


def _hessian_memory(res: dict) -> str:
    rows = [[r["graph"], f"{r['sequences']} x {r['seqlen']}", ", ".join(r["candidates"]), str(r["draws"]),
             f"{r['seconds']:.0f}", f"{r['peak_rss_mb'] / 1024:.2f}", f"{r['rss_before_mb'] / 1024:.2f}"]
            for r in res["rows"]]  # fmt: skip
    return "\n".join([
        "## Memory of the Hessian-trace cost",
        "",
        _header(res),
        "",
        "`lowbit.mixed.sensitivity(smollm2, candidates, batches, cost=\"hessian\")` on one batch of token "
        "windows, each in a fresh process: peak RSS of that process (the model's load included; 'before' is "
        "the peak after loading). 'sequence': one backward graph per sequence, as lowbit runs it; 'batch': one "
        "graph for the whole batch (the code path before, restored by patching the split out), whose "
        "activations and logits over the 49,152-token vocabulary for every position are alive at once.",
        "",
        markdown_table(["backward graph per", "tokens", "candidates", "draws", "seconds", "peak RSS GB",
                        "after loading GB"], rows),  # fmt: skip
    ])


def _gpu(res: dict | None) -> str:
    head = ["## GPU kernels (Triton) vs torch bf16", ""]
    if res is None:
        return "\n".join(head + [
            "Not measured yet: no run of `PYTHONPATH=src python benchmarks/gpu.py` on a CUDA GPU has been recorded "
            "(the machines this project is built on have none). The kernels' results are checked against the "
            "reference on every CI run through Triton's interpreter (tests/test_triton.py); their speed is unknown "
            "until that script runs on a GPU and writes benchmarks/results/gpu.json."])  # fmt: skip
    rows = []
    base = {(tuple(r["shape"]), r["tokens"]): r["seconds"] for r in res.get("layers", []) if r["variant"] == "torch bf16 F.linear"}
    for r in res.get("layers", []):
        key = (tuple(r["shape"]), r["tokens"])
        if "seconds" not in r:
            rows.append(["x".join(map(str, r["shape"])), str(r["tokens"]), r["variant"], "-", "-", "-",
                         "unavailable: " + r["unavailable"]])  # fmt: skip
            continue
        mb = f"{r['weight_bytes'] / 2**20:.1f}" if r.get("weight_bytes") else "-"
        err = f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else ""
        rows.append(["x".join(map(str, r["shape"])), str(r["tokens"]), r["variant"], f"{r['seconds'] * 1e3:.3f}",
                     f"{base[key] / r['seconds']:.2f}x", mb, err])  # fmt: skip
    dec = [[r["model"], r["variant"], f"{r['tokens_per_second']:.1f}", ", ".join(r.get("kernels", []))]
           for r in res.get("decode", [])]  # fmt: skip
    return "\n".join(head + [
        f"Measured {res['date']} on {res.get('gpu', '?')} (compute capability "
        f"{'.'.join(map(str, res.get('capability', [])))}), torch {res['torch']}, triton {res['triton']}.  ",
        f"Command: `{res['command']}`",
        "",
        "Median time of one `y = x @ W^T` (x bf16) by `triton.testing.do_bench` (L2 emptied before each "
        "repetition); speed vs torch's bf16 `F.linear` on the same weight in the same run. 'rel. error': the "
        "kernel's largest deviation from lowbit's reference kernel on the same GPU, over its largest output.",
        "",
        markdown_table(["N x K", "tokens", "variant", "ms", "speed vs bf16", "weight MiB", "rel. error"], rows),
        "",
        "Greedy decode, batch 1, transformers' `generate` with its KV cache, 16-token prompt, random weights "
        "in the models' shapes:",
        "",
        markdown_table(["model", "variant", "tokens/s", "kernels"], dec),
    ])  # fmt: skip


def write_benchmarks(results: Path, out: Path) -> None:
    parts = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/run_all.py` (`make bench`) from benchmarks/results/*.json. Every figure "
        "below was produced by the command shown with its section, on the machine and versions stated. "
        "Speed figures are medians of repetitions measured side by side in one process; compare ratios, "
        "not absolute times, across machines.",
    ]
    for name, render in (("kernels", _kernels), ("paths", _paths), ("smollm2", _smollm2), ("decode", _decode), ("decode_1b", _decode_1b), ("kv_cache", _kv_cache), ("digits", _digits),
                         ("algorithms", _algorithms), ("w8a8", _w8a8), ("sweeps", _sweeps),
                         ("mobilenet", _mobilenet), ("mixed", _mixed), ("qat", _qat),
                         ("sym_range", _sym_range), ("domains", _domains),
                         ("domains_minilm", _domains_minilm), ("shrink_intensity", _shrink_intensity),
                         ("streaming", _streaming),
                         ("gguf_table", _gguf_table), ("onnx_table", _onnx_table), ("ct_ppl", _ct_ppl),
                         ("compress_digits", _compress_digits), ("compress_minilm", _compress_minilm),
                         ("compress_mobilenet", _compress_mobilenet), ("compress_smollm2", _compress_smollm2),
                         ("compress_smollm2_decoder", _compress_smollm2_decoder), ("sparse_speed", _sparse_speed),
                         ("hessian_memory", _hessian_memory)):  # fmt: skip
        res = _load(results, name)
        if res is not None and not res.get("partial"):  # an interrupted run's rows wait for the rest
            if name == "domains":
                res["peers"] = _load(results, "peer_domains")
                res["device_check"] = _load(results, "peer_domains_device_check")
                res["machine_check"] = _load(results, "domains_machine_check")
            if name == "compress_smollm2":
                res["peers"] = _load(results, "peer_sparse_smollm2")
                res["lowbit_sparse"] = _load(results, "sparse_smollm2")
            if name == "algorithms":  # peer rows come from their own script's file, read at render time
                res["peers"] = _load(results, "peer_algorithms")
            if name == "mobilenet":
                res["speed_run"] = _load(results, "mobilenet_speed")
            if name == "mixed":
                res["base"] = _load(results, "mixed_base")
                res["hessian"] = _load(results, "mixed_hessian")
            if name == "qat":
                res["mobilenet"] = _load(results, "qat_mobilenet")
                res["digits"] = _load(results, "qat_digits")
            parts += ["", render(res)]
    gpu = _load(results, "gpu")
    parts += ["", _gpu(None if gpu is None or gpu.get("smoke") else gpu)]
    out.write_text("\n".join(parts) + "\n")
