"""Peer benchmark: llama.cpp's own quantizer (``llama_model_quantize``) on the weights lowbit streams.

lowbit quantizes a Hugging Face safetensors checkpoint tensor by tensor; llama.cpp's quantizer reads a
GGUF file instead. This script puts the two side by side in two separate invocations, so that each is
timed, and its peak memory taken, on its own:

1. ``--write-gguf``: convert a Llama-architecture checkpoint (``config.json`` + ``model.safetensors``,
   or shards listed in ``model.safetensors.index.json``) into a GGUF file laid out like one from
   llama.cpp's ``convert_hf_to_gguf.py``: llama.cpp tensor names, the q/k row permutation it applies
   to Llama attention, the ``llama.*`` hyperparameters its loader reads. 2-D weights keep their dtype
   (BF16 stays BF16, F16 stays F16, F32 stays F32); 1-D norm weights are stored as F32, as
   ``convert_hf_to_gguf.py`` does (its CPU kernels multiply by F32 norms). The tensors are streamed:
   tensor info is declared first, then each tensor is read from safetensors, permuted if needed, and
   appended, so the peak memory is about one tensor whatever the model's size. The checkpoints may be
   synthetic with no tokenizer: a dummy SentencePiece-style ("llama") vocabulary of ``vocab_size``
   entries (<unk>, <s>, </s>, 256 byte tokens, then placeholders) is written so that the quantized
   file also loads for inference. llama.cpp's quantizer itself does not read the vocabulary (it loads
   the architecture, hyperparameters and tensor list only); ``--no-tokenizer`` leaves it out.
2. ``--quantize``: run llama.cpp's quantizer in-process through llama-cpp-python
   (``llama_model_quantize``, the same code path as the ``llama-quantize`` tool) on that GGUF and time
   the call's wall time. By default llama.cpp picks its usual per-tensor mix for the requested type
   (for Q4_0: output.weight goes to Q6_K, norms stay F32); ``--pure`` quantizes every 2-D weight to
   the one type, the closest match to a uniform lowbit recipe.

The ``--quantize`` run prints one JSON line: the tool and llama-cpp-python version, the type,
threads, input and output file sizes, wall seconds of the ``llama_model_quantize`` call, input GB/s
(input bytes / 1e9 / seconds) and ``peak_rss_mib`` (the process's VmHWM from /proc/self/status at the
end). llama.cpp maps its input file (mmap on Linux), so the input pages it reads count as file-backed
resident memory next to its own buffers (a float32 copy of the tensor being quantized plus the
quantized result, so sized by the largest tensor, usually the embedding or output matrix).
``rss_anon_peak_mib`` and ``rss_file_peak_mib`` (RssAnon / RssFile sampled every 20 ms during the call)
separate the two. ``output_tensor_types`` counts the GGML types in the output (read after timing).
The input's page-cache state matters as much as for lowbit: right after ``--write-gguf`` the GGUF is
hot in the page cache; ``--cold`` flushes and evicts it (posix_fadvise DONTNEED) before timing.

Commands (run with the interpreter of the venv that holds ``gguf``, ``safetensors``, ``torch`` and
``llama_cpp``)::

    python benchmarks/peer_llamacpp_quantize.py --write-gguf OUT.gguf CHECKPOINT_DIR
    python benchmarks/peer_llamacpp_quantize.py --quantize OUT.gguf OUT.Q4_0.gguf --type Q4_0 --threads 2 [--pure] [--cold]
    /usr/bin/time -v python benchmarks/peer_llamacpp_quantize.py ...   # an outside view of either step
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# safetensors dtype -> (numpy dtype of the raw bytes, GGML type name)
DTYPES = {"BF16": (np.uint16, "BF16"), "F16": (np.float16, "F16"), "F32": (np.float32, "F32")}


def gguf_name(hf_name: str, n_layers: int) -> tuple[str, tuple[int, str]]:
    """llama.cpp's name for a Hugging Face tensor (gguf-py's own Llama tensor map), and a sort key
    putting the file in llama.cpp's order (embedding, the blocks in order, the final norm and head)."""
    import gguf

    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(hf_name, try_suffixes=(".weight",))
    if name is None or hf_name.endswith(".bias"):
        raise SystemExit(f"unsupported tensor {hf_name!r}: only plain Llama checkpoints (no biases, no extra tensors)")
    m = LAYER_RE.fullmatch(name)
    if m:
        return name, (int(m.group(1)), m.group(2))
    return name, ((-1, "") if name == "token_embd.weight" else (1 << 30, name))


def permute_rows(w, n_head: int):
    """llama.cpp's row order for a Llama q_proj / k_proj weight (torch tensor, rows = heads x
    head_dim): lowbit's GGUF export's permutation (lowbit.io.gguf.qk_permutation)."""
    from lowbit.io.gguf import qk_permutation

    return w[qk_permutation(w.shape[0], n_head)].contiguous()


def read_config(ckpt: Path) -> dict:
    c = json.loads((ckpt / "config.json").read_text())
    arch = c.get("architectures") or []
    if c.get("model_type") not in (None, "llama") and "LlamaForCausalLM" not in arch:
        raise SystemExit(f"not a Llama checkpoint (model_type={c.get('model_type')!r}, architectures={arch})")
    heads = c["num_attention_heads"]
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 / 4
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        logging.warning("rope type %r is not written (no effect on quantization; inference would differ)", rope_type)
    return {
        "hidden": c["hidden_size"],
        "ffn": c["intermediate_size"],
        "layers": c["num_hidden_layers"],
        "heads": heads,
        "kv_heads": c.get("num_key_value_heads") or heads,
        "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
        "eps": c.get("rms_norm_eps", 1e-6),
        "rope_theta": rope.get("rope_theta", c.get("rope_theta", 10000.0)),
        "context": c.get("max_position_embeddings", 2048),
        "vocab": c["vocab_size"],
    }


def checkpoint_tensors(ckpt: Path) -> list[tuple[Path, str]]:
    """(safetensors file, tensor name) for every tensor of the checkpoint."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [(ckpt / f, name) for name, f in weight_map.items()]
    from safetensors import safe_open

    single = ckpt / "model.safetensors"
    if not single.exists():
        raise SystemExit(f"{ckpt}: neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return [(single, name) for name in f.keys()]


def add_dummy_vocab(w, n_vocab: int) -> None:
    """A placeholder SentencePiece ("llama") vocabulary: the checkpoints may ship no tokenizer at all.

    llama.cpp's model loader (llama_vocab::load) needs tokenizer.ggml.model and a token list of
    n_vocab entries to open the file for inference; byte tokens <0xNN> let any text be tokenized.
    Below 259 entries there is no room for them: the model still loads and evaluates token ids, but
    llama.cpp aborts the process (std::out_of_range in byte_to_token) if asked to tokenize text.
    """
    import gguf

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    if n_vocab >= len(tokens) + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [gguf.TokenType.BYTE] * 256
    tokens += [f"<dummy{i}>" for i in range(len(tokens), n_vocab)]
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens[:n_vocab])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types[:n_vocab])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_gguf(ckpt: Path, out: Path, tokenizer: bool = True) -> dict:
    import gguf
    import torch
    from safetensors import safe_open

    t0 = time.perf_counter()
    c = read_config(ckpt)
    # Plan: shapes and dtypes from the safetensors headers only (no tensor data read yet).
    plan = []  # (llama.cpp name, sort key, file, HF name, shape, source dtype)
    by_file: dict[Path, list[str]] = {}
    for f, name in checkpoint_tensors(ckpt):
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(f, "pt") as st:
            for name in names:
                sl = st.get_slice(name)
                plan.append((*gguf_name(name, c["layers"]), f, name, tuple(sl.get_shape()), sl.get_dtype()))
    plan.sort(key=lambda p: p[1])
    for p in plan:
        if p[5] not in DTYPES:
            raise SystemExit(f"{p[3]}: unsupported dtype {p[5]} (BF16, F16, F32 only)")
    matrix_dtypes = {p[5] for p in plan if len(p[4]) == 2}

    w = gguf.GGUFWriter(out, "llama")  # writes general.architecture = "llama"
    w.add_name(ckpt.resolve().name)
    w.add_context_length(c["context"])
    w.add_embedding_length(c["hidden"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_rope_dimension_count(c["head_dim"])
    if c["head_dim"] != c["hidden"] // c["heads"]:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    w.add_vocab_size(c["vocab"])
    if len(matrix_dtypes) == 1:
        ftype = {"BF16": gguf.LlamaFileType.MOSTLY_BF16, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "F32": gguf.LlamaFileType.ALL_F32}[matrix_dtypes.pop()]  # fmt: skip
        w.add_file_type(ftype)
    if tokenizer:
        add_dummy_vocab(w, c["vocab"])

    stored = []  # (llama.cpp name, file, HF name, GGML type name)
    for name, _, f, hf_name, shape, dtype in plan:
        np_dtype, ggml = DTYPES[dtype] if len(shape) > 1 else (np.float32, "F32")  # 1-D norms as F32
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        w.add_tensor_info(name, shape, np.dtype(np_dtype), nbytes, raw_dtype=gguf.GGMLQuantizationType[ggml])
        stored.append((name, f, hf_name, ggml))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    nbytes_in = 0
    for name, f, hf_name, ggml in stored:
        # One safe_open per tensor: safetensors maps the file and the pages read stay resident until
        # the handle closes, so keeping a shard open would grow RSS to the shard's size.
        with safe_open(f, "pt") as st:
            t = st.get_tensor(hf_name)
            nbytes_in += t.numel() * t.element_size()
            if name.endswith("attn_q.weight"):
                t = permute_rows(t, c["heads"])
            elif name.endswith("attn_k.weight"):
                t = permute_rows(t, c["kv_heads"])
            if ggml == "F32":
                arr = t.to(torch.float32).numpy()
            elif ggml == "BF16":
                arr = t.view(torch.int16).numpy()  # raw bf16 bits; numpy has no bfloat16
            else:
                arr = t.numpy()
            w.write_tensor_data(arr)
            del t, arr
    w.close()
    return {"step": "write-gguf", "checkpoint": str(ckpt), "gguf": str(out), "tensors": len(stored),
            "checkpoint_tensor_bytes": nbytes_in, "gguf_bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mib": round(proc_status("VmHWM") / 1024, 1)}  # fmt: skip


def proc_status(key: str) -> int:
    """A /proc/self/status entry in kB (VmHWM, VmRSS, RssAnon, RssFile)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class RssSampler(threading.Thread):
    """Peak RssAnon / RssFile, sampled while llama.cpp runs (ctypes releases the GIL during the call)."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.stop, self.anon, self.file = interval, threading.Event(), 0, 0

    def run(self) -> None:
        while True:
            self.anon = max(self.anon, proc_status("RssAnon"))
            self.file = max(self.file, proc_status("RssFile"))
            if self.stop.wait(self.interval):
                return


def evict_page_cache(path: Path) -> None:
    """Flush and drop a file's pages from the page cache (no root needed), for a cold-cache timing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def quantize(inp: Path, out: Path, qtype: str, threads: int, pure: bool, cold: bool, verbose: bool) -> dict:
    import llama_cpp

    # llama-cpp-python forwards llama.cpp's log (one line per tensor) to stderr unless this logger is raised.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise SystemExit(f"unknown llama.cpp type {qtype!r} (e.g. Q4_0, Q8_0, Q4_K_M)")
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.pure = pure
    if cold:
        evict_page_cache(inp)
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    peak_kib = proc_status("VmHWM")
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({inp} -> {out}, {qtype}) failed: rc={rc} (rerun with --verbose)")
    in_bytes = inp.stat().st_size
    return {
        "tool": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "type": qtype.upper(),
        "pure": pure,
        "threads": threads,
        "input_cache": "evicted" if cold else "as-is",
        "input_bytes": in_bytes,
        "output_bytes": out.stat().st_size,
        "seconds": round(seconds, 3),
        "input_GB_per_s": round(in_bytes / 1e9 / seconds, 3),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "rss_anon_peak_mib": round(sampler.anon / 1024, 1),
        "rss_file_peak_mib": round(sampler.file / 1024, 1),
        "output_tensor_types": tensor_types(out),
    }


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF holds (header only; after the measurement)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write-gguf", metavar="OUT.gguf", type=Path, help="convert CHECKPOINT to a GGUF file")
    mode.add_argument("--quantize", nargs=2, metavar=("IN.gguf", "OUT.gguf"), type=Path,
                      help="quantize a GGUF file with llama.cpp")  # fmt: skip
    ap.add_argument("checkpoint", nargs="?", type=Path, help="Hugging Face checkpoint directory (--write-gguf)")
    ap.add_argument("--no-tokenizer", action="store_true", help="--write-gguf: no dummy vocabulary (not loadable)")
    ap.add_argument("--type", default="Q4_0", help="llama.cpp type: Q4_0, Q8_0, Q4_K_M, ... (default Q4_0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pure", action="store_true", help="one type for every 2-D weight (no llama.cpp mix)")
    ap.add_argument("--cold", action="store_true", help="evict IN.gguf from the page cache before timing")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    a = ap.parse_args()
    if a.write_gguf:
        if a.checkpoint is None:
            ap.error("--write-gguf needs the CHECKPOINT directory")
        print(json.dumps(write_gguf(a.checkpoint, a.write_gguf, tokenizer=not a.no_tokenizer)))
    else:
        if a.checkpoint is not None:
            ap.error("--quantize takes no CHECKPOINT")
        print(json.dumps(quantize(*a.quantize, a.type, a.threads, a.pure, a.cold, a.verbose)))


if __name__ == "__main__":
    main()
