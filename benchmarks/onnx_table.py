"""lowbit's ONNX exports run by ONNX Runtime, against ONNX Runtime's own quantizers (issue 15).

Sections (``--sections``, default all):

* ``smollm2``: SmolLM2-135M at w4g64, perplexity *computed by ONNX Runtime* (the exported graph,
  ``input_ids -> logits``, windows of 512 tokens, 4,096 eval tokens per domain of
  ``lowbit.evaluate.domains``) for lowbit's RTN / GPTQ / AWQ+GPTQ / HQQ exports (MatMulNBits on
  lowbit's codes) and for ``onnxruntime.quantization.MatMulNBitsQuantizer`` applied to the float
  graph lowbit exports (its default RTN symmetric and asymmetric, its HQQ, its GPTQ where it
  runs), block 64, the LM head kept float on both sides. Calibrated methods on both sides see the
  same windows (``--calib-domains``, default python-docs + handbook: licences and quotes are seen
  by none).
* ``gemv``: one layer, batch 1 (decode) and 128 tokens: ONNX Runtime's MatMulNBits on lowbit's
  weights (``accuracy_level`` 1: float32 arithmetic; 4: int8 activations) vs lowbit's own CPU
  kernel vs float32 ``F.linear``, medians of interleaved rounds, 2 threads each.
* ``mobilenet``: MobileNetV2 static W8A8, lowbit's QDQ export vs ONNX Runtime's
  ``quantize_static`` (QDQ, per-channel weights; MinMax and Percentile calibration) on the same 64
  calibration crops: top-1 agreement with FP32 where FP32 is confident and mean KL on 512 eval
  crops, all computed by ONNX Runtime; batch-1 latency (medians), ONNX Runtime FP32 and lowbit's
  own int8 kernels beside.

    python benchmarks/onnx_table.py [--sections smollm2,gemv,mobilenet] [--again]

Results: ``benchmarks/results/onnx_table.json`` (resumable per row; ``--again`` redoes all).
Never run beside another benchmark: the speed rows need a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "onnx_table.json"
WORK = Path("/tmp/lowbit-onnx")
SEQLEN = 512
EVAL_TOKENS = 4096
THREADS = 2


def _save(data: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(RESULTS)


def _session(path, level=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    # ONNX Runtime's pool threads spin after each run by default; timed round-robin with other
    # sessions and lowbit's kernels, the spinning would take the cores the next one times on
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _int8_convs(path: Path) -> str:
    """How many of the graph's convolutions ONNX Runtime runs as QLinearConv (int8 in and out),
    from the graph it writes after its optimizations."""
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return f"{ops['QLinearConv']} of {ops['QLinearConv'] + ops['Conv'] + ops['FusedConv']}"


# ---- SmolLM2 perplexity computed by ONNX Runtime ------------------------------------------------
def _ppl(path: Path, tok) -> dict:
    from lowbit.evaluate.domains import available_domains, domain_token_ids

    s = _session(path)
    out = {}
    for d in available_domains():
        ids = domain_token_ids(tok, d, "eval", EVAL_TOKENS)
        n = len(ids) // SEQLEN
        nll, count = 0.0, 0
        for w in ids[: n * SEQLEN].reshape(n, SEQLEN):
            logits = torch.from_numpy(s.run(None, {"input_ids": w[None].numpy()})[0][0]).double()
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum"))
            count += SEQLEN - 1
        out[d] = round(float(np.exp(nll / count)), 4)
    return out


def _matmul_nbits_count(path: Path) -> int:
    import onnx

    return sum(n.op_type == "MatMulNBits" for n in onnx.load(str(path), load_external_data=False).graph.node)


def section_smollm2(data: dict, domains: tuple[str, ...], nsamples: int, skip: set[str]) -> None:
    import lowbit
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    tok = zoo.tokenizer
    rows = data.setdefault("smollm2", {})
    cal = None

    def calib():
        nonlocal cal
        if cal is None:
            cal = lowbit.calibration_batches(tok, domains, nsamples=nsamples, seqlen=SEQLEN, seed=0)
        return cal

    fp32 = WORK / "smollm2-fp32.onnx"
    if not fp32.exists():
        lowbit.export(zoo.model, "onnx", fp32, overwrite=True)
    todo = {"fp32": None,
            "lowbit rtn w4g64": ("rtn", "w4g64"), "lowbit gptq w4g64": ("gptq", "w4g64"),
            "onnxruntime default w4g64 (sym)": ("ort-default", True),
            "onnxruntime default w4g64-asym": ("ort-default", False),
            "onnxruntime hqq w4g64-asym": ("ort-hqq", False),
            "lowbit rtn w4g64-asym": ("rtn", "w4g64-asym"), "lowbit hqq w4g64-asym": ("hqq", "w4g64-asym"),
            "lowbit awq+gptq w4g64": ("awq+gptq", "w4g64"),
            "onnxruntime gptq w4g64-asym": ("ort-gptq", False),
            "lowbit awq+gptq w4g64-asym": ("awq+gptq", "w4g64-asym")}  # fmt: skip
    for name, how in todo.items():
        row = rows.get(name, {})
        if name in skip:
            continue
        if "ppl" in row:
            continue
        print(f"  smollm2 {name} ...", file=sys.stderr, flush=True)
        f = WORK / (name.replace(" ", "_").replace("+", "") + ".onnx")
        t0 = time.perf_counter()
        if how is None:
            f = fp32
        elif how[0] in ("rtn", "gptq", "awq+gptq", "hqq"):
            method, scheme = how
            m = lowbit.quantize(copy.deepcopy(zoo.model), scheme, method=method,
                                calibration=calib() if method in ("gptq", "awq+gptq") else None, progress=False)  # fmt: skip
            row["quantize_seconds"] = round(time.perf_counter() - t0, 1)
            lowbit.export(m, "onnx", f, overwrite=True)
            del m
        else:
            row.update(_ort_quantize(how[0], how[1], fp32, f, calib if how[0] == "ort-gptq" else None))
        row["file_bytes"] = f.stat().st_size + (f.with_name(f.name + ".data").stat().st_size
                                                if f.with_name(f.name + ".data").exists() else 0)  # fmt: skip
        row["matmul_nbits"] = _matmul_nbits_count(f)
        row["ppl"] = _ppl(f, tok)
        rows[name] = row
        _save(data)
    data["smollm2_calibration"] = {"domains": list(domains), "windows": nsamples, "seqlen": SEQLEN}
    _save(data)


def _ort_quantize(algo: str, symmetric: bool, src: Path, dst: Path, calib) -> dict:
    """ONNX Runtime's MatMulNBitsQuantizer on the float graph (block 64, 4 bits, accuracy level 1,
    every MatMul with a stored weight: the 210 decoder projections, the tied head is not one)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    model = onnx.load(str(src))
    cfg = None
    if algo == "ort-hqq":
        cfg = mnq.HQQWeightOnlyQuantConfig(block_size=64, bits=4)
    elif algo == "ort-gptq":
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.rows = iter([r[None].numpy() for b in calib() for r in b])

            def get_next(self):
                r = next(self.rows, None)
                return None if r is None else {"input_ids": r}

        cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=64, percdamp=0.01,
                                            actorder=False, mse=False, perchannel=True)  # fmt: skip
    t0 = time.perf_counter()
    q = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=64, is_symmetric=symmetric, accuracy_level=1,
                                 algo_config=cfg)  # fmt: skip
    q.process()
    secs = time.perf_counter() - t0
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return {"quantize_seconds": round(secs, 1)}


# ---- one layer: ONNX Runtime MatMulNBits vs lowbit's kernel ------------------------------------
def section_gemv(data: dict) -> None:
    import lowbit
    from lowbit import kernels
    from lowbit.evaluate.speed import median_times_interleaved
    from lowbit.kernels import cpu

    torch.set_num_threads(THREADS)
    rows = []
    for n, k in ((4096, 4096), (11008, 4096)):
        lin = torch.nn.Linear(k, n, bias=False)
        torch.nn.init.normal_(lin.weight, std=0.02)
        for spec in ("w4g32", "w4g128", "w8"):
            q = lowbit.quantize(torch.nn.Sequential(copy.deepcopy(lin)), spec, progress=False)
            kernels.use_kernel(q, "auto")
            paths = {}
            for level in (1, 4):
                f = WORK / f"gemv-{n}-{k}-{spec}-{level}.onnx"
                lowbit.export(q, "onnx", f, accuracy_level=level, example_inputs=torch.zeros(2, k), overwrite=True)
                paths[level] = _session(f)
            for m in (1, 128):
                x = torch.randn(m, k)
                xn = x.numpy()
                w, s1, s4 = lin.weight, paths[1], paths[4]
                fns = {"torch fp32 F.linear": lambda x=x, w=w: torch.nn.functional.linear(x, w),
                       f"lowbit {q[0].kernel}": lambda x=x, q=q: q(x),
                       "onnxruntime MatMulNBits acc1": lambda xn=xn, s=s1: s.run(None, {"input": xn}),
                       "onnxruntime MatMulNBits acc4": lambda xn=xn, s=s4: s.run(None, {"input": xn})}  # fmt: skip
                with torch.no_grad():  # round-robin: noise hits every contender alike
                    secs = median_times_interleaved(list(fns.values()), reps=200 if m == 1 else 20)
                med = {name: t * 1e3 for name, t in zip(fns, secs)}
                rows.append({"shape": f"{n}x{k}", "scheme": spec, "tokens": m, "ms": {a: round(b, 4) for a, b in med.items()}})
                print("  gemv", rows[-1], file=sys.stderr, flush=True)
    data["gemv"] = {"rows": rows, "isa": cpu.isa(), "threads": THREADS}
    _save(data)


# ---- MobileNetV2 static W8A8 ---------------------------------------------------------------------
def section_mobilenet(data: dict) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    import lowbit
    from lowbit import kernels
    from lowbit.evaluate.classification import confident_agreement, logits_of
    from lowbit.evaluate.images import photo_crops
    from lowbit.evaluate.speed import median_times_interleaved
    from lowbit.models.zoo import load_model

    torch.set_num_threads(THREADS)
    fp = load_model("mobilenet-v2").model.eval()
    cal = photo_crops(64, split="calib")
    ev = photo_crops(512, split="eval")
    with torch.no_grad():
        ref = logits_of(fp, ev)
    fp32 = WORK / "mobilenet-fp32.onnx"
    lowbit.export(fp, "onnx", fp32, example_inputs=ev[:1], overwrite=True)
    q = lowbit.quantize(copy.deepcopy(fp), "w8a8-static", calibration=[cal[i : i + 16] for i in range(0, 64, 16)],
                        progress=False)  # fmt: skip
    ours = WORK / "mobilenet-lowbit-w8a8.onnx"
    lowbit.export(q, "onnx", ours, example_inputs=ev[:1], overwrite=True)
    graphs = {"onnxruntime fp32": fp32, "lowbit w8a8-static (QDQ export)": ours}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([cal[i : i + 1].numpy() for i in range(len(cal))])

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    for meth in (CalibrationMethod.MinMax, CalibrationMethod.Percentile):
        out = WORK / f"mobilenet-ort-{meth.name}.onnx"
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=meth)  # fmt: skip
        graphs[f"onnxruntime quantize_static ({meth.name})"] = out
    rows = []
    x1 = ev[:1].numpy()
    sessions = {name: _session(p) for name, p in graphs.items()}
    for name, s in sessions.items():
        y = torch.cat([torch.from_numpy(s.run(None, {"input": ev[i : i + 32].numpy()})[0]) for i in range(0, len(ev), 32)])
        rows.append({"variant": name, **confident_agreement(ref, y), "file_bytes": graphs[name].stat().st_size,
                     "int8_convs": _int8_convs(graphs[name])})  # fmt: skip
    kernels.use_kernel(q, "auto")
    with torch.no_grad():
        rows.append({"variant": "lowbit w8a8-static (its own kernels)", **confident_agreement(ref, logits_of(q, ev)),
                     "file_bytes": None})  # fmt: skip
    fns = {name: (lambda s=s: s.run(None, {"input": x1})) for name, s in sessions.items()}
    fns["lowbit w8a8-static (its own kernels)"] = lambda: q(ev[:1])
    with torch.no_grad():
        secs = dict(zip(fns, median_times_interleaved(list(fns.values()), reps=100)))
    for r in rows:
        r["latency_ms"] = round(secs[r["variant"]] * 1e3, 3)
    from lowbit.kernels import cpu

    data["mobilenet"] = {"rows": rows, "isa": cpu.isa(), "threads": THREADS, "eval_crops": len(ev), "calib_crops": len(cal)}
    _save(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="smollm2,gemv,mobilenet")
    ap.add_argument("--calib-domains", default="python-docs,handbook")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--again", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated smollm2 rows to leave out of this run")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() and not a.again else {}
    import onnxruntime

    data["onnxruntime"] = onnxruntime.__version__
    for sec in a.sections.split(","):
        if sec == "smollm2":
            section_smollm2(data, tuple(d for d in a.calib_domains.split(",") if d), a.nsamples, set(a.skip.split(",")))
        elif sec == "gemv":
            section_gemv(data)
        elif sec == "mobilenet":
            section_mobilenet(data)
        else:
            raise SystemExit(f"unknown section {sec!r}")
    data["command"] = "python benchmarks/onnx_table.py"
    _save(data)


if __name__ == "__main__":
    main()
