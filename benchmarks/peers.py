"""Adapters that run peer libraries' weight-only quantized linear layers on CPU.

Each entry of :data:`PEERS` maps a name to an *adapter*: a function that takes a
float32 ``torch.nn.Linear`` (weight shape ``out x in``), quantizes a private
copy of it with the peer library, and returns a callable ``fn(x) -> y``.

Conventions shared by all adapters:

* The original ``nn.Linear`` is never modified (a deep copy is quantized).
* ``fn`` accepts an input of any floating dtype, casts it to the dtype the peer
  kernel wants (documented per adapter as "compute dtype"), and returns the
  result cast back to the dtype of ``x``.  The two casts are part of what is
  timed; for batch-1 GEMV they cost a few microseconds.
* ``fn`` runs under ``torch.no_grad()`` (not ``inference_mode``: quanto's
  generic int4 path fails on inference tensors).
* Quantization (and any one-time repacking done lazily by the peer on its
  first forward) happens inside the adapter, before ``fn`` is returned, so a
  benchmark can time ``fn`` directly.

Timing notes (2-core x86 box, 32 MiB L3):

* Adapters that dequantize the whole weight on every call (torchao-int8 eager,
  quanto-int4g64, hqq-*) allocate a large temporary per call.  With glibc's
  default malloc such blocks are mmap'ed and unmapped each time, and the page
  faults can dominate (3-5x slower).  Run the benchmark process with e.g.
  ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`` to
  measure the kernels rather than the allocator, or say which was used.
* A 4096x4096 int4/int8 weight (8/16 MiB) stays in L3 across back-to-back calls
  while the fp32 one (64 MiB) does not; evict the cache (or rotate several
  layers) between calls for DRAM-bound numbers.

The peer libraries are optional: they are imported inside the adapters only,
so importing this module needs nothing but torch.  Use :func:`available_peers`
to get the subset whose library is installed, and :func:`peer_versions` to
record versions next to benchmark results.

Verified on CPU (x86-64, AVX-512 incl. AVX512_BF16) with torch 2.13.0+cpu,
torchao 0.18.0, optimum-quanto 0.2.7, bitsandbytes 0.50.2, hqq 0.2.8.post1.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
from collections.abc import Callable

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]
Adapter = Callable[[torch.nn.Linear], Forward]

# distribution name -> importable top-level module, for the optional peers
_PEER_DISTS: dict[str, str] = {
    "torchao": "torchao",
    "optimum-quanto": "optimum.quanto",
    "bitsandbytes": "bitsandbytes",
    "hqq": "hqq",
    "onnxruntime": "onnxruntime",
}


def _private_copy(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.nn.Linear:
    if not isinstance(linear, torch.nn.Linear):
        raise TypeError(f"expected torch.nn.Linear, got {type(linear).__name__}")
    mod = copy.deepcopy(linear).to(device="cpu", dtype=dtype)
    mod.eval()
    mod.requires_grad_(False)
    return mod


def _wrap(module: Callable[[torch.Tensor], torch.Tensor], compute_dtype: torch.dtype,
          in_features: int) -> Forward:
    """Build fn(x): cast to compute_dtype, run module, cast back; then warm it up once."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = module(x.to(compute_dtype))
        return y.to(x.dtype)

    # One warm-up call: some peers repack weights lazily on their first forward
    # (bitsandbytes' CPU 4-bit layout, quanto's C++ extension build, ...).
    fn(torch.ones(1, in_features, dtype=compute_dtype))
    return fn


# ----------------------------------------------------------------------------
# torchao
# ----------------------------------------------------------------------------

def _torchao_int8(compile_: bool) -> Adapter:
    def adapter(linear: torch.nn.Linear) -> Forward:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerRow

        mod = _private_copy(linear, torch.bfloat16)
        quantize_(mod, Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False))
        # The warm-up call inside _wrap triggers the (one-time) compilation.
        return _wrap(torch.compile(mod) if compile_ else mod, torch.bfloat16, linear.in_features)

    return adapter


_torchao_int8_eager = _torchao_int8(False)
_torchao_int8_eager.__doc__ = """torchao ``Int8WeightOnlyConfig(granularity=PerRow())`` (symmetric int8, per output channel), eager.

Compute dtype: bfloat16 (fp32 also runs, slower).  Input is cast to
bfloat16.  torchao 0.18's eager CPU path converts the whole int8 weight to a
bf16 temporary on every call and then runs a dense ``mm``: no faster than the
fp32 dense GEMV, and sensitive to the allocator (see the note on
dequantize-per-call adapters in the module docstring).  torchao expects this to
be used under ``torch.compile``; see ``torchao-int8-compiled``.
"""

_torchao_int8_compiled = _torchao_int8(True)
_torchao_int8_compiled.__doc__ = """torchao ``Int8WeightOnlyConfig(granularity=PerRow())`` under ``torch.compile`` (inductor, CPU).

Compute dtype: bfloat16.  Input is cast to bfloat16.  Inductor fuses the
int8->bf16 conversion with the matmul (the timing matches reading only the
int8 weight), which makes this the fast torchao int8 path.  Needs a working C++ compiler; the adapter's warm-up compiles
(a few seconds to ~20 s on 2 cores), and a new input shape may recompile.
"""


def _torchao_int4(group_size: int, algorithm: str = "tinygemm") -> Adapter:
    def adapter(linear: torch.nn.Linear) -> Forward:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        mod = _private_copy(linear, torch.bfloat16)
        quantize_(mod, PrototypeInt4WeightOnlyConfig(
            group_size=group_size,
            int4_choose_qparams_algorithm=algorithm,
            set_inductor_config=False,
        ))
        return _wrap(mod, torch.bfloat16, linear.in_features)

    adapter.__doc__ = (
        f"torchao ``PrototypeInt4WeightOnlyConfig(group_size={group_size}, "
        f"int4_choose_qparams_algorithm={algorithm!r})`` "
        "(asymmetric uint4, per-group scale+zero; ``Int4OpaqueTensor`` running "
        "``aten._weight_int4pack_mm_for_cpu``).\n\n"
        "Compute dtype: bfloat16 (module, scales/zeros and input must share a dtype; "
        "the fp32 variant of the CPU kernel runs but is ~30x slower).  Input is cast to "
        "bfloat16.  The non-prototype ``Int4WeightOnlyConfig`` has no CPU path in "
        "torchao 0.18 (plain needs mslk, tile_packed_to_4d needs CUDA, plain_int32 is "
        "XPU/NPU-only)."
    )
    return adapter


# ----------------------------------------------------------------------------
# optimum-quanto
# ----------------------------------------------------------------------------

def _quanto(bits: int, group_size: int | None, compute_dtype: torch.dtype) -> Adapter:
    def adapter(linear: torch.nn.Linear) -> Forward:
        from optimum.quanto import freeze, qint4, qint8, quantize

        holder = torch.nn.Sequential(_private_copy(linear, compute_dtype))
        quantize(holder, weights=qint8 if bits == 8 else qint4)
        if group_size is not None:
            # quanto picks the int4 group size itself (128 when in_features
            # allows); the weight is only quantized at freeze(), so override here.
            holder[0].weight_group_size = group_size
        freeze(holder)
        return _wrap(holder[0], compute_dtype, linear.in_features)

    return adapter


_quanto_int8 = _quanto(8, None, torch.bfloat16)
_quanto_int8.__doc__ = """optimum-quanto ``quantize(model, weights=qint8)`` + ``freeze`` (symmetric int8, per channel).

Compute dtype: bfloat16 -- with a bf16 module and bf16 input quanto's CPU
``qbytes_mm`` uses ``torch._weight_int8pack_mm``; with fp32 it dequantizes the
whole weight on every call (many times slower).  Input is cast to bfloat16.
"""

_quanto_int4g128 = _quanto(4, 128, torch.bfloat16)
_quanto_int4g128.__doc__ = """optimum-quanto ``quantize(model, weights=qint4)`` + ``freeze``, group size 128.

Compute dtype: bfloat16 -- only qint4 + bf16 + group_size 128 selects
``TinyGemmWeightQBitsTensor`` (``aten._weight_int4pack_mm_for_cpu``) on CPU.
Input is cast to bfloat16.
"""

_quanto_int4g64 = _quanto(4, 64, torch.bfloat16)
_quanto_int4g64.__doc__ = """optimum-quanto qint4 with group size 64 (set via ``weight_group_size`` before ``freeze``).

Compute dtype: bfloat16.  Input is cast to bfloat16.  There is no packed CPU
kernel for group 64 (tinygemm is only chosen for group 128): every call
unpacks and dequantizes the whole weight (quanto's C++ ``unpack`` extension,
JIT-built with g++/ninja on first use) and then does a dense matmul.  Slow.
"""


# ----------------------------------------------------------------------------
# bitsandbytes
# ----------------------------------------------------------------------------

def _bnb_int8(linear: torch.nn.Linear) -> Forward:
    """bitsandbytes ``Linear8bitLt(has_fp16_weights=False, threshold=0.0)`` (LLM.int8()).

    Compute dtype: float16.  Input is cast to float16 (bnb casts to fp16
    itself and logs a warning on every call otherwise).  NOTE: this is *not*
    weight-only: in inference bnb quantizes the activation row-wise to int8 as
    well and runs an int8 x int8 matmul (``torch._int_mm`` on AVX-512 CPUs):
    W8A8 with dynamic per-row activation scales;
    bnb has no int8 weight-only CPU inference path.  Weight scales are
    per output row (absmax/127), computed from an fp16 copy of the weight.
    """
    import bitsandbytes.nn as bnn

    src = _private_copy(linear, torch.float32)
    mod = bnn.Linear8bitLt(src.in_features, src.out_features, bias=src.bias is not None,
                           has_fp16_weights=False, threshold=0.0)
    mod.weight = bnn.Int8Params(src.weight.data.clone(), requires_grad=False,
                                has_fp16_weights=False)
    if src.bias is not None:
        mod.bias = torch.nn.Parameter(src.bias.data.to(torch.float16), requires_grad=False)
    mod = mod.to("cpu").eval()  # .to(device) is what triggers the int8 quantization
    return _wrap(mod, torch.float16, linear.in_features)


def _bnb_4bit(quant_type: str, blocksize: int) -> Adapter:
    def adapter(linear: torch.nn.Linear) -> Forward:
        import bitsandbytes.nn as bnn

        src = _private_copy(linear, torch.float32)
        mod = bnn.Linear4bit(src.in_features, src.out_features, bias=src.bias is not None,
                             compute_dtype=torch.bfloat16, compress_statistics=False,
                             quant_type=quant_type)
        mod.weight = bnn.Params4bit(src.weight.data.clone(), requires_grad=False,
                                    blocksize=blocksize, compress_statistics=False,
                                    quant_type=quant_type, module=mod)
        if src.bias is not None:
            mod.bias = torch.nn.Parameter(src.bias.data.to(torch.bfloat16), requires_grad=False)
        mod = mod.to("cpu").eval()  # .to(device) is what triggers the 4-bit quantization
        return _wrap(mod, torch.bfloat16, linear.in_features)

    adapter.__doc__ = (
        f"bitsandbytes ``Linear4bit(quant_type={quant_type!r}, compute_dtype=bfloat16)`` with "
        f"``Params4bit(blocksize={blocksize}, compress_statistics=False)`` "
        "(absmax-scaled 4-bit codebook, one fp32 absmax per block).\n\n"
        "Compute dtype: bfloat16.  Input is cast to bfloat16.  On a CPU with "
        "AVX512_BF16, the first eval forward repacks the weight for bnb's native "
        "``gemv_4bit_inference_cpu_*_bf16`` kernel (done by the adapter's warm-up); "
        "without AVX512_BF16 bnb falls back to dequantize + matmul.  bnb also tries "
        "to fetch a faster kernel from the HF hub via the optional ``kernels`` "
        "package at import; without network it logs a warning and uses its own."
    )
    return adapter


# ----------------------------------------------------------------------------
# hqq
# ----------------------------------------------------------------------------

def _hqq(nbits: int, group_size: int | None) -> Adapter:
    def adapter(linear: torch.nn.Linear) -> Forward:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        src = _private_copy(linear, torch.float32)
        cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=1)
        mod = HQQLinear(src, cfg, del_orig=True, compute_dtype=torch.bfloat16, device="cpu")
        return _wrap(mod, torch.bfloat16, linear.in_features)

    gs = "per channel" if group_size is None else f"group size {group_size}"
    adapter.__doc__ = (
        f"hqq ``HQQLinear(BaseQuantizeConfig(nbits={nbits}, group_size={group_size}, axis=1), "
        "compute_dtype=bfloat16, device='cpu')`` "
        f"(asymmetric int{nbits}, {gs}, scale/zero fitted by HQQ's optimizer).\n\n"
        "Compute dtype: bfloat16 (fp32 also works, slower).  Input is cast to "
        "bfloat16.  hqq has no CPU kernel: its default PYTORCH backend unpacks and "
        "dequantizes the whole weight on every call, then matmuls (its fast backends "
        "-- torchao_int4, gemlite, bitblas, marlin -- are CUDA-only).  Quantizing a "
        "4096x4096 layer takes ~7-15 s on 2 cores (HQQ's iterative optimizer)."
    )
    return adapter


# ----------------------------------------------------------------------------
# onnxruntime (dynamic int8 activations x int8 weights: its MLAS integer GEMM)
# ----------------------------------------------------------------------------

def _ort_w8a8(linear: torch.nn.Linear) -> Forward:
    """onnxruntime's dynamic W8A8: a float ``MatMul`` graph quantized by its own
    ``quantize_dynamic`` (int8 weights per output channel, activations quantized per call by
    ``DynamicQuantizeLinear``, uint8), run by an ``InferenceSession`` with ``intra_op_num_threads``
    = torch's thread count, all graph optimizations (which fuse the pattern into MLAS's integer
    GEMM) and thread spinning off (see below). Compute dtype: float32 in, float32 out."""
    import os
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = linear.weight.detach().float().t().contiguous().numpy()  # (K, N)
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # its pool's threads otherwise spin after each run, taking the cores from the variants
        # timed next to it in the same round-robin (measured: every other variant 2-7x slower)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(dst, opts, providers=["CPUExecutionProvider"])

    def fn(x: torch.Tensor) -> torch.Tensor:
        xs = np.ascontiguousarray(x.detach().float().reshape(-1, k).numpy())
        y = sess.run(None, {"x": xs})[0]
        return torch.from_numpy(y).reshape(*x.shape[:-1], n).to(x.dtype)

    fn(torch.zeros(1, k))
    return fn


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------

PEERS: dict[str, Adapter] = {
    "torchao-int8": _torchao_int8_eager,
    "torchao-int8-compiled": _torchao_int8_compiled,
    "torchao-int4g64": _torchao_int4(64),
    "torchao-int4g128": _torchao_int4(128),
    "torchao-hqq-int4g64": _torchao_int4(64, "hqq"),
    "quanto-int8": _quanto_int8,
    "quanto-int4g64": _quanto_int4g64,
    "quanto-int4g128": _quanto_int4g128,
    "bnb-int8": _bnb_int8,
    "bnb-nf4g64": _bnb_4bit("nf4", 64),
    "bnb-fp4g64": _bnb_4bit("fp4", 64),
    "bnb-nf4g128": _bnb_4bit("nf4", 128),
    "hqq-int4g64": _hqq(4, 64),
    "hqq-int4g128": _hqq(4, 128),
    "hqq-int8": _hqq(8, None),
    "ort-w8a8": _ort_w8a8,
}

_PEER_OF_KEY = {"torchao": "torchao", "quanto": "optimum-quanto", "bnb": "bitsandbytes", "hqq": "hqq",
                "ort": "onnxruntime"}


def _installed(dist: str) -> bool:
    try:
        return importlib.util.find_spec(_PEER_DISTS[dist]) is not None
    except ModuleNotFoundError:  # parent package (e.g. ``optimum``) missing
        return False


def available_peers() -> dict[str, Adapter]:
    """The entries of :data:`PEERS` whose peer library is importable (checked without importing it)."""
    return {k: v for k, v in PEERS.items() if _installed(_PEER_OF_KEY[k.split("-", 1)[0]])}


def peer_versions() -> dict[str, str | None]:
    """Installed versions of torch and of each peer distribution (None if not installed).

    Reads package metadata only; does not import the peer libraries.
    """
    out: dict[str, str | None] = {"torch": torch.__version__}
    for dist in _PEER_DISTS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _sanity_check(names=None, n_iter: int = 20, threads: int = 2, size: int = 4096) -> None:
    """Error and median latency of each adapter on one random size x size layer, batch 1."""

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lin = torch.nn.Linear(size, size, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)
    x = torch.randn(1, size)
    w = lin.weight.detach()
    ref = x @ w.t()

    from lowbit.evaluate.speed import median_time

    def median_ms(f) -> float:
        return median_time(f, reps=n_iter, warmup=1) * 1e3

    print(f"{'name':22s} {'max|dy|/max|y|':>14s} {'rel-L2':>8s} {'ms':>8s}")
    print(f"{'fp32 x @ w.t()':22s} {0.0:14.4f} {0.0:8.4f} {median_ms(lambda: x @ w.t()):8.3f}")
    for name, adapter in available_peers().items():
        if names and name not in names:
            continue
        try:
            fn = adapter(lin)
            y = fn(x).float()
        except Exception as exc:  # report and go on
            print(f"{name:22s} FAILED: {type(exc).__name__}: {exc}")
            continue
        e_max = ((y - ref).abs().max() / ref.abs().max()).item()
        e_l2 = ((y - ref).norm() / ref.norm()).item()
        print(f"{name:22s} {e_max:14.4f} {e_l2:8.4f} {median_ms(lambda fn=fn: fn(x)):8.3f}", flush=True)


if __name__ == "__main__":
    import sys

    print(peer_versions())
    _sanity_check(sys.argv[1:] or None)
