"""Kernel benchmark: lowbit's quantized linear layers against torch FP32/BF16 (and peers).

Shapes (``M x K`` activations times ``K x N`` weights): batch-1 GEMV ``1x4096x4096`` and
``1x4096x11008`` (decode), and a ``512x4096x4096`` GEMM (prefill).

Honest-measurement rules (DESIGN.md, "Measuring"):

* every variant is timed in the same process, round-robin (one call of each variant per round),
  median of ``reps`` rounds, so drift of the machine's speed hits all variants alike;
* batch-1 runs rotate through enough distinct weight copies (>= 160 MiB per variant) that no
  variant is served from the 32 MiB L3 cache;
* batch-1 shapes also time a plain streaming read of the FP32 copies (torch's ``sum``) in the same
  rounds, so a GEMV's effective bandwidth is compared with what the machine delivered meanwhile;
* ``torch.set_num_threads`` is fixed and reported.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels import assign, cpu
from ..nn import QuantLinear
from ..qweight import QWeight
from ..scheme import parse_scheme
from .speed import median_time, median_times_interleaved

__all__ = ["SHAPES", "STREAM_READ", "run_kernel_bench", "KernelRow", "machine_info", "read_bandwidth"]

SHAPES = ((1, 4096, 4096), (1, 4096, 11008), (512, 4096, 4096))
STREAM_READ = "read bandwidth (torch sum)"  # batch-1 rows: the same bytes as FP32, read by a sum
ROTATE_BYTES = 160 * 2**20

Adapter = Callable[[torch.nn.Linear], Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class KernelRow:
    shape: tuple[int, int, int]
    variant: str
    seconds: float
    weight_bytes: int
    copies: int

    @property
    def label(self) -> str:
        m, k, n = self.shape
        return f"{'GEMV' if m == 1 else 'GEMM'} {m}x{k}x{n}"


def machine_info() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from ..kernels import cpu as kcpu

    return {"cpu": cpu or platform.processor(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "isa": kcpu.isa(), "isas": kcpu.available_isas()}  # fmt: skip


def _copies(nbytes: int, m: int) -> int:
    return 2 if m > 1 else max(2, math.ceil(ROTATE_BYTES / nbytes) + 1)


def _rotating(fns: list[Callable], x: torch.Tensor) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]](x)

    return call


def _quantized(linear: torch.nn.Linear, spec: str) -> QWeight:
    """``spec``: a scheme (round to nearest), or ``scheme@method`` (e.g. ``w4g64-asym@hqq``)."""
    scheme, _, method = spec.partition("@")
    if not method:
        return QWeight.from_float(linear.weight, parse_scheme(scheme))
    import copy

    from ..driver import quantize

    holder = quantize(torch.nn.Sequential(copy.deepcopy(linear)), scheme, method=method)
    return holder[0].qw.to_layout("rows")


def _lowbit_layers(linear: torch.nn.Linear, spec: str, copies: int) -> tuple[list[QuantLinear], int]:
    qw = _quantized(linear, spec)
    mods = []
    for _ in range(copies):
        q = QWeight(qw.scheme, qw.shape, qw.data.clone(), None if qw.scale is None else qw.scale.clone(),
                    None if qw.zero is None else qw.zero.clone())  # fmt: skip
        mod = QuantLinear(q, None)
        assign(mod, "auto")
        mods.append(mod)
    return mods, qw.nbytes


def read_bandwidth(mib: int = 512, reps: int = 9) -> float:
    """The machine's streaming read bandwidth in GB/s (1e9 bytes/s): bytes over the median time
    of torch's ``sum`` of a float32 tensor of ``mib`` MiB, with torch's threads."""
    t = torch.ones(mib * 2**20 // 4)
    return t.numel() * 4 / median_time(lambda: t.sum(), reps=reps, warmup=2) / 1e9


def _on_isa(isa: str | None, fn: Callable) -> Callable:
    """``fn`` run with the CPU kernels of ``isa`` active (None: whatever is active)."""
    if isa is None:
        return fn

    def call(*args):
        cpu.use_isa(isa)
        return fn(*args)

    return call


@torch.no_grad()
def run_kernel_bench(
    schemes: tuple[str, ...] = ("int8", "w4g128", "w4g64"),
    *,
    shapes: tuple[tuple[int, int, int], ...] = SHAPES,
    reps: int = 30,
    peers: dict[str, Adapter] | None = None,
    progress: Callable[[str], None] | None = None,
    isas: tuple[str, ...] | None = None,
    baselines: bool = True,
    stream: bool = True,
) -> list[KernelRow]:
    """Time FP32, BF16, lowbit ``schemes`` and ``peers`` on each shape; see the module docstring.

    ``schemes`` entries are scheme strings (round to nearest) or ``scheme@method``. ``isas``:
    run every lowbit variant once per CPU-kernel ISA named (``lowbit.kernels.cpu``; "reference"
    included), side by side; None: the active one. ``baselines=False`` leaves out torch BF16
    (FP32 always runs: ratios are taken against it). ``stream``: batch-1 shapes also time
    :data:`STREAM_READ`, a plain read of the FP32 copies, in the same rounds."""
    rows: list[KernelRow] = []
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        linear = torch.nn.Linear(k, n, bias=False)
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        x = torch.randn(m, k, generator=gen)
        r = max(5, reps // (8 if m > 1 else 1))
        fp_bytes = n * k * 4
        c = _copies(fp_bytes, m)
        fp = [linear.weight.clone() for _ in range(c)]
        variants: list[tuple[str, Callable, int, int]] = [
            ("torch fp32", _rotating([lambda x, w=w: x @ w.t() for w in fp], x), fp_bytes, c)
        ]
        if m == 1 and stream:  # the machine's read bandwidth in the same rounds: torch's sum over the FP32 copies
            variants.append((STREAM_READ, _rotating([lambda _x, w=w: w.sum() for w in fp], x), fp_bytes, c))
        bf = []
        if baselines:
            cb = _copies(fp_bytes // 2, m)
            bf = [linear.weight.to(torch.bfloat16) for _ in range(cb)]
            xb = x.to(torch.bfloat16)
            variants.append(("torch bf16", _rotating([lambda _x, w=w, xb=xb: (xb @ w.t()).float() for w in bf], x),
                             fp_bytes // 2, cb))  # fmt: skip
        active = cpu.isa()
        for s in schemes:
            for isa in isas or (None,):
                if isa is not None:
                    cpu.use_isa(isa)  # modules are assigned under the ISA they will run on
                bits = parse_scheme(s.partition("@")[0]).bits
                mods, qbytes = _lowbit_layers(linear, s, _copies(int(n * k * bits / 8), m))
                if mods[0].kernel == "float-copy":  # no C kernels: each copy holds float32 after one call
                    mods = mods[: _copies(fp_bytes, m)]
                    for mod in mods:
                        mod(x)
                kern = mods[0].kernel
                if kern.startswith("cpu"):
                    kern = f"{kern}/{cpu.isa()}"
                variants.append((f"lowbit {s} ({kern})", _on_isa(isa, _rotating(mods, x)), qbytes, len(mods)))
        if isas:
            cpu.use_isa(active)
        for name, adapter in (peers or {}).items():
            try:
                probe = adapter(linear)
                cp = _copies(n * k, m) if m == 1 else 2
                fns = [probe] + [adapter(linear) for _ in range(cp - 1)]
            except Exception as e:  # a peer that fails here is reported, not fatal
                if progress:
                    progress(f"peer {name} failed on {m}x{k}x{n}: {e}")
                continue
            variants.append((name, _rotating(fns, x), -1, len(fns)))
        if progress:
            progress(f"{m}x{k}x{n}: {', '.join(v[0] for v in variants)}")
        times = median_times_interleaved([v[1] for v in variants], reps=r)
        if isas:
            cpu.use_isa(active)
        for (label, _, nbytes, copies), t in zip(variants, times):
            rows.append(KernelRow((m, k, n), label, t, nbytes, copies))
        del fp, bf, variants
    return rows
