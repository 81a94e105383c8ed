"""Compression to 10-20x (issue 16): per model, quantization alone, each technique added alone, and
the combination, through ``lowbit.compress``; sizes as files on disk (FP32 safetensors file vs the
saved lowbit directory, every file counted), accuracy on held-out data, wall time of each pipeline.

    python benchmarks/compress_models.py --models digits

Results go to benchmarks/results/compress_<model>.json; ``report.py`` renders them into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit.files import write_text_atomic

RESULTS = Path(__file__).parent / "results"
DENSE = ("w8", "w4g64", "w3g64", "w2g64")
PRUNED = ("w4g64+50%", "w3g64+50%", "w4g64+75%", "w3g64+75%")
CORRECTED = ("w2g64+r2", "w3g64+r2")

# digits-cnn: label -> compress() arguments (every row: the SparseGPT/GPTQ family, mixed calibration)
DIGITS_ROWS: dict[str, dict] = {
    "quantization alone": {"target_ratio": 13.5, "candidates": DENSE},
    "+ unstructured pruning": {"target_ratio": 15, "candidates": DENSE + PRUNED},
    "+ low-rank corrections": {"target_ratio": 13.5, "candidates": DENSE + CORRECTED},
    "+ structured pruning (50% channels)": {"target_ratio": 20, "candidates": DENSE, "channels": 0.5},
    "+ distillation": {"target_ratio": 13.5, "candidates": DENSE, "distill_steps": 800},
    "combined: channels + pruning + distillation": {"target_ratio": 20, "candidates": DENSE + PRUNED,
                                                    "channels": 0.5, "distill_steps": 800},
}


def _machine() -> dict:
    from lowbit.evaluate.kernel_bench import machine_info

    return machine_info()


def _file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _fp32_file_bytes(model) -> int:
    """The model saved as one FP32 safetensors file (tied tensors once, as transformers saves them)."""
    import copy

    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as d:
        save_model(copy.deepcopy(model).float(), f"{d}/model.safetensors")
        return _file_bytes(Path(d))


def _args(kw: dict) -> dict:
    return json.loads(json.dumps(kw))  # tuples as lists, at any depth: as a results file holds them


class _Rows(list):
    """A model's rows, written to results/compress_<name>.json (marked partial) after each one, so
    that an interrupted run resumes: a row an earlier partial run measured with the same arguments
    is reused."""

    def __init__(self, name: str, first: dict) -> None:
        super().__init__([first])
        self.path = RESULTS / f"compress_{name}.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        partial = bool(old.get("partial"))
        self.earlier = {r["label"]: r for r in old.get("rows", [])[1:]} if partial else {}
        self.extra = old.get("extra", {}) if partial else {}

    def reuse(self, label: str, kw: dict) -> bool:
        r = self.earlier.get(label)
        if r is None or r.get("args") != _args(kw):
            return False
        self.append({**r, "resumed": True})
        print(label, "(measured by an earlier, interrupted run)", flush=True)
        return True

    def add(self, row: dict) -> None:
        self.append(row)
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"rows": list(self), "partial": True, "extra": self.extra}, indent=1)
                          + "\n")  # fmt: skip


def digits() -> dict:
    import lowbit
    from lowbit.compress import compress
    from lowbit.models.zoo import DigitsCNN, digits_data, load_model

    zoo, data = load_model("digits-cnn"), digits_data()
    x = data["x_train"]  # calibration, measurement and distillation: training images only
    cal = [x[i : i + 64] for i in range(0, 512, 64)]
    meas = [x[i : i + 64] for i in range(512, 1024, 64)]
    distill = [x[i : i + 64] for i in range(0, 1280, 64)]

    def acc(m) -> float:
        with torch.no_grad():
            return float((m(data["x_test"]).argmax(-1) == data["y_test"]).float().mean())

    fp_file = _fp32_file_bytes(zoo.model)
    rows = _Rows("digits", {"label": "FP32", "file_bytes": fp_file, "file_ratio": 1.0, "tensor_ratio": 1.0,
                            "accuracy": acc(zoo.model), "seconds": 0.0, "choice": "-"})  # fmt: skip
    for label, kw in DIGITS_ROWS.items():
        if rows.reuse(label, kw):
            continue
        t = time.perf_counter()
        r = compress(zoo.model, batches=meas, calibration=cal, lr=1e-3, distill_data=distill, **kw)
        seconds = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            out = lowbit.save(r.model, Path(d) / "m")
            size = _file_bytes(out)
            back = lowbit.load(out, model=DigitsCNN())  # what a user reloads is what was measured
            reloaded = acc(back)
        counts = ", ".join(f"{c} x{k}" for c, k in sorted(r.allocation.counts().items()))
        rows.add({"label": label, "args": _args(kw),
                  "file_bytes": size, "file_ratio": fp_file / size, "tensor_ratio": r.ratio,
                  "accuracy": acc(r.model), "reloaded_accuracy": reloaded, "kl": r.kl,
                  "kl_before_distill": r.kl_before_distill, "seconds": seconds, "stages": r.seconds,
                  "method": r.method, "choice": counts})  # fmt: skip
        print(label, f"{fp_file / size:.2f}x file, {r.ratio:.2f}x tensors, acc {rows[-1]['accuracy']:.3f}, "
              f"{seconds:.1f}s", flush=True)  # fmt: skip
    return {"rows": list(rows), "test_images": len(data["y_test"])}


# SmolLM2-135M, whole model: the tied embedding / LM head (a fifth of the weights) rounded to
# nearest, its width searched with the decoder's choices (compress measures each alone; the least
# total KL within the bytes wins); the decoder searched per layer. One measurement of every
# candidate (SparseGPT; dense candidates with nothing removed) serves all rows: each row allocates
# among its own subset. The budget is on tensor bytes, a saved file adds ~0.3%: aim a little above 10x.
SMOLLM2_EMBEDDING = ("w8", "w4g64", "w3g64")
SMOLLM2_FIXED = {"model.embed_tokens": SMOLLM2_EMBEDDING, "lm_head": SMOLLM2_EMBEDDING}
SMOLLM2_TARGET = 10.05
SMOLLM2_DENSE = ("w4g64", "w3g64", "w2g64")
SMOLLM2_ALL = SMOLLM2_DENSE + ("w4g64+25%", "w4g64+50%", "w2g64+r16", "w3g64+r16")
SMOLLM2_ROWS: dict[str, dict] = {
    "quantization alone": {"target_ratio": SMOLLM2_TARGET, "candidates": SMOLLM2_DENSE},
    "+ unstructured pruning": {"target_ratio": SMOLLM2_TARGET, "candidates": SMOLLM2_DENSE + ("w4g64+25%", "w4g64+50%")},
    "+ low-rank corrections": {"target_ratio": SMOLLM2_TARGET, "candidates": SMOLLM2_DENSE + ("w2g64+r16", "w3g64+r16")},
    "all choices": {"target_ratio": SMOLLM2_TARGET, "candidates": SMOLLM2_ALL},
    "all choices + distillation": {"target_ratio": SMOLLM2_TARGET, "candidates": SMOLLM2_ALL, "distill_steps": 100},
}
# The recipe of the decoder table below, for the whole model in one call: costs predicted from
# Hessian traces (measured with RTN, minutes instead of hours), group-128 candidates, AWQ+GPTQ
# quantizing the allocation, then block-wise distillation (distill_blocks) on the calibration
# windows; the embedding's width is searched as above, among group-64 and group-128 choices.
SMOLLM2_HESSIAN = ("w4g128", "w3g128", "w2g64")
SMOLLM2_HESSIAN_FIXED = {k: ("w4g64", "w4g128", "w3g64", "w3g128") for k in SMOLLM2_FIXED}
_HESSIAN_ROW = {"target_ratio": SMOLLM2_TARGET, "candidates": SMOLLM2_HESSIAN, "method": "awq+gptq",
                "cost": "hessian", "fixed": SMOLLM2_HESSIAN_FIXED}
SMOLLM2_ROWS["AWQ+GPTQ, Hessian-allocated"] = _HESSIAN_ROW
SMOLLM2_ROWS["AWQ+GPTQ, Hessian-allocated + block distillation"] = {**_HESSIAN_ROW, "distill_blocks": 2}


def smollm2() -> dict:
    import lowbit
    from lowbit.compress import compress
    from lowbit.evaluate.domains import calibration_batches, domain_perplexities
    from lowbit.mixed import Sensitivity, searchable_layers, sensitivity
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    tok = zoo.tokenizer
    # calibration, cost measurement and distillation: the calib splits only (different seeds);
    # perplexity: the eval split of every domain
    cal = calibration_batches(tok, nsamples=64, seqlen=512, seed=0)
    meas = calibration_batches(tok, nsamples=8, seqlen=256, seed=1)
    distill = calibration_batches(tok, nsamples=256, seqlen=256, seed=2, batch_size=2)

    def ppl(m) -> dict:
        return {d: r.ppl for d, r in domain_perplexities(m, tok, max_tokens=4096).items()}

    fp_file = _fp32_file_bytes(zoo.model)
    decoder = [n for n, m in zoo.model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    dec_params = sum(zoo.model.get_submodule(n).weight.numel() for n in decoder)
    rows = _Rows("smollm2", {"label": "FP32", "file_bytes": fp_file, "file_ratio": 1.0, "tensor_ratio": 1.0,
                             "ppl": ppl(zoo.model), "decoder_bpw": 32.0, "seconds": 0.0, "choice": "-"})  # fmt: skip
    # the shared measurement (the slow part) is kept beside the results, so rows can be re-run
    cache = RESULTS / "compress_smollm2_sensitivity.json"
    layers = [n for n in searchable_layers(zoo.model) if n not in SMOLLM2_FIXED]
    if cache.exists() and (old := json.loads(cache.read_text()))["candidates"] == list(SMOLLM2_ALL):
        table, measure_seconds = Sensitivity.from_dict(old["table"]), old["seconds"]
    else:
        t = time.perf_counter()
        table = sensitivity(zoo.model, SMOLLM2_ALL, meas, calibration=cal, method="sparsegpt", layers=layers,
                            sparsity=0.0)  # fmt: skip
        measure_seconds = time.perf_counter() - t
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, json.dumps({"candidates": list(SMOLLM2_ALL), "seconds": measure_seconds,
                                             "table": table.to_dict()}) + "\n")  # fmt: skip
    print(f"measured {len(SMOLLM2_ALL)} candidates x {len(layers)} layers in {measure_seconds:.0f}s", flush=True)
    predicted: dict[tuple, tuple] = {}  # Hessian-predicted tables, one per candidate set (minutes each)
    for label, kw in SMOLLM2_ROWS.items():
        if rows.reuse(label, kw):
            continue
        spec, kw = kw, dict(kw)
        measured, seconds_before = table, measure_seconds
        if kw.get("cost") == "hessian":
            key = tuple(kw["candidates"])
            if key not in predicted:
                t = time.perf_counter()
                predicted[key] = (sensitivity(zoo.model, key, meas, layers=layers, cost="hessian"),
                                  time.perf_counter() - t)  # fmt: skip
            measured, seconds_before = predicted[key]
        # steps distil on their own 256 x 256 tokens; blocks on the calibration windows (compress's default)
        t = time.perf_counter()
        r = compress(zoo.model, batches=meas, calibration=cal, fixed=kw.pop("fixed", SMOLLM2_FIXED),
                     distill_data=distill if kw.get("distill_steps") else None, lr=1e-5, step_lr=1e-4,
                     method=kw.pop("method", "sparsegpt"), measured=measured, **kw)  # fmt: skip
        seconds = time.perf_counter() - t
        dec_bytes = sum(r.model.get_submodule(n).nbytes for n in decoder)
        with tempfile.TemporaryDirectory() as d:
            size = _file_bytes(lowbit.save(r.model, Path(d) / "m"))  # the model only: no tokenizer files
        counts = ", ".join(f"{c} x{k}" for c, k in sorted(r.allocation.counts().items()))
        rows.add({"label": label, "args": _args(spec),
                  "file_bytes": size, "file_ratio": fp_file / size, "tensor_ratio": r.ratio,
                  "decoder_bpw": 8 * dec_bytes / dec_params, "ppl": ppl(r.model), "kl": r.kl,
                  "kl_before_distill": r.kl_before_distill,
                  "predicted_kl": r.allocation.loss + r.fixed_costs.get(r.fixed_choice, 0.0),
                  "embedding": r.fixed_choice, "embedding_kl": r.fixed_costs,
                  "seconds": seconds + seconds_before, "measure_seconds": seconds_before, "stages": r.seconds,
                  "method": r.method, "cost": r.sensitivity.info.get("cost", "kl"), "block_error": r.block_errors,
                  "choice": counts})  # fmt: skip
        print(label, json.dumps({k: rows[-1][k] for k in ("file_ratio", "decoder_bpw", "ppl", "embedding", "seconds",
                                                           "choice")}),
              flush=True)  # fmt: skip
    return {"rows": list(rows), "fixed": _args(SMOLLM2_FIXED), "measure_seconds": measure_seconds}


# SmolLM2-135M, the decoder at <= 3.2 bits per weight (the first configuration): the tied
# embedding / LM head kept at 8 bits (rounded to nearest), the decoder linear layers either all
# w3g128 (3.14 bits per weight on SmolLM2's rows of 576 and 1536: codes and a float16 scale per
# group; the one uniform scheme within 3.2 bpw, w3g64 is 3.25) or mixed: w4g128 / w3g128 / w2g64 per
# layer at a mean of <= 3.2 bpw, allocated from Hessian-predicted costs (mixed.sensitivity
# cost="hessian", on the calib split's measurement batches); quantized by RTN or AWQ+GPTQ, then
# distilled from FP32 block by block (qat.fit_blocks: each decoder layer's code steps, weights and
# norms trained to reproduce the FP32 layer's output, token by token).
SMOLLM2_DECODER_SCHEME = "w3g128"
SMOLLM2_DECODER_MIXED = ("w4g128", "w3g128", "w2g64")
SMOLLM2_DECODER_BPW = 3.2
# block distillation (qat.fit_blocks, its defaults) on the GPTQ calibration windows; its rates were
# chosen on the calib split's KL (pilots of 2 epochs: lr 2e-5 / step_lr 2e-3 KL 0.460, 1e-4 / 1e-2
# 0.443, from 0.515), never on the eval splits
SMOLLM2_DECODER_EMBEDDING = "w8"
SMOLLM2_DECODER_ROWS: dict[str, dict] = {
    "RTN": {"method": "rtn"},
    "AWQ+GPTQ (quantization alone)": {"method": "awq+gptq"},
    "AWQ+GPTQ + block distillation": {"method": "awq+gptq", "block_epochs": 2},
    "mixed w4g128/w3g128/w2g64 + AWQ+GPTQ": {"method": "awq+gptq", "mixed": True},
    "mixed + AWQ+GPTQ + block distillation": {"method": "awq+gptq", "mixed": True, "block_epochs": 2},
}


def smollm2_decoder() -> dict:
    import copy

    import lowbit
    from lowbit import qat
    from lowbit.evaluate.domains import calibration_batches, domain_perplexities
    from lowbit.mixed import allocate, output_kl, sensitivity
    from lowbit.models.zoo import load_model
    from lowbit.recipe import Recipe

    zoo = load_model("smollm2-135m")
    tok, fp = zoo.tokenizer, zoo.model
    cal = calibration_batches(tok, nsamples=64, seqlen=512, seed=0)
    meas = calibration_batches(tok, nsamples=8, seqlen=256, seed=1)

    def ppl(m) -> dict:
        return {d: r.ppl for d, r in domain_perplexities(m, tok, max_tokens=4096).items()}

    fp_file = _fp32_file_bytes(fp)
    decoder = [n for n, m in fp.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    dec_params = sum(fp.get_submodule(n).weight.numel() for n in decoder)
    rows = _Rows("smollm2_decoder", {"label": "FP32", "file_bytes": fp_file, "file_ratio": 1.0, "ppl": ppl(fp),
                                     "decoder_bpw": 32.0, "seconds": 0.0})  # fmt: skip
    uniform = Recipe(default=None).add(r"re:model\.layers\..*", SMOLLM2_DECODER_SCHEME)
    mixed = None  # (allocation, seconds), measured once

    def mixed_allocation():
        nonlocal mixed
        if mixed is None:
            t = time.perf_counter()
            sens = sensitivity(fp, SMOLLM2_DECODER_MIXED, meas, layers=decoder, cost="hessian")
            mixed = (allocate(sens, target_bpw=SMOLLM2_DECODER_BPW), time.perf_counter() - t)
        return mixed

    quantized: dict[tuple, tuple[torch.nn.Module, float]] = {}  # (method, mixed) -> (model, seconds)
    for label, kw in SMOLLM2_DECODER_ROWS.items():
        if rows.reuse(label, kw):
            continue
        method, epochs, mix = kw["method"], kw.get("block_epochs", 0), kw.get("mixed", False)
        row = {"label": label, "args": _args(kw), "method": method}
        if (method, mix) not in quantized:
            recipe, extra = uniform, 0.0
            if mix:
                alloc, extra = mixed_allocation()
                recipe = alloc.recipe()
            t = time.perf_counter()
            m = copy.deepcopy(fp).eval()
            emb = Recipe(default=None)
            emb.add("model.embed_tokens", SMOLLM2_DECODER_EMBEDDING)
            emb.add("lm_head", SMOLLM2_DECODER_EMBEDDING)  # tied: one tensor
            lowbit.quantize(m, emb)
            lowbit.quantize(m, recipe, method=method, calibration=None if method == "rtn" else cal)
            quantized[method, mix] = (m, time.perf_counter() - t + extra)
        m, seconds = quantized[method, mix]
        if mix:
            row["choice"] = ", ".join(f"{c} x{k}" for c, k in sorted(mixed_allocation()[0].counts().items()))
        if epochs:
            t = time.perf_counter()
            m = copy.deepcopy(m)
            qat.prepare_qat(m)  # every decoder layer restarts from its post-training codes and steps
            errors = qat.fit_blocks(m, fp, cal, epochs=epochs)
            qat.convert(m)
            seconds += time.perf_counter() - t
            rates = inspect.signature(qat.fit_blocks).parameters  # its defaults, recorded with the row
            row.update({"block_epochs": epochs, "lr": rates["lr"].default, "step_lr": rates["step_lr"].default,
                        "block_error": errors})  # fmt: skip
        dec_bytes = sum(m.get_submodule(n).nbytes for n in decoder)
        with tempfile.TemporaryDirectory() as d:
            size = _file_bytes(lowbit.save(m, Path(d) / "m"))
        rows.add({**row, "file_bytes": size, "file_ratio": fp_file / size, "decoder_bpw": 8 * dec_bytes / dec_params,
                  "ppl": ppl(m), "kl": output_kl(fp, m, meas), "seconds": seconds})  # fmt: skip
        print(label, json.dumps({k: rows[-1][k] for k in ("file_ratio", "decoder_bpw", "ppl", "kl", "seconds")}),
              flush=True)  # fmt: skip
    return {"rows": list(rows), "scheme": SMOLLM2_DECODER_SCHEME, "embedding": SMOLLM2_DECODER_EMBEDDING,
            "layers": len(decoder), "mixed": {"candidates": list(SMOLLM2_DECODER_MIXED), "bpw": SMOLLM2_DECODER_BPW}}


# all-MiniLM-L6-v2: the embeddings (the word embedding is half the model) rounded to nearest once
# (fixed), the encoder searched; costs and distillation compare mean-pooled embeddings by direction.
# The word embedding's scheme is the one of MINILM_WORD whose "quantization alone" result is closest
# to FP32 on the measurement batches (calib split: never the held-out sentences).
MINILM_WORD = ("w3g64", "w3g128", "w2g32")
MINILM_POSITION = {"embeddings.position_embeddings": "w4g64"}  # 512 x 384: 0.8 MB as float32
MINILM_DENSE = ("w8", "w4g64", "w3g64", "w2g64")
# the budget is on tensor bytes; the files add a manifest and headers (~0.5%): aim a little above 10x
MINILM_TARGET = 10.1
MINILM_ROWS: dict[str, dict] = {
    "quantization alone": {"target_ratio": MINILM_TARGET, "candidates": MINILM_DENSE},
    "+ unstructured pruning": {"target_ratio": MINILM_TARGET, "candidates": MINILM_DENSE + ("w4g64+50%", "w3g64+50%")},
    "+ structured pruning (50% FFN neurons)": {"target_ratio": MINILM_TARGET, "candidates": MINILM_DENSE, "channels": 0.5},
    "+ distillation": {"target_ratio": MINILM_TARGET, "candidates": MINILM_DENSE, "distill_steps": 300},
    "combined: FFN neurons + distillation": {"target_ratio": MINILM_TARGET, "candidates": MINILM_DENSE, "channels": 0.5,
                                             "distill_steps": 300},
}


def minilm() -> dict:
    import lowbit
    from lowbit.compress import compress
    from lowbit.evaluate import domains as D
    from lowbit.models.zoo import load_model

    zoo = load_model("minilm")
    tok = zoo.tokenizer

    def batches(sents: list[str], size: int) -> list[dict]:
        return [dict(tok(sents[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(sents), size)]  # fmt: skip

    evals = D.available_domains()
    # calibration, cost measurement and distillation: sentences of the calib splits (seeded draws
    # per domain); cosine: 128 sentences of every eval split
    draw = lambda n, seed: [x for d in evals for x in D.domain_sentences(d, "calib", n, seed=seed)]  # noqa: E731
    cal, meas, distill = batches(draw(64, 0), 32), batches(draw(16, 1), 32), batches(draw(256, 2), 16)
    held = {d: batches(D.domain_sentences(d, "eval", 128), 64) for d in evals}

    def embed(model, bs) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for b in bs:
                h = model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).float()
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)

    ref = {d: embed(zoo.model, bs) for d, bs in held.items()}

    def cosines(model) -> dict:
        return {d: float((ref[d] * embed(model, bs)).sum(-1).mean()) for d, bs in held.items()}

    fp_file = _fp32_file_bytes(zoo.model)
    rows = _Rows("minilm", {"label": "FP32", "file_bytes": fp_file, "file_ratio": 1.0, "tensor_ratio": 1.0,
                            "cos": dict.fromkeys(evals, 1.0), "seconds": 0.0, "choice": "-"})  # fmt: skip
    alone = {}  # the word embedding's scheme -> (the "quantization alone" result, its seconds)
    choice = rows.extra.get("word_embedding_choice")  # distances of an interrupted run's choice
    if choice is None or "quantization alone" not in rows.earlier:
        for word in MINILM_WORD:
            t = time.perf_counter()
            alone[word] = (compress(zoo.model, batches=meas, calibration=cal, **MINILM_ROWS["quantization alone"],
                                    fixed={"embeddings.word_embeddings": word, **MINILM_POSITION}),
                           time.perf_counter() - t)  # fmt: skip
            print("word embedding", word, "distance on the measurement batches", alone[word][0].kl, flush=True)
        choice = rows.extra["word_embedding_choice"] = {w: r.kl for w, (r, _s) in alone.items()}
    word = min(choice, key=choice.get)
    fixed = {"embeddings.word_embeddings": word, **MINILM_POSITION}
    for label, kw in MINILM_ROWS.items():
        if rows.reuse(label, kw):
            continue
        t = time.perf_counter()
        if label == "quantization alone":
            r, seconds = alone[word]
        else:
            r = compress(zoo.model, batches=meas, calibration=cal, fixed=fixed, distill_data=distill, **kw)
            seconds = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            out = lowbit.save(r.model, Path(d) / "m")  # the model only: no tokenizer files
            size = _file_bytes(out)
            back = lowbit.load(out)  # rebuilt from its saved config (intermediate_size follows)
            cos = cosines(back)
        counts = ", ".join(f"{c} x{k}" for c, k in sorted(r.allocation.counts().items()))
        rows.add({"label": label, "args": _args(kw),
                  "file_bytes": size, "file_ratio": fp_file / size, "tensor_ratio": r.ratio, "cos": cos,
                  "distance": r.kl, "distance_before_distill": r.kl_before_distill, "seconds": seconds,
                  "stages": r.seconds, "method": r.method, "choice": counts})  # fmt: skip
        print(label, json.dumps({k: rows[-1][k] for k in ("file_ratio", "cos", "seconds", "choice")}), flush=True)
    return {"rows": list(rows), "fixed": fixed, "evals": evals, "held_out": "128 sentences of each eval split",
            "word_embedding_choice": choice}  # fmt: skip


# MobileNetV2: GPTQ/SparseGPT need an unfolded input, which depthwise convolutions do not give, so
# those (17 layers, 1.8% of the weights) are fixed at int8, rounded to nearest; every other layer
# is searched. Low-rank corrections apply to linear layers only (here: the classifier): no row.
MOBILENET_DENSE = ("w8", "w4g64", "w3g64", "w2g64")
MOBILENET_ROWS: dict[str, dict] = {
    "quantization alone": {"target_ratio": 10, "candidates": MOBILENET_DENSE},
    "+ unstructured pruning": {"target_ratio": 10, "candidates": MOBILENET_DENSE + ("w4g64+50%", "w3g64+50%")},
    "+ structured pruning (25% channels)": {"target_ratio": 10, "candidates": MOBILENET_DENSE, "channels": 0.25},
    "+ distillation": {"target_ratio": 10, "candidates": MOBILENET_DENSE, "distill_steps": 300},
    "combined: channels + pruning + distillation": {"target_ratio": 10, "channels": 0.25, "distill_steps": 300,
                                                    "candidates": MOBILENET_DENSE + ("w4g64+50%", "w3g64+50%")},
}


def mobilenet() -> dict:
    import lowbit
    from lowbit.compress import compress
    from lowbit.evaluate.classification import confident_agreement, logits_of
    from lowbit.evaluate.images import photo_crops
    from lowbit.models.mobilenet import MobileNetV2
    from lowbit.models.zoo import load_model

    fp = load_model("mobilenet-v2").model.eval()
    # agreement: 512 eval crops; calibration, measurement and distillation: calib-split crops
    # (different seeds; distillation draws 16 fresh ones per step)
    ev = photo_crops(512, split="eval")
    ref = logits_of(fp, ev)
    cal, meas = photo_crops(64, split="calib"), photo_crops(32, split="calib", seed=1)
    calb, measb = [cal[i : i + 16] for i in range(0, 64, 16)], [meas[i : i + 16] for i in range(0, 32, 16)]
    fixed = {n: "w8" for n, m in fp.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    fp_file = _fp32_file_bytes(fp)
    rows = _Rows("mobilenet", {"label": "FP32", "file_bytes": fp_file, "file_ratio": 1.0, "tensor_ratio": 1.0,
                               "agreement": confident_agreement(ref, ref), "seconds": 0.0, "choice": "-"})  # fmt: skip
    for label, kw in MOBILENET_ROWS.items():
        if rows.reuse(label, kw):
            continue
        t = time.perf_counter()
        r = compress(fp, batches=measb, calibration=calb, fixed=fixed,
                     distill_data=lambda i: photo_crops(16, split="calib", seed=100 + i), **kw)  # fmt: skip
        seconds = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            out = lowbit.save(r.model, Path(d) / "m")
            size = _file_bytes(out)
            back = lowbit.load(out, model=MobileNetV2())  # resized layers load into the original skeleton
            reloaded = confident_agreement(ref, logits_of(back, ev))
        counts = ", ".join(f"{c} x{k}" for c, k in sorted(r.allocation.counts().items()))
        rows.add({"label": label, "args": _args(kw),
                  "file_bytes": size, "file_ratio": fp_file / size, "tensor_ratio": r.ratio,
                  "agreement": confident_agreement(ref, logits_of(r.model, ev)), "reloaded": reloaded,
                  "kl": r.kl, "kl_before_distill": r.kl_before_distill, "seconds": seconds, "stages": r.seconds,
                  "method": r.method, "choice": counts})  # fmt: skip
        print(label, json.dumps({k: rows[-1][k] for k in ("file_ratio", "agreement", "seconds", "choice")}), flush=True)
    return {"rows": list(rows), "fixed": "depthwise convolutions at w8", "eval_crops": len(ev)}


MODELS = {"digits": digits, "smollm2": smollm2, "smollm2_decoder": smollm2_decoder, "minilm": minilm,
          "mobilenet": mobilenet}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    for name in args.models:
        res = MODELS[name]()
        import transformers

        res.update({"date": datetime.date.today().isoformat(), "machine": _machine(),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "python": platform.python_version()},
                    "command": f"python benchmarks/compress_models.py --models {name}",
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"compress_{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
