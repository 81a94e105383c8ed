"""Issue 14's measurements: quantizing checkpoints larger than memory, layer by layer.

Every measured run is its own process (``--child``), so its peak RSS (``VmHWM``, the whole process:
interpreter, torch, buffers) is that run's alone; the page cache is dropped before each timed run
when this runs as root, so every tool reads the checkpoint from disk. Results accumulate in
``benchmarks/results/streaming.json`` keyed by run (a finished run is not repeated; ``--again``
repeats it); ``benchmarks/report.py`` renders them into BENCHMARKS.md.

Sections (``--sections``, in this order by default):

* ``slice``: a checkpoint in Mistral-Small-24B's shapes with ``--slice-layers`` decoder layers (the
  embedding and head, 2 x 1.3 GB, plus 0.9 GB per layer, bf16), quantized to w4g128 by lowbit
  (``rtn`` and ``hqq``, streamed) and the same tensors, written as a bf16 GGUF, by llama.cpp's own quantizer
  (``llama_model_quantize`` via llama-cpp-python, Q4_0: also 4-bit, groups of 32, fp16 scales;
  ``benchmarks/peer_llamacpp_quantize.py``; its default mix, which puts the head in Q6_K, and
  ``--pure``), 2 threads each: throughput side by side (lowbit's default keeps the embedding and
  head in bf16 and copies them; llama.cpp quantizes them; ``-all`` quantizes them too).
* ``big``: the whole 24B-shaped checkpoint (47 GB of bf16, twice this machine's RAM) streamed with
  rtn w4g128 (embedding and head kept in bf16, the default; and both in int8) and hqq w4g128; each result loaded
  (peak RSS against the file size) and generating 16 tokens.
* ``calibrated``: a checkpoint in TinyLlama-1.1B's shapes streamed with gptq and awq (w4g128,
  16 x 512 calibration tokens, random ids: the weights are random too) against the in-memory path.
* ``identity``: SmolLM2-135M (float32 checkpoint) streamed and in memory, for rtn, hqq, gptq and awq:
  the output files compared byte for byte.
* ``ray``: a 4-layer 1.1B-shaped checkpoint, rtn w4g128, in one process and on a local Ray cluster
  with 1 and 2 workers: time and identical bytes.

    python benchmarks/streaming.py [--sections slice big ...] [--work DIR] [--again]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "streaming.json"
SECTIONS = ("slice", "big", "calibrated", "identity", "ray")
PEER = sys.executable  # an interpreter with llama_cpp and gguf (the dev extra installs both)


# ---- children: one measured run each, printing one JSON line ---------------------------------
def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _calibration(vocab: int, n: int, seqlen: int, seed: int = 0) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(n)]


def child_quantize(a: dict) -> dict:
    """Quantize a checkpoint directory, streamed or in memory; peak RSS and seconds."""
    import torch

    import lowbit
    from lowbit.checkpoint import quantize_checkpoint
    from lowbit.io.shards import DEFAULT_SHARD_BYTES

    torch.set_num_threads(a.get("threads", 2))
    opts = {}
    if a["method"] in ("gptq", "awq", "awq+gptq"):
        cfg = json.loads((Path(a["src"]) / "config.json").read_text())
        opts["calibration"] = _calibration(cfg["vocab_size"], a["nsamples"], a["seqlen"])
    t0 = time.perf_counter()
    spec = a["spec"]
    if spec.endswith("-all"):  # the scheme for every linear layer and embedding, the head included
        spec = lowbit.Recipe(lowbit.parse_scheme(spec[:-4])).add("*embed_tokens", spec[:-4]).add("lm_head", spec[:-4])
    elif spec.endswith("-head8"):  # the embedding and head in int8 (per channel) instead of kept in bf16
        spec = lowbit.Recipe(lowbit.parse_scheme(spec[:-6])).add("*embed_tokens", "int8").add("lm_head", "int8")
    shard = a.get("shard_bytes", DEFAULT_SHARD_BYTES)
    if a["stream"]:
        quantize_checkpoint(a["src"], spec, a["out"], method=a["method"], max_shard_bytes=shard, **opts)
    else:
        import transformers

        from lowbit.checkpoint import tokenizer_of

        model = transformers.AutoModelForCausalLM.from_pretrained(a["src"], dtype=torch.float32)
        model.lowbit_source = a["src"]
        lowbit.quantize(model, spec, method=a["method"], **opts)
        # the tokenizer saved beside it, as the streamed path (and the CLI) do
        lowbit.save(model, a["out"], max_shard_bytes=shard, tokenizer=tokenizer_of(Path(a["src"])))
    secs = time.perf_counter() - t0
    out = sum(p.stat().st_size for p in Path(a["out"]).glob("*.safetensors"))
    return {"seconds": round(secs, 2), "peak_rss_mib": round(_vmhwm_mib(), 1), "out_bytes": out, "shard_bytes": shard}


def child_load(a: dict) -> dict:
    """Load a lowbit directory and greedily generate tokens: peak RSS against the file size."""
    import torch

    import lowbit

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = lowbit.load(a["dir"])
    t1 = time.perf_counter()
    ids = torch.tensor([[1, 450, 4996, 310, 278, 3303]])
    with torch.no_grad():
        out = lowbit.generate(model, ids, a["tokens"], temperature=0.0, eos_token_id=[])
    t2 = time.perf_counter()
    new = out.shape[1] - ids.shape[1]
    file_bytes = sum(p.stat().st_size for p in Path(a["dir"]).glob("*.safetensors"))
    return {"load_seconds": round(t1 - t0, 2), "generate_seconds": round(t2 - t1, 2), "tokens": int(new),
            "peak_rss_mib": round(_vmhwm_mib(), 1), "file_bytes": file_bytes}  # fmt: skip


def child_ray(a: dict) -> dict:
    import ray
    import torch

    from lowbit.checkpoint import quantize_checkpoint

    torch.set_num_threads(1)
    opts = {}
    if a.get("method", "rtn") != "rtn":
        cfg = json.loads((Path(a["src"]) / "config.json").read_text())
        opts["calibration"] = _calibration(cfg["vocab_size"], a["nsamples"], a["seqlen"])
    ray.init(num_cpus=a["workers"], include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        quantize_checkpoint(a["src"], a["spec"], a["out"], method=a.get("method", "rtn"), ray_address="auto",
                            ray_workers=a["workers"], **opts)  # fmt: skip
        secs = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"seconds": round(secs, 2), "peak_rss_mib_driver": round(_vmhwm_mib(), 1)}


def child_compare(a: dict) -> dict:
    """Two lowbit outputs of one checkpoint: the fraction of 4-bit codes that differ (and by how
    much at most) and the relative difference of their logits on random token ids."""
    import torch
    from safetensors.torch import load_file

    import lowbit
    from lowbit import packing

    x, y = Path(a["a"]), Path(a["b"])
    changed = total = step = 0
    for f in sorted(p.name for p in x.glob("*.safetensors")):
        ta, tb = load_file(str(x / f)), load_file(str(y / f))
        for k, v in ta.items():
            if k.endswith(".qweight"):
                ca, cb = (packing.unpack(t, 4, 2 * v.shape[1]).int() for t in (v, tb[k]))
                changed += int((ca != cb).sum())
                total += ca.numel()
                step = max(step, int((ca - cb).abs().max()))
    cfg = json.loads((x / "config.json").read_text())
    ids = torch.randint(0, cfg["vocab_size"], (2, 128), generator=torch.Generator().manual_seed(0))
    out = {"codes_changed": changed / max(1, total), "max_code_step": step}
    with torch.no_grad():
        la = lowbit.load(x)(ids).logits
        lb = lowbit.load(y)(ids).logits
        out["logits_rel_diff"] = float((la - lb).norm() / la.norm())
        if a.get("src"):  # each one's distance from the float model: equally good, or not
            import transformers

            lf = transformers.AutoModelForCausalLM.from_pretrained(a["src"], dtype=torch.float32)(ids).logits

            def kl(lq):
                p = lf.log_softmax(-1)
                return float((p.exp() * (p - lq.log_softmax(-1))).sum(-1).mean())

            out["kl_to_float"] = [kl(la), kl(lb)]
    return out


CHILDREN = {"quantize": child_quantize, "load": child_load, "ray": child_ray, "compare": child_compare}


# ---- the parent ----------------------------------------------------------------------------------
def _drop_caches() -> bool:
    if os.geteuid() != 0:
        return False
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _run(job: str, args: dict, python: str = sys.executable, timeout: int = 7200) -> dict:
    cold = _drop_caches()
    p = subprocess.run([python, __file__, "--child", job, json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"{job} {args} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["cold_cache"] = cold
    return out


def _peer(args: list[str], python: str) -> dict:
    cold = _drop_caches()
    p = subprocess.run([python, str(HERE / "peer_llamacpp_quantize.py"), *args], capture_output=True, text=True,
                       timeout=7200)  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp quantizer failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["cold_cache"] = cold
    return out


def _checkpoint(path: Path, shapes: str, layers: int | None, dtype: str = "bfloat16") -> Path:
    if not (path / "config.json").is_file():
        cmd = [sys.executable, str(HERE / "make_checkpoint.py"), str(path), "--shapes", shapes, "--dtype", dtype,
               "--shard-gb", "4"] + (["--layers", str(layers)] if layers is not None else [])  # fmt: skip
        subprocess.run(cmd, check=True)
    return path


def _bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def _cpu() -> str:
    from lowbit.kernels import cpu

    return cpu.isa()


class Book:
    """results/streaming.json: finished runs by key."""

    def __init__(self, again: bool, path: Path = RESULTS):
        self.again, self.path = again, path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, fn) -> dict:
        if key in self.data and not self.again:
            return self.data[key]
        print(f"  {key} ...", flush=True)
        self.data[key] = fn()
        self.data[key]["isa"] = _cpu()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)
        print(f"  {key}: {self.data[key]}", flush=True)
        return self.data[key]


def section_slice(book: Book, work: Path, layers: int, peer_python: str) -> None:
    src = _checkpoint(work / f"m24b-{layers}L", "mistral-24b", layers)
    n = _bytes(src)
    key = f"slice/mistral-24b-{layers}L"
    for method in ("rtn", "hqq"):
        book.get(f"{key}/lowbit-{method}-w4g128", lambda m=method: {**_run("quantize", {
            "src": str(src), "out": str(work / "q-slice"), "spec": "w4g128", "method": m, "stream": True}), "input_bytes": n})  # fmt: skip
        shutil.rmtree(work / "q-slice", ignore_errors=True)
    gguf = work / f"m24b-{layers}L.bf16.gguf"
    if not gguf.is_file():
        _peer(["--write-gguf", str(gguf), str(src)], peer_python)
    for pure in (False, True):  # llama.cpp's own Q4_0 mix (head in Q6_K), and every 2-D weight in Q4_0
        book.get(f"{key}/llamacpp-Q4_0{'-pure' if pure else ''}", lambda p=pure: _peer(
            ["--quantize", str(gguf), str(work / "q-slice.gguf"), "--type", "Q4_0", "--threads", "2"]
            + (["--pure"] if p else []), peer_python))  # fmt: skip
        (work / "q-slice.gguf").unlink(missing_ok=True)
    gguf.unlink(missing_ok=True)
    shutil.rmtree(work / "q-slice", ignore_errors=True)
    # every linear layer in 4 bits, the embedding and head too: the closest to llama.cpp's --pure
    for method in ("rtn", "hqq"):
        book.get(f"{key}/lowbit-{method}-w4g128-all", lambda m=method: {**_run("quantize", {
            "src": str(src), "out": str(work / "q-slice"), "spec": "w4g128-all", "method": m, "stream": True}), "input_bytes": n})  # fmt: skip
        shutil.rmtree(work / "q-slice", ignore_errors=True)


def section_big(book: Book, work: Path) -> None:
    """The whole 24B-shaped checkpoint: the default (embedding and head kept in bf16) and with the
    embedding and head in int8 too; each result loaded and generating."""
    src = work / "m24b"
    variants = (("rtn", "w4g128"), ("rtn", "w4g128-head8"), ("hqq", "w4g128"))  # head8: embedding and head int8
    todo = [(m, v) for m, v in variants if f"big/mistral-24b/lowbit-{m}-{v}" not in book.data or book.again]
    if todo:
        _checkpoint(src, "mistral-24b", None)
    for m, v in variants:  # one output at a time beside the 47 GB checkpoint (disk space)
        out = work / f"q-big-{m}-{v}"
        book.get(f"big/mistral-24b/lowbit-{m}-{v}", lambda m=m, v=v, out=out: {**_run("quantize", {
            "src": str(src), "out": str(out), "spec": v, "method": m, "stream": True}), "input_bytes": _bytes(src)})  # fmt: skip
        if out.is_dir():
            name = v if m == "rtn" else f"{m}-{v}"  # (the rtn keys predate hqq)
            book.get(f"big/mistral-24b/load-generate-{name}", lambda out=out: _run("load", {"dir": str(out), "tokens": 16}))
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)  # 47 GB


def section_calibrated(book: Book, work: Path, nsamples: int = 16) -> None:
    src = _checkpoint(work / "tl1b", "tinyllama-1.1b", None)
    for method, stream in (("gptq", True), ("awq", True), ("gptq", False)):
        way = "streamed" if stream else "in-memory"
        book.get(f"calibrated/tinyllama-1.1b/{method}-w4g128/{way}", lambda m=method, s=stream: {**_run("quantize", {
            "src": str(src), "out": str(work / "q-cal"), "spec": "w4g128", "method": m, "stream": s,
            "shard_bytes": 1 << 30, "nsamples": nsamples, "seqlen": 512}), "input_bytes": _bytes(src),
            "calibration": f"{nsamples} x 512"})  # fmt: skip
        shutil.rmtree(work / "q-cal", ignore_errors=True)


def section_identity(book: Book, work: Path) -> None:
    src = work / "smollm2-fp32"
    if not (src / "config.json").is_file():
        from lowbit.models.zoo import load_model

        zm = load_model("smollm2-135m")
        zm.model.save_pretrained(src, max_shard_size="200MB")
        zm.tokenizer.save_pretrained(src)
    for method in ("rtn", "hqq", "gptq", "awq"):
        def both(m=method) -> dict:
            runs = {}
            for stream in (True, False):
                runs["streamed" if stream else "in-memory"] = _run("quantize", {
                    "src": str(src), "out": str(work / f"q-id-{stream}"), "spec": "w4g64", "method": m,
                    "stream": stream, "shard_bytes": 100 << 20, "nsamples": 16, "seqlen": 512})  # fmt: skip
            a, b = work / "q-id-True", work / "q-id-False"
            files = sorted(p.name for p in a.iterdir())
            same = files == sorted(p.name for p in b.iterdir()) and all(
                filecmp.cmp(a / f, b / f, shallow=False) for f in files)
            if same:
                shutil.rmtree(a), shutil.rmtree(b)
            return {"identical_bytes": same, "files": len(files), **runs}

        book.get(f"identity/smollm2-135m/{method}-w4g64", both)


def section_ray(book: Book, work: Path) -> None:
    src = _checkpoint(work / "tl1b-4L", "tinyllama-1.1b", 4)
    base = book.get("ray/tinyllama-4L/one-process", lambda: _run("quantize", {
        "src": str(src), "out": str(work / "q-ray-0"), "spec": "w4g128", "method": "rtn", "stream": True,
        "shard_bytes": 1 << 30, "threads": 1}))  # fmt: skip
    del base
    for n in (1, 2):
        def go(n=n) -> dict:
            r = _run("ray", {"src": str(src), "out": str(work / f"q-ray-{n}"), "spec": "w4g128", "workers": n})
            a, b = work / "q-ray-0", work / f"q-ray-{n}"
            files = sorted(p.name for p in a.iterdir()) if a.is_dir() else []
            r["identical_bytes"] = bool(files) and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
            return r

        book.get(f"ray/tinyllama-4L/ray-{n}-workers", go)
    # calibrated: the calibration batches split across workers (GPTQ, 8 x 512 random tokens)
    cal = {"src": str(src), "spec": "w4g128", "method": "gptq", "nsamples": 8, "seqlen": 512}
    book.get("ray-gptq/tinyllama-4L/one-process", lambda: _run("quantize", {
        **cal, "out": str(work / "q-rayc-0"), "stream": True, "shard_bytes": 1 << 30, "threads": 1}))  # fmt: skip
    for n in (1, 2):
        def calibrated(n=n) -> dict:
            r = _run("ray", {**cal, "out": str(work / f"q-rayc-{n}"), "workers": n})
            return {**r, **_run("compare", {"a": str(work / "q-rayc-0"), "b": str(work / f"q-rayc-{n}"),
                                            "src": str(src)})}  # fmt: skip

        book.get(f"ray-gptq/tinyllama-4L/ray-{n}-workers", calibrated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("JOB", "ARGS"), help=argparse.SUPPRESS)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/lowbit-streaming"),
                    help="scratch directory for the synthetic checkpoints (tens of GB; removed as it goes)")
    ap.add_argument("--slice-layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens (section calibrated)")
    ap.add_argument("--peer-python", default=PEER, help="interpreter with llama_cpp and gguf installed")
    ap.add_argument("--again", action="store_true", help="repeat runs already in the results")
    ap.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)  # (smoke tests)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child[0]](json.loads(a.child[1]))))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    book = Book(a.again, a.results)
    for s in a.sections:
        print(f"section {s}", flush=True)
        if s == "slice":
            section_slice(book, a.work, a.slice_layers, a.peer_python)
        elif s == "calibrated":
            section_calibrated(book, a.work, a.nsamples)
        else:
            globals()[f"section_{s}"](book, a.work)


if __name__ == "__main__":
    main()
