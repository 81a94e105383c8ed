"""ONNX export (ONNX Runtime): a lowbit model as an ONNX graph whose quantized layers are ONNX
Runtime's quantized operators reading lowbit's own codes and scales.

Layer by layer (``../shared/notes/exports.md`` section 3; ONNX Runtime ``docs/ContribOperators.md``
and the ONNX operator documents for DequantizeLinear / QuantizeLinear):

* **Linear, weight-only int2 / int3 / int4 / int8** -> ``com.microsoft.MatMulNBits``: ``B`` uint8
  ``(N, k_blocks, block_size * bits / 8)`` packed along K, first element in the low bits (lowbit's
  row packing, cut into blocks); ``scales`` float32 ``(N, k_blocks)``; ``zero_points`` uint8 packed
  ``(N, ceil(k_blocks * bits / 8))`` for asymmetric weights (absent for symmetric ones: the
  operator's default zero point ``2^(bits-1)`` is lowbit's implicit one), float32 ``(N, k_blocks)``
  for HQQ's fractional zero points. ``block_size`` is lowbit's group size when it is a power of two
  from 16 to 128, else the largest such power dividing it (the scale repeated per block); a
  per-channel or per-tensor scale is repeated over blocks of 128. 3-bit codes are stored as 4-bit
  (``bits = 4`` with an explicit zero point: ``4`` symmetric, ``z`` asymmetric), so 4 bits a weight.
  Dequantization ``(q - z) * s`` in float32: lowbit's values bit for bit (``accuracy_level = 1``;
  ``4`` makes ONNX Runtime quantize the activations to int8 per block: faster, not exact).
* **Linear with dynamic int8 activations** (``w8a8``, ``w4a8`` ...) -> the same MatMulNBits with
  ``accuracy_level = 4``: the weights exact, the activations rounded by ONNX Runtime (int8 per
  block of K) rather than lowbit's per token.
* **Static activations** (``w8a8-static``: calibrated int8 scale and zero point on the input) ->
  a QDQ graph: ``QuantizeLinear -> DequantizeLinear`` on the input, ``DequantizeLinear`` on the
  int8 weight (``q - 128``, zero point 0; asymmetric weights as uint8 with their zero points), per
  output channel, into ``MatMul`` / ``Conv``, the pattern ONNX Runtime fuses to integer kernels.
  ONNX's QuantizeLinear saturates at -128, lowbit at -127: a ``Clip`` at the -127 step before
  QuantizeLinear makes the graph round exactly as lowbit does. A Conv whose only consumer is a
  chain of Relu / Clip / MaxPool / Reshape ending in the next layer's QuantizeLinear also gets that
  QuantizeLinear -> DequantizeLinear on its own output (:func:`_quantize_conv_outputs`: the same
  rounding, moved ahead of operators that commute with it), so ONNX Runtime fuses it to
  ``QLinearConv`` with int8 in and out; without it the convolution stays float on dequantized
  values. The -127-step ``Clip`` is dropped where a
  ReLU / ReLU6 before it already bounds the values from below (an identity there).
* **Conv2d, weight-only int8 per channel** -> ``DequantizeLinear`` on the weight into ``Conv``.
* **Embedding int2 / int3 / int4 / int8** -> ``com.microsoft.GatherBlockQuantized`` (uint8 data in
  MatMulNBits' conventions, ``quantize_axis = 1``; 2- and 3-bit codes stored 4-bit with explicit
  zero points); a head tied to it reads the same initializers.
* **float16 / bfloat16** weights are stored in their type and cast to float32 (exact weights; lowbit
  also rounds these layers' inputs and outputs to the half type).

Anything else (nf4, fp8, groups with no power-of-two block from 16, other convolutions) has no exact
ONNX Runtime operator here: a Linear layer is requantized to a named scheme (default ``w8``) with
the added error reported, any other layer is written as its dequantized float32 weight (lowbit's
values, float size), or, with ``exact=True``, requantization is refused by name.

The graph is traced with ``torch.onnx.export(dynamo=True)`` (quantized layers swapped for export
modules that emit the operators through ``torch.onnx.ops.symbolic``), dynamic batch and sequence
dimensions; a transformers decoder maps ``input_ids -> logits`` (no KV cache), an encoder
``input_ids, attention_mask -> last_hidden_state``, any other model ``input -> output``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..files import temp_dir_beside
from .report import ExportEntry, ExportReport, check_finite, check_output_file, refusals, requantize_weight

__all__ = ["ONNXExportError", "export_onnx", "onnx_mapping", "pack_blocks"]

MS = "com.microsoft"
MAX_BLOCK = 128  # ONNX Runtime 1.26 returned zeros for block_size 512 on its CPU EP (onnxruntime#28551)
FLOAT_LIMIT = 2_000_000_000  # protobuf's 2 GiB: larger graphs keep their tensors in a .data file


class ONNXExportError(ValueError):
    """A model or option the ONNX export cannot serve."""


# ---- the mapping table ------------------------------------------------------------------------
def _pow2_block(qw) -> int | None:
    """MatMulNBits / GatherBlockQuantized block size for ``qw``'s grouping, or None: the largest
    power of two from 16 to ``MAX_BLOCK`` that lies within one of lowbit's groups and divides the
    row (whole blocks, which GatherBlockQuantized needs and a head tied to it shares); a row no
    such block divides is padded to whole blocks (MatMulNBits only)."""
    s = qw.scheme
    whole_row = s.group_size is None or s.per_tensor or s.group_size >= qw.cols
    top = min(MAX_BLOCK, 1 << (qw.cols - 1).bit_length()) if whole_row else min(s.group_size & -s.group_size, MAX_BLOCK)
    if top < 16:
        return None
    b = top
    while b >= 16 and qw.cols % b:
        b //= 2
    return b if b >= 16 else max(16, top)


def onnx_mapping(qw, kind: str) -> tuple[str | None, str]:
    """The ONNX Runtime operator that reads :class:`lowbit.qweight.QWeight` ``qw`` of a layer of
    ``kind`` (``"linear"``, ``"conv2d"``, ``"embedding"``) exactly: ``"MatMulNBits"``, ``"QDQ"``,
    ``"DequantizeLinear"``, ``"GatherBlockQuantized"``, ``"Cast"``, or ``(None, reason)``."""
    s, fmt = qw.scheme, qw.scheme.fmt
    if s.is_cast:
        return "Cast", ""
    if fmt.kind != "affine":
        return None, f"{fmt.name}: no ONNX Runtime CPU operator reads this format"
    bits = fmt.bits
    if s.act_static:
        if kind == "embedding" or bits != 8 or s.group_size is not None:
            return None, "QDQ here holds static activations with int8 weights per channel or tensor"
        return "QDQ", ""
    if kind == "conv2d":
        if bits != 8 or s.group_size is not None or s.act_bits:
            return None, "ONNX Runtime has no weight-only quantized convolution below 8 bits or with groups"
        return "DequantizeLinear", ""
    block = _pow2_block(qw)
    if block is None:
        return None, f"groups of {s.group_size} hold no power-of-two block of 16 or more"
    if kind == "embedding":
        if qw.zero is not None and qw.zero.dtype != torch.uint8:
            return None, "GatherBlockQuantized takes integer zero points (HQQ's are fractional)"
        return "GatherBlockQuantized", ""
    return "MatMulNBits", ""


def pack_blocks(codes: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """``(N, K)`` uint8 codes -> uint8 ``(N, k_blocks, block * bits / 8)``, K padded with code 0 to
    whole blocks, ``8 / bits`` codes a byte, the first in the low bits (MatMulNBits' ``B``: lowbit's
    own row packing, :func:`lowbit.packing.pack`, of the padded rows, cut into blocks)."""
    from .. import packing

    n, k = codes.shape
    kb = -(-k // block)
    padded = F.pad(codes.to(torch.uint8), (0, kb * block - k))
    return packing.pack(padded, bits).reshape(n, kb, block * bits // 8)


def _pack_zero_points(zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zero points ``(N, k_blocks)`` -> uint8 ``(N, ceil(k_blocks * bits / 8))``, packed
    like the codes (the layout MatMulNBits and GatherBlockQuantized take)."""
    per = 8 // bits
    return pack_blocks(zp.to(torch.uint8), bits, per * -(-zp.shape[1] // per)).reshape(zp.shape[0], -1)


def _block_params(qw, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales float32 ``(N, k_blocks)`` and zero points (``(N, k_blocks)`` float32, integral or
    not; None for symmetric) repeated from lowbit's groups onto blocks of ``block``."""
    kb = -(-qw.cols // block)
    col = torch.arange(kb) * block  # first column of each block
    g = qw.cols if qw.scheme.group_size is None or qw.scheme.per_tensor else qw.scheme.group_size
    idx = (col // g).clamp(max=qw.n_groups - 1)
    scales = qw.scales().expand(qw.rows, -1)[:, idx].contiguous()
    zp = qw.zero_points()
    return scales, (None if zp is None else zp.expand(qw.rows, -1)[:, idx].contiguous())


def _blocks(qw, obits: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``qw``'s codes as ``obits``-bit blocks (MatMulNBits' and GatherBlockQuantized's layout):
    the block size, packed data ``(N, k_blocks, block * obits / 8)``, float32 scales ``(N,
    k_blocks)`` and zero points (packed uint8, or float32 for HQQ's fractional ones; None when
    the operator's default ``2^(obits-1)`` is lowbit's). Narrower codes stored wider keep their
    values: symmetric ones get their own midpoint as an explicit zero point, so it is exact."""
    bits = qw.scheme.fmt.bits
    block = _pow2_block(qw)
    scales, zp = _block_params(qw, block)
    if obits != bits and zp is None:
        zp = torch.full_like(scales, float(qw.scheme.fmt.sym_zero))
    if zp is not None and (qw.zero is None or qw.zero.dtype == torch.uint8):
        zp = _pack_zero_points(zp, obits)
    return block, pack_blocks(qw.codes(), obits, block), scales, zp


def _matmul_nbits_tensors(qw, obits: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``B``, ``scales`` and (when needed) ``zero_points`` of MatMulNBits for ``qw``; the
    attributes. 3-bit codes are stored 4-bit (MatMulNBits takes 2, 4 and 8), or ``obits``."""
    bits = qw.scheme.fmt.bits
    obits = obits or (4 if bits == 3 else bits)
    block, b, scales, zp = _blocks(qw, obits)
    t = {"B": b, "scales": scales} | ({} if zp is None else {"zero_points": zp})
    return t, {"K": qw.cols, "N": qw.rows, "bits": obits, "block_size": block}


# ---- export modules: what the tracer sees in place of lowbit's ---------------------------------
def _sym(op: str, inputs, attrs: dict, dtype, shape):
    return torch.onnx.ops.symbolic(op, tuple(inputs), attrs, dtype=dtype, shape=shape,
                                   version=1 if op.startswith(MS) else None)  # fmt: skip


class _MatMulNBits(nn.Module):
    def __init__(self, t: dict, attrs: dict, bias, accuracy_level: int, tied: nn.Module | None = None):
        super().__init__()
        self.attrs = dict(attrs, accuracy_level=accuracy_level)
        self.blob_shape = tuple(t["B"].shape)
        # A head tied to a GatherBlockQuantized embedding holds that module itself (one module
        # under two parents: its initializers are written once) and reads its 2-D data.
        self.tied = tied
        self.register_buffer("B", None if tied is not None else t["B"])
        self.register_buffer("scales", None if tied is not None else t["scales"])
        self.register_buffer("zero_points", None if tied is not None else t.get("zero_points"))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x):
        src = self.tied if self.tied is not None else self
        b = src.B if self.tied is None else src.data.reshape(self.blob_shape)
        ins = [x.float(), b, src.scales] + ([src.zero_points] if src.zero_points is not None else [])
        y = _sym(f"{MS}::MatMulNBits", ins, self.attrs, torch.float32, (*x.shape[:-1], self.attrs["N"]))
        return y if self.bias is None else y + self.bias


class _GatherBlockQuantized(nn.Module):
    def __init__(self, data, scales, zp, attrs: dict, dim: int):
        super().__init__()
        self.attrs, self.dim = attrs, dim
        # parameters, not buffers: torch.export writes a parameter shared by two modules once
        self.data = nn.Parameter(data, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.register_buffer("zero_points", zp)

    def forward(self, idx):
        ins = [self.data, idx, self.scales] + ([self.zero_points] if self.zero_points is not None else [])
        return _sym(f"{MS}::GatherBlockQuantized", ins, self.attrs, torch.float32, (*idx.shape, self.dim))


def _dq(q, scale, zp, axis: int | None, shape):
    attrs = {} if axis is None else {"axis": axis}
    return _sym("DequantizeLinear", [q, scale, zp], attrs, torch.float32, shape)


def _int8_weight(qw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """DequantizeLinear's ``(x, x_scale, x_zero_point)`` for an 8-bit weight ``(N, K)``: int8 ``q -
    128`` with zero point 0 (symmetric) or uint8 codes with their zero points, float32 scales, per
    output channel (``(N,)``) or one (``()``); and whether it is per channel."""
    codes = qw.codes().to(torch.int16)
    zp = qw.zero_points()
    per_axis = not qw.scheme.per_tensor
    shape = (qw.rows,) if per_axis else ()
    if zp is None:
        w, z = (codes - 128).to(torch.int8), torch.zeros(shape, dtype=torch.int8)
    else:
        w, z = codes.to(torch.uint8), zp.reshape(-1)[: qw.rows if per_axis else 1].reshape(shape).to(torch.uint8)
    return w, z, qw.scales().reshape(-1)[: qw.rows if per_axis else 1].reshape(shape).float(), per_axis


class _QDQ(nn.Module):
    """Static activations (Q -> DQ on the input) and/or an int8 weight through DQ, into MatMul or
    Conv: the QDQ pattern ONNX Runtime fuses to its integer kernels."""

    def __init__(self, mod, qw, act: bool):
        super().__init__()
        self.conv = mod.op == "conv2d"
        w, z, s, self.per_axis = _int8_weight(qw)
        if self.conv:
            self.wshape, self.axis = tuple(mod.weight_shape), 0
            w = w.reshape(self.wshape)
            self.conv_args = (mod.stride, mod.padding, mod.dilation, mod.groups)
        else:  # MatMul's B is (K, N): the output channels are axis 1
            self.wshape, self.axis = (qw.cols, qw.rows), 1
            w = w.t().contiguous()
        if self.per_axis:
            # a channel of zero weights (codes at the zero point) is zero at any scale: give it a
            # usual one, as ONNX Runtime divides the bias by input scale x weight scale into int32
            empty = (w.reshape(w.shape[0], -1) if self.conv else w.t()).eq(z.reshape(-1, 1).to(w.dtype)).all(1)
            if bool(empty.any()):
                s = torch.where(empty, s[~empty].max() if bool((~empty).any()) else torch.ones(()), s)
        self.register_buffer("w", w)
        self.register_buffer("w_scale", s)
        self.register_buffer("w_zero", z)
        self.register_buffer("a_scale", mod.act_scale.detach().float().reshape(()) if act else None)
        self.register_buffer("a_zero", mod.act_zero.detach().to(torch.int8).reshape(()) if act else None)
        # lowbit saturates at -127, QuantizeLinear at -128: clip to the -127 step first (exact:
        # lo / scale rounds to -127 - zero)
        self.a_min = float((-127 - mod.act_zero.float()) * mod.act_scale.float()) if act else None
        self.register_buffer("bias", None if mod.bias is None else mod.bias.detach().float())
        # ONNX Runtime's integer convolution takes the bias as int32 in steps of input scale x
        # weight scale; where a step that small would overflow int32, the bias is added after the
        # convolution instead (which then stays float: exact, not fused)
        self.bias_after = False
        if self.conv and act and self.bias is not None:
            steps = self.bias.abs() / (self.a_scale * s.reshape(-1)).clamp_min(torch.finfo(torch.float32).tiny)
            self.bias_after = bool((steps >= 2**30).any())

    def forward(self, x):
        x = x.float()
        if self.a_scale is not None:
            x = torch.clamp(x, min=self.a_min)
            q = _sym("QuantizeLinear", [x, self.a_scale, self.a_zero], {}, torch.int8, x.shape)
            x = _dq(q, self.a_scale, self.a_zero, None, x.shape)
        wd = _dq(self.w, self.w_scale, self.w_zero, self.axis if self.per_axis else None, self.wshape)
        if self.conv:
            stride, padding, dilation, groups = self.conv_args
            if self.bias_after:
                return F.conv2d(x, wd, None, stride, padding, dilation, groups) + self.bias.reshape(1, -1, 1, 1)
            return F.conv2d(x, wd, self.bias, stride, padding, dilation, groups)
        y = torch.matmul(x, wd)
        return y if self.bias is None else y + self.bias


class _Float(nn.Module):
    """A weight stored as a float tensor (float16 / bfloat16 as lowbit holds it, or lowbit's
    dequantized float32 values), widened to float32 in the graph."""

    def __init__(self, mod, w: torch.Tensor):
        super().__init__()
        self.op = mod.op
        self.register_buffer("w", w)
        self.register_buffer("bias", None if mod.bias is None else mod.bias.detach().float())
        if self.op == "conv2d":
            self.conv_args = (mod.stride, mod.padding, mod.dilation, mod.groups)

    def forward(self, x):
        w = self.w.float()
        if self.op == "embedding":
            return F.embedding(x, w)
        if self.op == "conv2d":
            return F.conv2d(x.float(), w, self.bias, *self.conv_args)
        return F.linear(x.float(), w, self.bias)


# ---- graph inputs and outputs -------------------------------------------------------------------
class _CausalLM(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


class _Encoder(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask)[0]


def _io(model: nn.Module, example_inputs):
    """(wrapper, example args, input names, output names, dynamic shapes)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=2, max=1 << 16)
    is_hf = hasattr(model, "config") and hasattr(model, "get_input_embeddings")
    if example_inputs is None and is_hf:
        ids = torch.arange(3, 19).reshape(2, 8) % max(4, int(getattr(model.config, "vocab_size", 16) or 16))
        if type(model).__name__.endswith("ForCausalLM"):
            return _CausalLM(model), (ids,), ["input_ids"], ["logits"], ({0: batch, 1: seq},)
        # a bare encoder (BertModel) returns hidden states; one with a task head (...For...) logits
        out = "last_hidden_state" if type(model).__name__.endswith("Model") else "logits"
        return (_Encoder(model), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], [out],
                ({0: batch, 1: seq}, {0: batch, 1: seq}))  # fmt: skip
    if example_inputs is None:
        raise ONNXExportError(f"{type(model).__name__} is not a transformers model: give example_inputs (a tensor or a "
                              "tuple of tensors with a batch dimension first; CLI --input-shape)")  # fmt: skip
    xs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    xs = tuple(x.expand(2, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x for x in xs)  # batch 1 would be fixed
    names = ["input"] if len(xs) == 1 else [f"input_{i}" for i in range(len(xs))]
    return model, xs, names, ["output"], tuple({0: batch} for _ in xs)


# ---- the writer ---------------------------------------------------------------------------------
def _no_initializer_copies(node) -> bool | None:
    """Constant folding, except a Reshape of a stored tensor (a tied head's view of its
    embedding's codes): folded, it would be written twice."""
    if node.op_type == "Reshape" and node.inputs and node.inputs[0] is not None and node.inputs[0].is_initializer():
        return False
    return None


def _tidy(model) -> None:
    """The exported graph (an ``onnx_ir`` model), cleaned in place: functions inlined, constants
    folded (see :func:`_no_initializer_copies`), unused nodes dropped, equal initializers and
    subexpressions merged, quantized convolutions' outputs rounded where ONNX Runtime can then
    fuse them (:func:`_quantize_conv_outputs`). onnxscript's pattern rewriter (torch.onnx's
    ``optimize=True``) is left out: it took two thirds of SmolLM2's export for rewrites ONNX Runtime makes itself at load."""
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants_ir

    passes.InlinePass()(model)
    fold_constants_ir(model, onnx_shape_inference=True, should_fold=_no_initializer_copies)
    for p in (passes.RemoveUnusedNodesPass(), passes.RemoveUnusedFunctionsPass(), passes.RemoveUnusedOpsetsPass(),
              passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              passes.DeduplicateInitializersPass(), passes.CommonSubexpressionEliminationPass()):  # fmt: skip
        p(model)
    if _drop_redundant_clips(model.graph) + _quantize_conv_outputs(model.graph):
        passes.RemoveUnusedNodesPass()(model)  # a dropped Clip's bound
    passes.NameFixPass()(model)


def _const(value) -> float | None:
    """A scalar constant input's value (None for an absent input or one computed in the graph)."""
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


def _drop_redundant_clips(graph) -> int:
    """Remove each ``Clip`` with only a lower bound whose input comes from a ``Relu`` or ``Clip``
    with a lower bound at least as high (lowbit's -127-step clamp after a ReLU6: an identity).
    ``graph`` is an ``onnx_ir`` graph, edited in place; returns the number removed."""
    removed = 0
    for node in list(graph):
        if node.op_type != "Clip" or len(node.inputs) < 2 or (len(node.inputs) > 2 and node.inputs[2] is not None):
            continue
        lo, src = _const(node.inputs[1]), node.inputs[0].producer()
        if lo is None or src is None or node.outputs[0].is_graph_output():
            continue
        lo_src = None
        if src.op_type == "Relu":
            lo_src = 0.0
        elif src.op_type == "Clip" and len(src.inputs) > 1:
            lo_src = _const(src.inputs[1])
        if lo_src is not None and lo_src >= lo:
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
            removed += 1
    return removed


# Operators that commute with rounding to an int8 grid: for a non-decreasing rounding ``Q``,
# ``Q(max(a, b)) = max(Q(a), Q(b))`` (so Relu, Clip with any bounds, MaxPool), and data movement.
# Each takes the data as its input 0.
_COMMUTE_WITH_Q = frozenset({"Relu", "Clip", "MaxPool", "Reshape", "Flatten"})


def _quantize_conv_outputs(graph) -> int:
    """Add ``QuantizeLinear -> DequantizeLinear`` on the output of each quantized Conv whose value
    reaches only the next layer's QuantizeLinear through Relu / Clip / MaxPool / Reshape / Flatten
    nodes, with that QuantizeLinear's scale and zero point; ONNX Runtime then fuses the Conv to
    ``QLinearConv`` (int8 output) instead of a float convolution. Exact: each of those operators
    is a max, a min or a data movement, which commute with a non-decreasing rounding ``Q``, and
    ``Q(DQ(Q(v))) = Q(v)``; so ``Q(f(DQ(Q(v)))) = Q(f(v))``. ``graph`` is an ``onnx_ir`` graph,
    edited in place; returns the number of convolutions changed. (ONNX Runtime's
    ``quantize_static`` writes the same pattern from its own calibration; here the scale is lowbit's.)"""
    import onnx_ir as ir

    def only_consumer(value):
        uses = list(value.uses())
        return None if value.is_graph_output() or len(uses) != 1 else uses[0]

    changed = 0
    for node in list(graph):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        if any(v is None or v.producer() is None or v.producer().op_type != "DequantizeLinear" for v in node.inputs[:2]):
            continue
        out = node.outputs[0]
        first = use = only_consumer(out)
        n_chain = 0
        while use is not None and use[0].op_type in _COMMUTE_WITH_Q and use[1] == 0 and len(use[0].outputs) == 1:
            n_chain += 1
            use = only_consumer(use[0].outputs[0])
        if not n_chain or use is None or use[0].op_type != "QuantizeLinear" or use[1] != 0:
            continue
        quant = use[0]
        scale, zero = quant.inputs[1], quant.inputs[2] if len(quant.inputs) > 2 else None
        if _const(scale) is None or _const(zero) is None:
            continue
        q = ir.Node("", "QuantizeLinear", [out, scale, zero], num_outputs=1)
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale, zero], num_outputs=1)
        graph.insert_after(node, [q, dq])
        first[0].replace_input_with(first[1], dq.outputs[0])
        changed += 1
    return changed


def _half_dtypes(model: nn.Module) -> list[str]:
    """Half-precision dtypes the model's float (unquantized) tensors are in; a quantized module's
    stored codes and float16 scales are a format, not the dtype the model computes in."""
    from ..nn import QuantModule

    found = set()
    for m in model.modules():
        if isinstance(m, QuantModule):
            continue
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t is not None and t.dtype in (torch.float16, torch.bfloat16):
                found.add(str(t.dtype).replace("torch.", ""))
    return sorted(found)


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception's message (the tracer's own complaint, not the
    exporter's wrapping of it), without terminal colour codes."""
    import re

    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _nbytes(m: nn.Module) -> int:
    """Bytes of a module's stored tensors (buffers and parameters, each once)."""
    seen = {id(t): t for t in [*m.buffers(), *m.parameters()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


@contextlib.contextmanager
def _swapped(model: nn.Module, swaps: dict[str, nn.Module]):
    from ..driver import _set_module

    old = {name: model.get_submodule(name) for name in swaps}
    try:
        for name, new in swaps.items():
            _set_module(model, name, new)
        yield
    finally:
        for name, mod in old.items():
            _set_module(model, name, mod)


def _plan(model: nn.Module, exact: bool, target, accuracy_level: int):
    """Export modules by name, and the report's entries."""
    from ..nn import QuantModule

    swaps: dict[str, nn.Module] = {}
    entries: list[ExportEntry] = []
    refused: list[str] = []
    shared: dict[int, _GatherBlockQuantized] = {}  # qweight storage -> the embedding written for it
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]
    # embeddings first, so a head tied to one finds its initializers
    for name, mod in sorted(mods, key=lambda nm: nm[1].op != "embedding"):
        qw, kind = mod.qw.to_layout("rows"), mod.op
        op, why = onnx_mapping(qw, kind)
        if op == "GatherBlockQuantized" and qw.cols % _pow2_block(qw):
            op, why = None, "GatherBlockQuantized needs whole blocks per row"
        rec = ExportEntry(name, name, op or "", "exact", str(mod.scheme))
        if op is None and kind == "linear" and target is not None:
            if exact:
                refused.append((name, str(mod.scheme), why))
                continue
            qw, rec.rel_rms_error = requantize_weight(qw, target)
            op, rec.target, rec.mapping = "MatMulNBits", f"MatMulNBits ({target})", "requantized"
        if op == "MatMulNBits":
            emb = shared.get(mod.qweight.data_ptr())
            t, attrs = _matmul_nbits_tensors(qw, emb.attrs["bits"] if emb is not None else None)
            if qw.scheme.act_bits and accuracy_level not in (None, 4):
                raise ONNXExportError(f"{name} ({qw.scheme}) quantizes its activations dynamically to int8, which "
                                      f"MatMulNBits does at accuracy_level 4; accuracy_level={accuracy_level} "
                                      "(CLI --accuracy-level) would run it on float activations")  # fmt: skip
            level = 4 if qw.scheme.act_bits else (1 if accuracy_level is None else accuracy_level)
            if level > 1:
                rec.mapping = "weights exact"  # the activations are rounded by ONNX Runtime (level 4: int8 per block)
            if emb is not None and emb.attrs["block_size"] == attrs["block_size"] and attrs["bits"] == emb.attrs["bits"]:
                new = _MatMulNBits(t, attrs, mod.bias, level, tied=emb)
                rec.target = "MatMulNBits (tied to the embedding)"
            else:
                new = _MatMulNBits(t, attrs, mod.bias, level)
        elif op == "GatherBlockQuantized":
            bits = 8 if qw.scheme.fmt.bits == 8 else 4  # 2- and 3-bit codes stored 4-bit, exact
            block, data, scales, zp = _blocks(qw, bits)
            data = data.reshape(qw.rows, -1)
            attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}
            new = _GatherBlockQuantized(data, scales, zp, attrs, qw.cols)
            shared[mod.qweight.data_ptr()] = new
        elif op in ("QDQ", "DequantizeLinear"):
            new = _QDQ(mod, qw, act=op == "QDQ")
        elif op == "Cast":
            new = _Float(mod, qw.data.reshape(mod.weight_shape))
        else:
            if exact and kind == "linear":
                refused.append((name, str(mod.scheme), why))
                continue
            new = _Float(mod, qw.dequantize(torch.float32).reshape(mod.weight_shape))
            rec.target, rec.mapping, rec.why = "float32", "dequantized", why
        rec.nbytes = _nbytes(new) - (0 if getattr(new, "bias", None) is None else new.bias.numel() * 4)
        if getattr(new, "tied", None) is not None:
            rec.nbytes -= _nbytes(new.tied)  # the embedding's tensors, counted there
        swaps[name] = new
        entries.append(rec)
    if refused:
        raise ONNXExportError("these layers have no exact ONNX Runtime operator (exact=True, CLI --exact): "
                              + refusals(refused))  # fmt: skip
    return swaps, entries


def export_onnx(model: nn.Module, path: str | os.PathLike, *, exact: bool = False, requantize: str | None = "w8",
                accuracy_level: int | None = None, example_inputs=None, overwrite: bool = False) -> ExportReport:  # fmt: skip
    """Write a lowbit-quantized (or float) model as an ONNX graph that ONNX Runtime runs with its
    quantized operators on lowbit's codes (see the module docstring for the layer mappings).

    Args:
        model: a model quantized by :func:`lowbit.quantize` (or loaded with :func:`lowbit.load`), or a
            float one. transformers decoders are traced as ``input_ids (batch, sequence) int64 ->
            logits (batch, sequence, vocab) float32`` without a KV cache; transformers encoders as
            ``input_ids, attention_mask -> last_hidden_state``; other models need ``example_inputs``.
        path: the ``.onnx`` file to write (a graph over 2 GB keeps its tensors in ``path.data``).
        exact: refuse Linear layers with no exact ONNX Runtime operator (named in the error) instead
            of requantizing them.
        requantize: the lowbit scheme such layers become (its MatMulNBits, the added error reported
            per layer), default ``"w8"``; ``None`` writes their dequantized float32 weights.
        accuracy_level: MatMulNBits' ``accuracy_level`` for weight-only layers, as ONNX Runtime
            defines it (0 unset, 1 float32, 2 float16, 3 bfloat16, 4 int8): 1 (float32 arithmetic
            on lowbit's exact weights) by default (None); 4 makes ONNX Runtime round the activations
            to int8 per block (faster; such layers are reported "weights exact"). Layers with
            dynamic int8 activations use 4 (an explicit other level is refused for them).
        example_inputs: a tensor or tuple of tensors, batch first (the batch dimension is exported
            dynamic).
        overwrite: replace an existing file at ``path`` (otherwise ``FileExistsError``).

    Returns an :class:`~lowbit.io.report.ExportReport`, one entry per quantized module (operator,
    mapping ``exact`` / ``weights exact`` / ``requantized`` with its error / ``dequantized``: a
    convolution or embedding with no operator here, written as lowbit's float32 values, exact
    but float-sized, and not refused by ``exact``; bytes of its initializers). Raises ``ONNXExportError`` for ``exact`` refusals, a model that
    needs ``example_inputs``, a ``requantize`` scheme with no MatMulNBits form or a graph the
    exporter cannot trace; ``ValueError`` for a bad ``accuracy_level`` or scheme string;
    ``FileExistsError`` for an existing ``path`` without ``overwrite`` or a directory; ``OSError``
    for write errors. Nothing is left half-written and the model is left as it was.
    """
    from ..scheme import parse_scheme

    if accuracy_level is not None and (isinstance(accuracy_level, bool) or accuracy_level not in (0, 1, 2, 3, 4)):
        raise ValueError(f"accuracy_level must be an int 0-4 (MatMulNBits), got {accuracy_level!r}")
    target = None
    if requantize is not None:
        target = parse_scheme(requantize)
        from ..qweight import QWeight

        op, why = onnx_mapping(QWeight.from_float(torch.zeros(1, 64), target), "linear")
        if op != "MatMulNBits":
            raise ONNXExportError(f"requantize={requantize!r} (CLI --requantize: a lowbit scheme) has no MatMulNBits form: "
                                  f"{why or 'not a weight-only integer scheme'}")  # fmt: skip
    path = Path(path)
    data_path = path.with_name(f"{path.name}.data")  # where a graph over 2 GB keeps its tensors
    check_output_file(path, overwrite, "model.onnx", data_path)
    half = _half_dtypes(model)
    if half:
        raise ONNXExportError(f"the model computes in {', '.join(half)}; the graph is float32 (ONNX Runtime's CPU "
                              "kernels lack half-precision versions of most operators): call model.float() first "
                              "(lowbit's codes and scales keep their types)")  # fmt: skip
    for pname, t in [*model.named_parameters(), *model.named_buffers()]:
        check_finite(pname, t.detach())
    swaps, entries = _plan(model, exact, target, accuracy_level)
    wrapper, args, in_names, out_names, dyn = _io(model, example_inputs)
    was_training = model.training
    model.eval()
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._export",
                                            "torch._dynamo", "torch.fx", "torch._subclasses")]  # fmt: skip
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.CRITICAL)
        with _swapped(model, swaps), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                prog = torch.onnx.export(wrapper, args, dynamo=True, input_names=in_names, output_names=out_names,
                                         dynamic_shapes=dyn, verbose=False, optimize=False)  # fmt: skip
                _tidy(prog.model)
            except Exception as e:  # the exporter's own error types, wrapping the tracer's
                hint = ("; check that example_inputs (CLI --input-shape) is an input the model takes"
                        if example_inputs is not None else "")  # fmt: skip
                raise ONNXExportError(f"torch.onnx could not trace {type(model).__name__}: {_root_cause(e)}{hint}") from e
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
        model.train(was_training)
    big = sum(_nbytes(m) for m in swaps.values()) + sum(p.numel() * p.element_size() for p in model.parameters()) > FLOAT_LIMIT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = temp_dir_beside(path)
        with contextlib.redirect_stdout(io.StringIO()):
            prog.save(str(tmp / path.name), external_data=big)
        from .writer import _permissions

        _check_runs(tmp / path.name, example_inputs is not None)
        _permissions(tmp)
        files = [f for f in (tmp / data_path.name, tmp / path.name) if f.exists()]
        nbytes = sum(f.stat().st_size for f in files)
        for f in files:  # the tensors first: the graph that names them lands last
            os.replace(f, path.with_name(f.name))
        if len(files) == 1:
            data_path.unlink(missing_ok=True)  # an earlier export's tensors, not this graph's
    except OSError as e:
        raise OSError(e.errno, f"writing {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(path, nbytes, entries)


def _check_runs(graph: Path, user_shape: bool) -> None:
    """Load the written graph into an ONNX Runtime session (its shape inference checks every
    operator's inputs) before it takes the target's name; ``ONNXExportError`` with ONNX Runtime's
    reason when it refuses. Skipped when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
        msg = str(e).strip().splitlines()[-1][:400]
        hint = " (is the input shape, CLI --input-shape, one the model takes?)" if user_shape else ""
        raise ONNXExportError(f"ONNX Runtime rejects the exported graph{hint}: {msg}") from None
