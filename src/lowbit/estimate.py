"""Memory calculator: what a model's weights take in each format, scales and zeros included.

Bits per weight of a scheme on rows of ``K`` input columns, group size ``G``:
``bits + 16 * ceil(K/G) / K`` (fp16 scales) ``+ bits * ceil(K/G) / K`` (packed zero points,
asymmetric only). Per-channel schemes carry one scale per row (``16 / K``); when ``K`` is not
known the group term uses ``K -> infinity`` for per-channel and ``K = multiple of G`` for
groups. Weights only: activations, KV cache and runtime buffers are not included.

The common "70B needs 140 GB" figure is FP16 (2 bytes/weight); FP32 is 280 GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .packing import packed_row_bytes
from .scheme import Scheme, parse_scheme

__all__ = ["estimate", "estimate_checkpoint", "bits_per_weight", "Estimate", "CheckpointEstimate"]


def bits_per_weight(scheme: str | Scheme, in_features: int | None = None) -> float:
    """Stored bits per weight of ``scheme`` for rows of ``in_features`` columns.

    With ``in_features`` the figure is byte-exact per row (bit-packing units included), as a
    :class:`~lowbit.qweight.QWeight` stores it; without, the asymptotic formula of the docstring.
    """
    s = parse_scheme(scheme)
    fmt = s.fmt
    if s.is_cast or s.per_tensor:
        return float(fmt.bits)
    scale_bytes = fmt.scale_dtype.itemsize
    zero_bits = 0 if s.symmetric else fmt.bits
    if in_features is None:
        per_col = 0.0 if s.group_size is None else 1.0 / s.group_size
        return fmt.bits + per_col * (8 * scale_bytes + zero_bits)
    k = in_features
    ng = 1 if s.group_size is None else math.ceil(k / s.group_size)
    if fmt.kind == "float":
        row = k * fmt.bits // 8 + ng * scale_bytes
    else:
        row = packed_row_bytes(k, fmt.bits) + ng * scale_bytes
        row += 0 if s.symmetric else packed_row_bytes(ng, fmt.bits)
    return 8.0 * row / k


@dataclass
class Estimate:
    """Rows of (label, bits per weight, bytes) for a parameter count."""

    params: float
    rows: list[tuple[str, float, float]]
    note: str = ""

    def table(self) -> str:
        lines = [f"weights: {self.params / 1e9:.3g}B parameters", f"{'format':<16}{'bits/weight':>12}{'GB':>10}{'GiB':>10}"]
        for label, bpw, nbytes in self.rows:
            lines.append(f"{label:<16}{bpw:>12.3f}{nbytes / 1e9:>10.2f}{nbytes / 2**30:>10.2f}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _count(model: nn.Module) -> tuple[int, int, int | None]:
    """(all params, params of linear/conv weights, their most common in_features)."""
    total = sum(p.numel() for p in model.parameters())
    lin = 0
    widths: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            lin += m.weight.numel()
            k = m.weight[0].numel()
            widths[k] = widths.get(k, 0) + m.weight.numel()
    return total, lin, (max(widths, key=widths.get) if widths else None)


def estimate(
    params: float | None = None,
    scheme: str | Scheme = "w4g128",
    *,
    model: nn.Module | None = None,
    in_features: int | None = None,
) -> Estimate:
    """Weight memory of ``params`` parameters (or of ``model``) in FP32, FP16, INT8, INT4 and ``scheme``.

    With ``model``, only Linear/Conv2d weights take the quantized formats; other parameters
    (embeddings, norms, biases) are counted at FP16 in the quantized rows, as lowbit keeps them.
    """
    if (params is None) == (model is None):
        raise ValueError("give either params= or model=")
    s = parse_scheme(scheme)
    if model is not None:
        total, quantizable, k = _count(model)
        in_features = in_features or k
        rest = total - quantizable
    else:
        total, quantizable, rest = float(params), float(params), 0.0
        if total <= 0:
            raise ValueError(f"params must be positive, got {params}")
    rows: list[tuple[str, float, float]] = [("fp32", 32.0, 4.0 * total), ("fp16/bf16", 16.0, 2.0 * total)]
    wanted = [("int8", "int8"), ("int4 (w4g128)", "w4g128")]
    if str(s) not in ("int8", "w4g128"):
        wanted.append((str(s), str(s)))
    for label, sch in wanted:
        bpw = bits_per_weight(sch, in_features)
        nbytes = quantizable * bpw / 8 + rest * 2.0
        rows.append((label, nbytes * 8 / total, nbytes))
    note = "" if model is None else f"({quantizable / total:.1%} of parameters are Linear/Conv weights; the rest counted at FP16)"
    return Estimate(float(total), rows, note)


@dataclass
class CheckpointEstimate:
    """Exact sizes and modelled peak memory for one checkpoint directory and recipe (bytes)."""

    source_bytes: int  # tensor data of the checkpoint
    output_bytes: int  # tensor data lowbit would write (headers add ~100 bytes a tensor)
    quantized_layers: int
    quantize_peak: int  # streamed quantization with ``method``, above the runtime
    load_peak: int  # lowbit.load of the output, above the runtime
    largest_layer: str
    method: str = "rtn"
    calibration: str = ""  # "N x L tokens" for calibrated methods

    def table(self) -> str:
        g = 2**30
        return "\n".join([
            f"checkpoint tensors  {self.source_bytes / g:10.2f} GiB",
            f"quantized output    {self.output_bytes / g:10.2f} GiB  ({self.quantized_layers} layers quantized; "
            f"{self.source_bytes / max(self.output_bytes, 1):.2f}x smaller)",
            f"peak memory, streamed quantization  {self.quantize_peak / g:6.2f} GiB  ({self.method}"
            + (f", {self.calibration} calibration tokens" if self.calibration else "")
            + f"; largest layer {self.largest_layer})",
            f"peak memory, loading the output     {self.load_peak / g:6.2f} GiB",
            "(peaks above the Python/torch runtime itself, ~0.3-0.5 GiB; the model behind them: "
            "lowbit.estimate.estimate_checkpoint)",
        ])  # fmt: skip

    def __str__(self) -> str:
        return self.table()


def estimate_checkpoint(path, spec="w4g128", *, max_shard_bytes: int | None = None, method: str = "rtn",
                        nsamples: int = 64, seqlen: int = 512) -> CheckpointEstimate:  # fmt: skip
    """Sizes and peak memory of quantizing the transformers checkpoint at ``path`` with ``spec``
    (scheme string, Scheme or Recipe) by streaming (:func:`lowbit.quantize_checkpoint`) with
    ``method``, and of loading the result, from the checkpoint's headers and config alone (no
    weight is read).

    Sizes are exact (per-row packing, scales and zero points of each planned layer; other
    tensors in their stored dtype). Peaks follow how the streaming code works: quantizing holds the
    largest layer in its stored dtype, one block of rows (``lowbit.checkpoint.CHUNK_BYTES`` as
    float32) with about three times that in temporaries, the layer's output, two output shards (one
    filled while the one before it is written) and
    the largest tensor copied through; loading holds the file, float tensors widened to float32
    (not a plain Linear's or Embedding's weight: those keep their stored dtype), and one layer's
    layout conversion. Calibrated methods (``nsamples`` windows of ``seqlen`` tokens) add one
    decoder block in float32, its inputs and outputs for every window (float32, before any
    spill to disk), the statistics of each of its inputs (a ``K x K`` float32 Hessian for GPTQ,
    2,048 sampled rows for AWQ) with GPTQ's working copies of the largest or AWQ's clip-search
    errors (output channels x 512 rows x groups, twice) of the largest layer, and one window's
    forward temporaries (the MLP's intermediate activations, the attention scores); the embedding
    phase (its float32 copy while the inputs are captured) counts when larger. Against measured
    peaks (VmHWM less ~0.4 GiB of runtime): TinyLlama-1.1B-shaped GPTQ / AWQ with 4 x 512 tokens
    1.71 / 1.63 GiB modelled vs ~1.8 GiB measured, SmolLM2-135M 16 x 512 0.30 / 0.35 vs ~0.37 /
    0.42: a model within ~15%, on the low side. Raises as
    :func:`lowbit.quantize_checkpoint` does for bad checkpoints, recipes and methods."""
    from .algorithms import get_algorithm
    from .checkpoint import CHUNK_BYTES, Checkpoint, _stored_names, skeleton
    from .driver import _plan
    from .io.shards import DEFAULT_SHARD_BYTES
    from .recipe import Recipe

    shard = max_shard_bytes or DEFAULT_SHARD_BYTES
    ck = Checkpoint(path)
    model = skeleton(ck)
    todo, _records, _heads = _plan(model, Recipe.coerce(spec), allow_meta=True)
    nbytes = {n: math.prod(ck.shape(n)) * ck.dtype(n).itemsize for n in ck.names() if ck.dtype(n) is not None}
    planned, out, widen = 0, 0, 0
    biggest, biggest_w = ("", 0, 0), ""  # (name, source bytes, output bytes), its stored weight
    owned = set()
    stored = _stored_names(model.state_dict(keep_vars=True), ck)
    for name, mod, _kind, scheme, _why in todo:
        w = stored[id(mod.weight)]  # (a head tied to the embedding: the embedding's name)
        rows, k = ck.shape(w)[0], math.prod(ck.shape(w)[1:])
        qbytes = math.ceil(rows * k * bits_per_weight(scheme, k) / 8)
        owned.update(f"{name}.{n}" for n, _ in mod.named_parameters())
        bias = nbytes.get(f"{name}.bias", 0)
        out += qbytes + (bias * 4 // ck.dtype(f"{name}.bias").itemsize if bias else 0)
        planned += 1
        if nbytes[w] > biggest[1]:
            biggest, biggest_w = (name, nbytes[w], qbytes), w
    copied = [b for n, b in nbytes.items() if n not in owned]
    out += sum(copied)
    # float tensors load as float32, except the weight of a plain float Linear/Embedding (a bf16
    # embedding or head), which keeps its stored dtype (lowbit.nn.HalfStoredLinear)
    kept = {f"{m}.weight" for m, mod in model.named_modules() if type(mod) in (nn.Linear, nn.Embedding)}
    for n, b in nbytes.items():
        if n not in owned and n not in kept:
            widen += b * (4 // ck.dtype(n).itemsize - 1)
    name, src_bytes, q_bytes = biggest
    chunk = min(CHUNK_BYTES, src_bytes * 4 // max(1, ck.dtype(biggest_w).itemsize)) if name else 0
    # the output buffers: the shard being filled and the one being written, or a tensor larger
    # than that, read whole (the shard in flight is waited for first)
    buffer = max(min(2 * shard, out), max(copied, default=0))
    quantize_peak = src_bytes + 4 * chunk + 2 * q_bytes + buffer
    load_peak = out + widen + q_bytes  # (+ the largest layer converted to its kernel's layout)
    algo = get_algorithm(method)
    calibration = ""
    if algo.uses_calibration:
        calibration = f"{nsamples} x {seqlen}"
        quantize_peak = max(quantize_peak, _calibrated_peak(model, ck, algo, nsamples, seqlen, nbytes) + buffer)
    return CheckpointEstimate(ck.nbytes, out, planned, quantize_peak, load_peak, name or "-", method, calibration)


def _calibrated_peak(model, ck, algo, nsamples: int, seqlen: int, nbytes: dict) -> int:
    """The block phase of a streamed calibrated run (see :func:`estimate_checkpoint`), bytes."""
    from .calibrate import find_blocks

    found = find_blocks(model, outermost=True)
    if found is None:
        return 0
    prefix, blocks = found
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    tokens = nsamples * seqlen
    block_f32 = 0
    for i in range(len(blocks)):
        block_f32 = max(block_f32, sum(b * 4 // ck.dtype(n).itemsize for n, b in nbytes.items()
                                       if n.startswith(f"{prefix}.{i}.")))  # fmt: skip
    # each distinct input of the block's linear layers: its width (q/k/v share one, gate/up another)
    widths, inter, largest = [], 0, 0
    for _n, mod in blocks[0].named_modules():
        if isinstance(mod, nn.Linear):
            widths.append(mod.in_features)
            inter = max(inter, mod.out_features)
            largest = max(largest, mod.in_features * mod.out_features)
    distinct = sorted(set(widths)) + sorted(set(widths))[:1]  # (attention output: another input of width hidden)
    stats = 0
    if "hessian" in algo.needs:
        stats += sum(4 * k * k for k in distinct) + 4 * 4 * max(distinct, default=0) ** 2  # GPTQ's working copies
    if "absmean" in algo.needs:  # AWQ's searches: a few float32 copies of the largest weight (errors, products)
        stats += 4 * 4 * largest
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    forward = 4 * seqlen * (3 * inter + 2 * heads * seqlen)  # one window: MLP activations, attention scores
    acts = 2 * 4 * tokens * hidden + 4 * seqlen * hidden  # inputs and outputs of every window, the reference
    embed = max((b * 4 // ck.dtype(n).itemsize for n, b in nbytes.items() if "embed" in n), default=0)
    return max(block_f32 * 3 // 2 + acts + stats + forward, embed + acts)
