"""Render benchmarks/results/*.json (written by run_all.py) as BENCHMARKS.md."""

from __future__ import annotations

import json
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
        f"Measured {res['date']} on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
        f"transformers {v.get('transformers', '-')}{', ' + peers if peers else ''}{quick}.  \n"
        f"Command: `{res['command']}`"
    )


def _kernels(res: dict) -> str:
    base = {tuple(r["shape"]): r["seconds"] for r in res["rows"] if r["variant"] == "torch fp32"}
    rows = []
    for r in res["rows"]:
        mb = f"{r['weight_bytes'] / 2**20:.1f}" if r["weight_bytes"] > 0 else "-"
        rows.append([r["label"], r["variant"], f"{r['seconds'] * 1e3:.3f}", f"{base[tuple(r['shape'])] / r['seconds']:.2f}x",
                     mb, str(r["copies"])])  # fmt: skip
    return "\n".join([
        "## Kernels: quantized linear layers vs FP32",
        "",
        _header(res),
        "",
        "Median time of one `y = x @ W^T` (x float32). Batch-1 rows rotate through `copies` distinct "
        "weights (>= 160 MiB per variant) so no variant runs from the 32 MiB L3 cache. lowbit's kernel "
        "runs the packed codes as stored (int16 activations, VNNI); peers as noted in benchmarks/peers.py "
        "(several want bf16 activations and cast the input themselves).",
        "",
        markdown_table(["shape", "variant", "ms", "speed vs fp32", "weight MiB", "copies"], rows),
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
    fp = next(r for r in res["rows"] if r["variant"] == "lowbit fp32")
    def share(r):
        return f"{100 * r['quant_layer_share']:.0f}%" if r.get("quant_layer_share") is not None else "-"

    rows = [[r["variant"], f"{r['tok_s']:.1f}", f"{r['tok_s'] / fp['tok_s']:.2f}x", f"{r['model_bytes'] / 1e6:.1f}", share(r)]
            for r in res["rows"]]  # fmt: skip
    peer = res.get("llama_cpp")
    notes = []
    if peer:
        rows.append([f"llama.cpp ({peer['version']}, {peer['model']})", f"{peer['decode_tok_s_median']:.1f}",
                     f"{peer['decode_tok_s_median'] / fp['tok_s']:.2f}x", "-", "-"])  # fmt: skip
        best = max(res["rows"], key=lambda r: r["tok_s"])
        notes.append(
            f"lowbit's fastest variant ({best['variant']}) decodes at {best['tok_s'] / peer['decode_tok_s_median']:.2f}x "
            "llama.cpp's speed. The last column (measured with forward hooks in a separate run) is the share of "
            "a decode step spent in lowbit's quantized layers, kernel and call overhead included: the rest is "
            "the transformers eager forward (norms, rotary embeddings, attention, cache updates, Python)."
        )
    return "\n".join([
        "## SmolLM2-135M: batch-1 decode speed",
        "",
        _header(res),
        "",
        f"Greedy decoding of {res['new_tokens']} tokens after a short prompt, KV cache on, tokens/s of the "
        "decode steps (prompt excluded), median of repetitions; llama.cpp through llama-cpp-python with "
        "its own counters (benchmarks/peer_llamacpp.py), run before and after lowbit's variants, median "
        "over both runs" + (f" (spread {min(peer['decode_tok_s_all']):.1f}-{max(peer['decode_tok_s_all']):.1f} tok/s)" if peer else "") + ".",
        "",
        markdown_table(["variant", "decode tok/s", "vs fp32", "model MB", "time in quantized layers"], rows),
        "",
        *notes,
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


def write_benchmarks(results: Path, out: Path) -> None:
    parts = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/run_all.py` (`make bench`) from benchmarks/results/*.json. Every figure "
        "below was produced by the command shown with its section, on the machine and versions stated. "
        "Speed figures are medians of repetitions measured side by side in one process; compare ratios, "
        "not absolute times, across machines.",
    ]
    for name, render in (("kernels", _kernels), ("smollm2", _smollm2), ("decode", _decode), ("digits", _digits)):
        res = _load(results, name)
        if res is not None:
            parts += ["", render(res)]
    out.write_text("\n".join(parts) + "\n")
