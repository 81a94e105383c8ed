"""Kernel registry: for each op, the implementations that can run a quantized module.

The reference implementation of every op comes first and always works (DESIGN principle 3);
fast paths follow. Choice is explicit and inspectable: :func:`assign` records on each module the
kernel it runs (``module.kernel``) and, when a preferred fast path could not take it, why
(``module.kernel_note``); ``lowbit inspect`` prints both.

=============  ==========  ==============================================================
op             kernel      what it does
=============  ==========  ==============================================================
linear         reference   dequantize to float32, ``F.linear``
linear         cpu         packed int2/int4/int8 codes x int16 activations (CPU kernels)
linear         cpu-a8      int8 codes x per-token int8 activations (W8A8)
linear         cast        bf16/fp16 weights: the matmul runs in that dtype
linear         cpu-any     any other stored format (int3, NF4, FP8, any group size): decoded row by row
linear         float-copy  no C kernels here (no compiler): the dequantized float32 weight kept
conv2d         float-copy  the same for convolutions
conv2d         reference   dequantize to float32, ``F.conv2d``
conv2d         cpu-a8      1x1 convolutions, static int8 activations: a W8A8 GEMM over pixels
conv2d         cpu-dw-a8   depthwise convolutions, static int8 activations, integer arithmetic
embedding      reference   dequantize the gathered rows only
linear         triton      GPU: packed codes decoded in registers, GEMV / tensor-core GEMM
linear         cuda-a8     GPU: int8 codes x per-token int8 activations, ``torch._int_mm``
=============  ==========  ==============================================================

The ``cpu*`` kernels exist once per instruction set (AVX-512 VNNI, AVX2, portable C; see
:mod:`lowbit.kernels.cpu`): one is active per process, the best the CPU runs unless
``LOWBIT_ISA`` names another, and ``lowbit inspect`` says which. The former names ``cpu-vnni``
and ``cpu-vnni-a8`` are accepted for ``cpu`` and ``cpu-a8``.

Each kernel names the devices it runs on: a model moved to a GPU (``model.to("cuda")``) gets
the GPU kernels (:mod:`lowbit.kernels.triton`) or, where they cannot run (no Triton, an older
GPU), the reference kernel on the device, with the reason in ``kernel_note``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import cpu, reference, triton

__all__ = ["Kernel", "KERNELS", "kernels_for", "assign", "use_kernel", "check_kernel_name", "KernelError",
           "assign_at_first_call", "runs_on", "check_device"]


class KernelError(ValueError):
    """An unknown kernel name, or a kernel asked for a module it cannot run."""


@dataclass(frozen=True)
class Kernel:
    """One implementation of an op. ``supports(module)`` is ``None`` or the reason it cannot;
    ``layout`` is the weight layout the kernel reads ("rows" as stored, or "tiled"), and
    ``None`` means either (the reference kernels dequantize any layout); ``devices`` are the
    device types its weights may live on (``None``: any). ``interpretable`` GPU kernels also run
    CPU tensors under Triton's interpreter, when named (never chosen by "auto" there)."""

    name: str
    op: str
    run: Callable
    supports: Callable
    doc: str
    layout: str | None = None
    devices: tuple[str, ...] | None = ("cpu",)
    interpretable: bool = False


def _always(mod) -> str | None:
    return None


def _cast_only(mod) -> str | None:
    return None if mod.scheme.is_cast else "not a bf16/fp16 cast"


_ANY = None  # reference kernels are torch ops: they run wherever the tensors are

KERNELS: tuple[Kernel, ...] = (
    Kernel("reference", "linear", reference.linear, _always, "dequantize, then float32 F.linear", devices=_ANY),
    Kernel("cpu", "linear", cpu.linear, cpu.supports, "int2/4/8 codes x int16 activations", "tiled"),
    Kernel("cpu-a8", "linear", cpu.linear_a8, cpu.supports_a8, "int8 codes x per-token int8 activations (W8A8)", "tiled4"),
    Kernel("cast", "linear", reference.linear_cast, _cast_only, "matmul in the stored bf16/fp16 dtype", devices=_ANY),
    Kernel("cpu-any", "linear", cpu.linear_rows, cpu.supports_rows, "any stored format: rows decoded once per call, float dot products / tiled GEMM", "rows"),
    Kernel("float-copy", "linear", reference.linear_cached, reference.supports_cached, "no C kernels here: a float32 copy kept after the first call"),
    Kernel("reference", "conv2d", reference.conv2d, _always, "dequantize, then float32 F.conv2d", devices=_ANY),
    Kernel("float-copy", "conv2d", reference.conv2d_cached, reference.supports_cached, "no C kernels here: a float32 copy kept after the first call"),
    Kernel("cpu-a8", "conv2d", cpu.conv2d_a8, cpu.supports_conv_a8, "1x1 conv, static int8 activations: W8A8 GEMM over pixels", "tiled4"),
    Kernel("cpu-dw-a8", "conv2d", cpu.dwconv2d_a8, cpu.supports_dwconv_a8, "depthwise conv, static int8 activations, int32 sums"),
    Kernel("reference", "embedding", reference.embedding, _always, "dequantize the gathered rows", devices=_ANY),
    Kernel("triton", "linear", triton.linear, triton.supports, "GPU (Triton): packed codes decoded in registers, GEMV / GEMM",
           "rows", devices=("cuda",), interpretable=True),
    Kernel("cuda-a8", "linear", triton.linear_a8, triton.supports_a8,
           "GPU: int8 codes x per-token int8 activations (torch._int_mm)", "rows", devices=("cuda",), interpretable=True),
)

# "auto" tries these in order and takes the first that supports the module.
_AUTO_ORDER = ("cuda-a8", "triton", "cpu", "cpu-a8", "cpu-dw-a8", "cast", "cpu-any", "float-copy", "reference")
# Former names, still accepted wherever a kernel is named.
ALIASES = {"cpu-vnni": "cpu", "cpu-vnni-a8": "cpu-a8"}


def kernels_for(op: str) -> list[Kernel]:
    """The kernels registered for ``op``, reference first."""
    return [k for k in KERNELS if k.op == op]


def check_kernel_name(name: str) -> None:
    """Raise :class:`KernelError` unless ``name`` is "auto" or a registered kernel."""
    name = ALIASES.get(name, name)
    if name != "auto" and name not in {k.name for k in KERNELS}:
        names = sorted({k.name for k in KERNELS})
        raise KernelError(f"unknown kernel {name!r}; kernels: {', '.join(names)} or 'auto'")


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device``; a name torch does not know, or a device this torch or
    machine does not have (a CUDA GPU on a CPU build, ``cuda:3`` of two GPUs, ``mps``...),
    raises ``ValueError`` naming it (tried by placing an empty tensor there)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available to this torch ({torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "meta", "cuda"):
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # torch raises RuntimeError or AssertionError, by backend
            raise ValueError(f"device {device!r}: {str(e).splitlines()[0].split('. ')[0]}") from None
    return dev


def _reason(k: Kernel, mod, named: bool = False) -> str | None:
    """Why kernel ``k`` cannot run ``mod`` (its weight's device first), or ``None``. A GPU
    kernel ``named`` for a CPU weight is asked itself (Triton's interpreter may run it)."""
    dev = mod.qweight.device.type
    if k.devices is not None and dev not in k.devices and not (named and k.interpretable and dev == "cpu"):
        return f"the weight is on the {dev} device ({k.name} runs on {', '.join(k.devices)})"
    return k.supports(mod)


def _find(op: str, name: str) -> Kernel:
    name = ALIASES.get(name, name)
    for k in kernels_for(op):
        if k.name == name:
            return k
    names = sorted({k.name for k in KERNELS})
    raise KernelError(f"unknown kernel {name!r} for {op}; kernels: {', '.join(names)} or 'auto'")


def _bind(mod, k: Kernel, note: str, memo: dict | None) -> None:
    """Record kernel ``k`` on ``mod`` and give it the weight layout ``k`` reads.

    ``memo`` maps an original qweight tensor to its converted weight, so weights shared by
    several modules (a tied embedding and LM head) are converted once and stay shared.
    """
    if k.layout is not None and mod.layout != k.layout:
        key = (mod.qweight.data_ptr(), k.layout)
        qw = memo.get(key) if memo is not None else None
        if qw is None:
            qw = mod.qw.to_layout(k.layout)
            if memo is not None:
                memo[key] = qw
        mod.set_qweight(qw)
    mod.kernel, mod.kernel_note, mod._kernel_impl, mod._kernel_state = k.name, note, k.run, None


def assign(mod, prefer: str = "auto", memo: dict | None = None) -> None:
    """Choose and record the kernel for one quantized module.

    ``prefer="auto"`` takes the fastest supporting kernel; a name insists on that kernel and
    raises :class:`KernelError` if it cannot run the module.
    """
    prefer = ALIASES.get(prefer, prefer)
    mod.kernel_pref = prefer
    if prefer != "auto":
        k = _find(mod.op, prefer)
        reason = _reason(k, mod, named=True)
        if reason is not None:
            raise KernelError(f"kernel {prefer!r} cannot run this {mod.op} ({mod.scheme}): {reason}")
        _bind(mod, k, "", memo)
        return
    notes = []
    for name in _AUTO_ORDER:
        try:
            k = _find(mod.op, name)
        except KernelError:
            continue
        reason = _reason(k, mod)
        if reason is None:
            if name == "float-copy":
                notes.append(f"float32 copy of the weight kept in memory ({mod.qw.numel * 4 / 1e6:.1f} MB)")
            _bind(mod, k, "; ".join(notes), memo)
            return
        # the fast paths one would expect
        if mod.qweight.device.type == "cpu":
            relevant = ("cpu-a8", "cpu-dw-a8") if mod.scheme.act_bits else ("cpu",)
        else:
            relevant = ("cuda-a8", "triton") if mod.scheme.act_bits else ("triton",)
        if name in relevant and not mod.scheme.is_cast:
            notes.append(f"{name}: {reason}")
    raise KernelError(f"no kernel for {mod.op}")  # pragma: no cover - reference always supports


def _assign_modules(mods: list, pick: Callable) -> None:
    """Assign kernel ``pick(mod)`` to each of ``mods``: layers first, converting a weight shared
    by several of them once (``memo``), then embeddings, which adopt the converted weight of the
    layer they share theirs with, so the pair stays stored once."""
    from ..memory import trim
    from ..nn import QuantEmbedding

    memo: dict = {}
    originals = {id(m): m.qweight.data_ptr() for m in mods}
    for mod in mods:
        if not isinstance(mod, QuantEmbedding):
            layout = mod.layout
            assign(mod, pick(mod), memo)
            if mod.layout != layout:
                trim()  # the conversion's temporaries: else freed-but-resident heap piles up layer by layer
    for mod in mods:
        if isinstance(mod, QuantEmbedding):
            assign(mod, pick(mod), memo)
            shared = [qw for (ptr, _), qw in memo.items() if ptr == originals[id(mod)]]
            if shared:
                mod.set_qweight(shared[0])


def use_kernel(model: nn.Module, prefer: str = "auto") -> nn.Module:
    """(Re)assign kernels for every quantized module of ``model``; returns ``model``.

    Embeddings that share their weight with a module whose kernel changed its layout adopt the
    converted weight, so the pair stays stored once.
    """
    from ..nn import QuantModule

    check_kernel_name(prefer)
    prefer = ALIASES.get(prefer, prefer)
    mods = [m for m in model.modules() if isinstance(m, QuantModule)]

    def pick(mod) -> str:  # a named kernel applies to the ops that have it
        return prefer if any(k.name == prefer for k in kernels_for(mod.op)) else "auto"

    _assign_modules(mods, pick)
    return model


def assign_at_first_call(mod) -> None:
    """The lazy choice a module makes at its first call after a ``load_state_dict`` or a move to
    another device: its own preference (``mod.kernel_pref``), made together with the modules
    that moved with it sharing its stored weight (a tied embedding and LM head), as
    :func:`use_kernel` would."""
    peers = [m for m in (r() for r in getattr(mod, "_sharers", ())) if m is not None and m is not mod
             and m.qweight is mod.qweight and m._kernel_impl is None]  # fmt: skip
    if not peers:
        assign(mod, mod.kernel_pref)
        return
    _assign_modules([mod, *peers], lambda m: m.kernel_pref)


def runs_on(name: str, op: str, device_type: str) -> bool:
    """Whether the kernel ``name`` (or "auto") of ``op`` may run weights on ``device_type``."""
    name = ALIASES.get(name, name)
    return name == "auto" or any(k.name == name and (k.devices is None or device_type in k.devices)
                                 for k in kernels_for(op))  # fmt: skip
