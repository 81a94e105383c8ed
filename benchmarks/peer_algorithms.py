"""Peer quantization *algorithms* (HQQ, GPTQ, AWQ) on SmolLM2-135M, scored by lowbit's harness.

Usage (from the repository root)::

    python benchmarks/peer_algorithms.py --peer hqq|torchao|quanto [--schemes w4g64-asym ...]
    /work/peers/llmc/bin/python benchmarks/peer_algorithms.py --peer llmc [...]
        [--tokens 16384] [--calib-samples 64] [--out benchmarks/results/peer_algorithms.json]
        [--fp32-check]   # also score the unquantized model in this interpreter (harness check)

Every row is one run in a fresh child process (so ``peak_rss_mb`` is that run's own peak):

1. ``lowbit.models.zoo.load_model("smollm2-135m")``: float32 LlamaForCausalLM + tokenizer.
2. The peer quantizes the 210 ``nn.Linear`` layers inside ``model.model.layers`` (never
   ``embed_tokens`` or ``lm_head``), with its own API. ``quant_seconds`` is the wall time of
   the peer's calls only (calibration forward passes included for GPTQ/AWQ).
3. The peer's quantized weights are turned back into float32 (dequantized, or fake-quantized
   for llm-compressor) and written into the float model, so the *same* model code scores every
   row: ``lowbit.evaluate.perplexity.perplexity(model, tok, max_tokens=--tokens, seqlen=512)``
   on the held-out ``eval`` split (32 windows x 511 predicted = 16,352 tokens at 16384).
4. Calibration data (GPTQ/AWQ only) is N windows of 512 tokens drawn at random start offsets
   from ``lowbit.evaluate.data.token_ids(tok, "calib")`` (disjoint from ``eval``) with
   ``torch.Generator().manual_seed(0)``; N is 64 unless the row's ``calib`` says otherwise.
5. ``peak_rss_mb``: ``ru_maxrss`` of the child right after quantization (model load included,
   perplexity not); ``rss_after_load_mb`` is the same counter before quantization started.

lowbit scheme names: ``w4g64`` = 4-bit symmetric, one scale per 64 input columns; ``-asym``
adds a zero point per group; groups run along the input dimension (SmolLM2's Linear layers
are 576 or 1536 wide, so every group is whole). For reference, lowbit RTN on this harness:
FP32 10.490, w4g64 13.322, w4g64-asym 13.859, w3g64 33.843, w3g64-asym 32.273,
w2g32-asym 36485.

What each peer's rows do
------------------------

``--peer hqq`` (hqq, the Mobius Labs package)
    ``HQQLinear(linear, BaseQuantizeConfig(nbits, group_size, axis=1), compute_dtype=float16,
    device="cpu")`` on every target Linear, then ``HQQLinear.dequantize()`` -> float32.
    Algorithm: HQQ's default optimizer (``optimize_weights_proximal_legacy``: lp 0.7 shrinkage,
    beta 10, up to 20 iterations with early stop) which refines the *zero point only*; the
    scale stays min/max. Always asymmetric: uint codes 0..2^b-1, ``W = (q - zero) * scale``,
    ``zero`` and ``scale`` stored in the compute dtype (float16) with no rounding of ``zero``
    after optimization (``round_zero=True`` for 4-bit only rounds the *initial* zero), so the
    zero point is a fractional float16, not an integer. ``quant_zero``/``quant_scale``
    (8-bit meta-data quantization) are deprecated and forced off by hqq 0.2.8. Rows exist for
    the ``-asym`` schemes; symmetric schemes are recorded as unsupported.

``--peer torchao``
    * HQQ: ``PrototypeInt4WeightOnlyConfig(group_size=64, int4_choose_qparams_algorithm="hqq")``
      (torchao's vendored copy of the same HQQ optimizer) -> ``Int4OpaqueTensor`` on the
      float32 model; w4g64-asym only (4-bit, group 32/64/128 only). Zero point is float
      (tinygemm convention ``W = (q - 8) * scale + zero``), scale/zero in the weight dtype.
    * RTN: the same config with ``int4_choose_qparams_algorithm="tinygemm"`` (min/max), as a
      torchao baseline for the HQQ row.
    * HQQ scale-only: ``IntxWeightOnlyConfig(weight_dtype=int4|int3, granularity=PerGroup(64),
      mapping_type=SYMMETRIC, intx_choose_qparams_algorithm="hqq_scale_only")``: symmetric
      signed codes (-8..7 / -4..3), alternating least-squares refinement of the per-group
      scale, no zero point -> w4g64 and w3g64.
    * AWQ: ``AWQConfig(PrototypeInt4WeightOnlyConfig(group_size=64), step="prepare")``,
      calibration forwards, ``step="convert"``. Run on a bfloat16 copy of the model: the CPU
      int4 kernel it scores candidates with (``_weight_int4pack_mm_for_cpu``) is ~70x slower
      in float32, and every observer keeps *all* of its layer's inputs in memory, so this row
      uses 16 calibration windows (8192 tokens). The AWQ scale is stored in the weight
      (``act_pre_scale``), i.e. the effective weight is ``Q(W * s) / s``; that is what is
      written back (rounded to bfloat16) into the float32 model.
    * ``Int4OpaqueTensor`` weights are decoded by reading the packed codes back with the CPU
      kernel (bfloat16 identity input, scale 1 / zero 0 -> ``q - 8`` exactly) and applying the
      tensor's own scales/zeros in float32 (checked against the layer's output on an identity
      input, see the row's notes); intx tensors with ``.dequantize()``.
    * GPTQ (``torchao.prototype.gptq.GPTQConfig``) is recorded as unsupported with the
      exception it raises on this machine.

``--peer quanto`` (optimum-quanto)
    ``quantize(model.model.layers, weights=qint4|qint2, optimizer=...)``, then the group size
    is set on every QLinear (``weight_group_size``; quanto would otherwise pick 96 for
    576-wide and 128 for 1536-wide layers), ``freeze()``, ``weight.dequantize()`` -> float32.
    quanto's qint2/qint4 weights are always affine: ``q = round((W + shift) / scale)`` clamped
    to 0..2^b-1, ``W = q * scale - shift`` with ``shift = -min`` a *float* (model dtype,
    float32 here; no integer zero point, the range is not forced to contain 0).
    Optimizers: ``MaxOptimizer`` (default, min/max RTN) and ``HqqOptimizer`` (HQQ on the
    shift only). There is no qint3 and no symmetric sub-8-bit mode: those are unsupported rows.

``--peer llmc`` (llm-compressor, run with /work/peers/llmc/bin/python)
    ``oneshot(model, dataset=DataLoader(64 x 512 calib windows), recipe=...)`` with the
    default sequential pipeline (each decoder layer calibrated on the outputs of the already
    quantized previous layers), targets ``Linear``, ignore ``lm_head``, weight args
    ``QuantizationArgs(num_bits=b, type="int", symmetric=..., strategy="group",
    group_size=g)`` (compressed-tensors: signed codes -2^(b-1)..2^(b-1)-1; symmetric scale
    ``absmax / ((2^b - 1) / 2)``; asymmetric ``(max - min) / (2^b - 1)`` with an integer zero
    point (int8) and the range widened to include 0; scales in the model dtype, float32).
    * GPTQ: ``GPTQModifier(config_groups=..., ignore=["lm_head"])`` with its defaults
      (block_size 128, dampening_frac 0.01, actorder "static").
    * AWQ: ``[AWQModifier(), QuantizationModifier(config_groups=..., ignore=["lm_head"])]``
      (AWQ defaults: mappings inferred for Llama, duo_scaling=True, n_grid=20; then RTN with
      the default observer). AWQModifier pins its activation cache with
      ``Tensor.pin_memory()``, which raises "Cannot access accelerator device when none is
      available" on a CPU-only torch; ``IntermediatesCache.pin_memory`` is replaced by a no-op
      when no accelerator is present (pinning only speeds host-to-GPU copies).
    The fake-quantized weights (``compressed_tensors...fake_quantize`` with the module's
    ``weight_scale``/``weight_zero_point``) and every other parameter (AWQ rescales the
    RMSNorm weights, v_proj and up_proj) are copied into a freshly loaded float32 model.

Cross-domain mode (issue 13): ``--calib-domains python-docs handbook [--seeds 0 1 2]`` runs the
calibrated algorithms only (llm-compressor GPTQ and AWQ, torchao AWQ), each calibrated on exactly
the windows lowbit's own ``domains`` cells use (32 x 512 tokens of that domain's calib split,
``lowbit.evaluate.domains.calibration_batches`` with the seed) and scored on 4,096 tokens of the
eval split of every domain (``lowbit.evaluate.domains.domain_perplexities``): ``ppl_by_domain`` in
``results/peer_domains.json``, which the report puts beside lowbit's cells.

Frozen inputs, for a machine without the text packages (an accelerator host):
``--write-data FILE --calib-domains ... --seeds ...`` writes every calibration window those cells
use and the eval-split text each domain is scored on (a safetensors file: ``calib.DOMAIN.SEED``
windows, ``eval.DOMAIN`` the token ids lowbit's tokenizer makes of the text, the text itself in the
metadata); ``--data FILE`` then runs the cells from it (each child checks that its tokenizer gives
the same ids, so a row scored on other tokens cannot happen). ``--device cuda`` scores each model
there (llm-compressor calibrates on the accelerator whenever one is present); ``--parallel N``
runs N children at once, each with ``--threads`` threads.

``--peer lowbit`` runs lowbit's own calibrated cells (``lowbit.quantize(model, scheme, method=gptq|awq|
awq+gptq, calibration=...)``, the same call as ``run_all.py --sections domains``) from a ``--data`` file,
in batches of 8 windows as ``calibration_batches`` gives them: the way to compute those cells on a
machine without the text packages (their CPU cores). ``run_all.py --import-domain-rows FILE``
takes such rows into the domains table, each marked with the machine that ran it.

Rows are merged into ``--out`` keyed by (peer, algorithm, scheme[, calibration domain, seed]); a
rerun replaces its rows, except in cross-domain mode, where a rerun skips the rows already finished
(status ok), so the hours-long table resumes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMES: dict[str, tuple[int, int, bool]] = {  # lowbit name -> (bits, group, symmetric)
    "w4g64": (4, 64, True),
    "w4g64-asym": (4, 64, False),
    "w3g64": (3, 64, True),
    "w3g64-asym": (3, 64, False),
    "w2g32-asym": (2, 32, False),
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "peer_algorithms.json"
DOMAINS_OUT = Path(__file__).resolve().parent / "results" / "peer_domains.json"
SEQLEN = 512
SEED = 0
THREADS = 2
N_TARGET_LINEARS = 210


# ------------------------------------------------------------------------------------------
# shared helpers (run inside the child process)
# ------------------------------------------------------------------------------------------

def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _load():
    import torch

    torch.set_num_threads(THREADS)
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    zoo.model.eval().requires_grad_(False)
    return zoo.model, zoo.tokenizer


def _targets(model) -> dict:
    """name (relative to the whole model) -> nn.Linear, for the Linear layers in model.model.layers."""
    import torch

    out = {f"model.layers.{n}": m for n, m in model.model.layers.named_modules()
           if isinstance(m, torch.nn.Linear)}
    if len(out) != N_TARGET_LINEARS:
        raise RuntimeError(f"expected {N_TARGET_LINEARS} Linear layers in model.model.layers, got {len(out)}")
    return out


def _frozen(path: str):
    """(tensors, metadata) of a ``--write-data`` file."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def write_data(path: Path, tokenizer, domains: list[str], seeds: list[int], n: int, tokens: int) -> None:
    """The inputs of the cross-domain cells, frozen (see the module docstring)."""
    from safetensors.torch import save_file

    from lowbit.evaluate.domains import available_domains, domain_text

    tensors, meta = {}, {"tokens": str(tokens), "seqlen": str(SEQLEN)}
    for c in domains:
        for sd in seeds:
            tensors[f"calib.{c}.{sd}"] = _calib(tokenizer, {"calib_samples": n, "calib_domain": c, "seed": sd})
    for d in available_domains():
        text = domain_text(d, "eval")[: tokens * 8]  # the prefix domain_perplexities scores
        meta[f"text.{d}"] = text
        tensors[f"eval.{d}"] = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:tokens]
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def _calib(tokenizer, job: dict, seqlen: int = SEQLEN):
    """(n, seqlen) LongTensor: random windows of the calib split, fixed seed; in the cross-domain
    mode (``job["calib_domain"]``) exactly the windows lowbit's own cells calibrate on:
    ``lowbit.evaluate.domains.calibration_batches(tok, domain, nsamples=n, seqlen, seed)``."""
    import torch

    n = job["calib_samples"]
    if job.get("data"):
        windows = _frozen(job["data"])[0][f"calib.{job['calib_domain']}.{job['seed']}"]
        if tuple(windows.shape) != (n, seqlen):
            raise RuntimeError(f"{job['data']}: calib windows {tuple(windows.shape)}, the job wants {(n, seqlen)}")
        return windows
    if job.get("calib_domain"):
        from lowbit.evaluate.domains import calibration_batches

        return torch.cat(calibration_batches(tokenizer, job["calib_domain"], nsamples=n, seqlen=seqlen,
                                             seed=job["seed"]))
    from lowbit.evaluate.data import token_ids

    ids = token_ids(tokenizer, "calib")
    g = torch.Generator().manual_seed(SEED)
    starts = torch.randint(0, len(ids) - seqlen + 1, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def _calib_desc(job: dict) -> str:
    n = job["calib_samples"]
    if job.get("calib_domain"):
        return (f"{n}x{SEQLEN} tokens of the calib split of the {job['calib_domain']!r} domain, seed {job['seed']} "
                f"(lowbit.evaluate.domains.calibration_batches, the windows lowbit's domains cells use)")
    return (f"{n}x{SEQLEN} tokens: random windows (torch.Generator seed {SEED}) of lowbit's "
            f"'calib' split (python3.11-doc; disjoint from 'eval')")


def _write_weight(linear, w) -> None:
    import torch

    # a new plain Parameter: assigning .data would keep a peer's tensor subclass (and its kernel)
    w = w.detach().to(torch.float32).reshape(tuple(linear.weight.shape)).contiguous().clone()
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    assert type(linear.weight.data) is torch.Tensor


def _ppl(model, tokenizer, tokens: int):
    from lowbit.evaluate.perplexity import perplexity

    t = time.perf_counter()
    r = perplexity(model, tokenizer, max_tokens=tokens, seqlen=SEQLEN)
    return r, time.perf_counter() - t


def _domain_ppl(model, tokenizer, tokens: int, data: str | None = None):
    """{domain: perplexity} on the eval split of every text domain, as lowbit's domains cells
    (``data``: the texts of a ``--write-data`` file, scored the same way)."""
    from lowbit.evaluate.domains import domain_perplexities
    from lowbit.evaluate.perplexity import perplexity

    t = time.perf_counter()
    if not data:
        r = domain_perplexities(model, tokenizer, max_tokens=tokens, seqlen=SEQLEN)
        return {d: round(x.ppl, 4) for d, x in r.items()}, time.perf_counter() - t
    tensors, meta = _frozen(data)
    if int(meta["tokens"]) != tokens:
        raise RuntimeError(f"{data} holds {meta['tokens']}-token eval texts; this run scores {tokens}")
    out = {}
    for key in [k for k in meta if k.startswith("text.")]:
        d, text = key[len("text."):], meta[key]
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:tokens]
        if not ids.equal(tensors[f"eval.{d}"]):
            raise RuntimeError(f"this tokenizer splits {d}'s eval text otherwise than the one that wrote {data}")
        out[d] = round(perplexity(model, tokenizer, text=text, max_tokens=tokens, seqlen=SEQLEN).ppl, 4)
    return out, time.perf_counter() - t


class Unsupported(Exception):
    """The peer cannot run this (scheme, algorithm) here; the message says why."""


# ------------------------------------------------------------------------------------------
# peers. Each job function gets (model, tokenizer, job) and returns
# (quant_seconds, calib_description_or_None, notes); it leaves dequantized float32 weights
# in ``model`` (or returns a replacement model as 4th element).
# ------------------------------------------------------------------------------------------

# ---- hqq ---------------------------------------------------------------------------------

def _hqq_job(model, tokenizer, job):
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    bits, group, sym = SCHEMES[job["scheme"]]
    if sym:
        raise Unsupported("hqq has no symmetric mode: every HQQLinear stores a (float) zero point per group")
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    layers = _targets(model)
    deq, metas = {}, []
    t = time.perf_counter()
    for name, lin in layers.items():
        hq = HQQLinear(lin, cfg, compute_dtype=torch.float16, device="cpu", del_orig=False)
        deq[name] = hq
    secs = time.perf_counter() - t
    zs, ss = [], []
    for name, hq in deq.items():
        metas.append((hq.meta["scale"].dtype, hq.meta["zero"].dtype, tuple(hq.meta["zero"].shape)))
        zs.append(hq.meta["zero"].float().flatten())
        ss.append(hq.meta["scale"].float().flatten())
        _write_weight(layers[name], hq.dequantize().float())
    z = torch.cat(zs)
    int_frac = float((z == z.round()).float().mean())
    notes = (f"BaseQuantizeConfig(nbits={bits}, group_size={group}, axis=1) (round_zero={cfg['weight_quant_params']['round_zero']}, "
             f"optimize=True), HQQLinear(compute_dtype=float16, device='cpu'); asymmetric uint{bits} codes "
             f"0..{2**bits - 1}, W=(q-zero)*scale; scale dtype {metas[0][0]}, zero dtype {metas[0][1]}, "
             f"one per {group} input columns; {100 * int_frac:.1f}% of zero points are integers "
             f"(zero range {float(z.min()):.2f}..{float(z.max()):.2f}); quant_zero/quant_scale off (deprecated, "
             f"forced off by hqq 0.2.8); dequantized with HQQLinear.dequantize() (float16) -> float32")
    return secs, None, notes


def _hqq_jobs(schemes):
    return [dict(peer="hqq", dist="hqq", algorithm="HQQ (default proximal optimizer)",
                 peer_scheme=f"BaseQuantizeConfig(nbits={SCHEMES[s][0]}, group_size={SCHEMES[s][1]}, axis=1)",
                 scheme=s, fn="_hqq_job") for s in schemes]


# ---- torchao -----------------------------------------------------------------------------

def _torchao_decode_opaque(lin):
    """Effective float32 weight ``(out, in)`` of a Linear whose weight is an ``Int4OpaqueTensor``.

    The packed codes are read back with the CPU int4 kernel itself: a bfloat16 identity input
    and a (scale=1, zero=0) table give ``q - 8`` exactly; then ``W = (q - 8) * scale + zero``
    per group with the tensor's own scale/zero (tinygemm's formula), times ``act_pre_scale``
    per input column when AWQ set one.
    """
    import torch

    qw = lin.weight
    n, k = qw.shape
    g = qw.block_size[1]
    sz = qw.scale_and_zero  # (k // g, n, 2): [..., 0] scale, [..., 1] zero
    unit = torch.zeros(sz.shape, dtype=torch.bfloat16)
    unit[..., 0] = 1
    with torch.no_grad():
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k, dtype=torch.bfloat16), qw.qdata, g, unit)
    q = codes.t().float()  # (n, k) in -8..7
    scale, zero = sz[..., 0].float().t(), sz[..., 1].float().t()  # (n, k // g)
    w = (q.view(n, k // g, g) * scale[..., None] + zero[..., None]).view(n, k)
    if qw.act_pre_scale is not None:
        w = w * qw.act_pre_scale.float().view(1, k)
    return w


def _torchao_check_decode(lin, w) -> str:
    """Compare the decoded weight with the layer's own output on an identity input."""
    import torch

    with torch.no_grad():
        ref = torch.nn.functional.linear(torch.eye(lin.in_features, dtype=lin.weight.dtype), lin.weight).t().float()
    return f"decode check on the first layer: max |W_decoded - layer(I)| = {float((w - ref).abs().max()):.2e}"


def _torchao_int4(model, tokenizer, job):
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    layers = _targets(model)
    ids = {id(m) for m in layers.values()}
    cfg = PrototypeInt4WeightOnlyConfig(group_size=64, int4_choose_qparams_algorithm=job["algo"],
                                        set_inductor_config=False)
    t = time.perf_counter()
    quantize_(model, cfg, filter_fn=lambda m, fqn: id(m) in ids)
    secs = time.perf_counter() - t
    w0 = next(iter(layers.values())).weight
    sz = w0.scale_and_zero
    decoded = {name: _torchao_decode_opaque(lin) for name, lin in layers.items()}
    check = _torchao_check_decode(next(iter(layers.values())), next(iter(decoded.values())))
    for name, lin in layers.items():
        _write_weight(lin, decoded[name])
    notes = (f"PrototypeInt4WeightOnlyConfig(group_size=64, int4_choose_qparams_algorithm={job['algo']!r}) on the "
             f"float32 model -> {type(w0).__name__} (uint4 codes, tinygemm layout W=(q-8)*scale+zero, float zero); "
             f"scale_and_zero dtype {sz.dtype}, shape {tuple(sz.shape)} for a {tuple(w0.shape)} weight; "
             f"codes read back with the CPU kernel, W=(q-8)*scale+zero in float32 ({check})")
    if job["algo"] == "hqq":
        notes += "; HQQ = torchao's vendored hqq optimize_weights_proximal_legacy (zero-point refinement)"
    return secs, None, notes


def _torchao_intx_hqq(model, tokenizer, job):
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    bits, group, sym = SCHEMES[job["scheme"]]
    assert sym
    layers = _targets(model)
    ids = {id(m) for m in layers.values()}
    cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group),
                               mapping_type=MappingType.SYMMETRIC,
                               intx_choose_qparams_algorithm="hqq_scale_only")
    t = time.perf_counter()
    quantize_(model, cfg, filter_fn=lambda m, fqn: id(m) in ids)
    secs = time.perf_counter() - t
    w0 = next(iter(layers.values())).weight
    info = (f"{type(w0).__name__}: qdata {w0.qdata.dtype} in {int(w0.qdata.min())}..{int(w0.qdata.max())}, "
            f"scale {w0.scale.dtype} {tuple(w0.scale.shape)}, zero_point {w0.zero_point.dtype} (all zero)")
    for lin in layers.values():
        _write_weight(lin, lin.weight.dequantize())
    notes = (f"IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, granularity=PerGroup({group}), "
             f"mapping_type=SYMMETRIC, intx_choose_qparams_algorithm='hqq_scale_only'): symmetric signed codes "
             f"{-2**(bits-1)}..{2**(bits-1)-1}, scale initialised at absmax/{2**(bits-1)} then refined by "
             f"alternating least squares (<=20 iterations), no zero point; {info}; decoded with .dequantize()")
    return secs, None, notes


def _torchao_awq(model, tokenizer, job):
    import torch
    from torchao.prototype.awq import AWQConfig
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    n = job["calib_samples"]
    layers = _targets(model)
    names = list(layers)
    # the AWQ run happens on a bfloat16 copy of the model (see the module docstring)
    import copy

    bf = copy.deepcopy(model).to(torch.bfloat16)
    bl = _targets(bf)
    ids = {id(m) for m in bl.values()}
    base = PrototypeInt4WeightOnlyConfig(group_size=64, set_inductor_config=False)
    calib = _calib(tokenizer, job)
    t = time.perf_counter()
    quantize_(bf, AWQConfig(base, step="prepare"), filter_fn=lambda m, fqn: id(m) in ids)
    with torch.no_grad():
        for i in range(n):
            bf(input_ids=calib[i:i + 1], use_cache=False)
    bl = _targets(bf)  # prepare swapped in AWQObservedLinear, an nn.Linear subclass
    ids = {id(m) for m in bl.values()}
    quantize_(bf, AWQConfig(base, step="convert"), filter_fn=lambda m, fqn: id(m) in ids)
    secs = time.perf_counter() - t
    bl = _targets(bf)
    w0 = bl[names[0]].weight
    decoded = {name: _torchao_decode_opaque(bl[name]) for name in names}
    check = _torchao_check_decode(bl[names[0]], decoded[names[0]])
    for name in names:
        _write_weight(layers[name], decoded[name])
    notes = (f"AWQConfig(PrototypeInt4WeightOnlyConfig(group_size=64) [tinygemm min/max RTN], "
             f"scale_search_space_size=20): prepare -> {n} calibration forwards (batch 1) -> convert, on a bfloat16 "
             f"copy of the model; result {type(w0).__name__} with act_pre_scale "
             f"{None if w0.act_pre_scale is None else tuple(w0.act_pre_scale.shape)} (= 1/s), scale_and_zero "
             f"{w0.scale_and_zero.dtype}; effective weights Q(W*s)/s computed in float32 from the bfloat16 "
             f"codes/scales/zeros/act_pre_scale and written into the float32 model ({check}, bfloat16 kernel "
             f"output); norms untouched (torchao folds nothing into the previous layer)")
    return secs, _calib_desc(job), notes


def _torchao_gptq(model, tokenizer, job):
    """Record why torchao's GPTQ does not run here (both the int4 and the int8 route)."""
    import torch
    from torchao.prototype.gptq import GPTQConfig, gptq_quantize
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from torchao.quantization.granularity import PerRow

    reasons = []
    try:
        GPTQConfig(step="observe", base_config=Int4WeightOnlyConfig(group_size=64))
        reasons.append("int4 GPTQConfig constructed (unexpected)")
    except Exception as e:  # noqa: BLE001 -- the message is the point
        reasons.append(f"GPTQConfig(base_config=Int4WeightOnlyConfig(group_size=64)) -> {type(e).__name__}: {e}")
    try:
        cfg = GPTQConfig(step="convert", base_config=Int8WeightOnlyConfig(granularity=PerRow()))
        w = torch.randn(64, 64)
        gptq_quantize(w.t() @ w, w.clone(), cfg)
        reasons.append("int8 gptq_quantize ran on CPU (unexpected)")
    except Exception as e:  # noqa: BLE001
        reasons.append(f"gptq_quantize with Int8WeightOnlyConfig(PerRow()) on CPU tensors -> {type(e).__name__}: {e}")
    raise Unsupported("; ".join(reasons) + " (torchao 0.18 prototype GPTQ: int4 needs the CUDA-only 'mslk' "
                      "package and gptq_quantize asserts device.type == 'cuda' for every base config)")


def _torchao_jobs(schemes):
    jobs = []
    for s in schemes:
        bits, group, sym = SCHEMES[s]
        if s == "w4g64-asym":
            jobs.append(dict(peer="torchao", dist="torchao", algorithm="HQQ (PrototypeInt4WeightOnlyConfig hqq)",
                             peer_scheme="PrototypeInt4WeightOnlyConfig(group_size=64, int4_choose_qparams_algorithm='hqq')",
                             scheme=s, fn="_torchao_int4", algo="hqq"))
            jobs.append(dict(peer="torchao", dist="torchao", algorithm="RTN (PrototypeInt4WeightOnlyConfig tinygemm)",
                             peer_scheme="PrototypeInt4WeightOnlyConfig(group_size=64, int4_choose_qparams_algorithm='tinygemm')",
                             scheme=s, fn="_torchao_int4", algo="tinygemm"))
            jobs.append(dict(peer="torchao", dist="torchao", algorithm="AWQ (AWQConfig + PrototypeInt4WeightOnlyConfig)",
                             peer_scheme="AWQConfig(PrototypeInt4WeightOnlyConfig(group_size=64))",
                             scheme=s, fn="_torchao_awq", calib_samples=16))
            jobs.append(dict(peer="torchao", dist="torchao", algorithm="GPTQ (prototype GPTQConfig)",
                             peer_scheme="GPTQConfig(base_config=Int4WeightOnlyConfig(group_size=64))",
                             scheme=s, fn="_torchao_gptq"))
        if sym and bits in (3, 4):
            jobs.append(dict(peer="torchao", dist="torchao", algorithm="HQQ scale-only (IntxWeightOnlyConfig hqq_scale_only)",
                             peer_scheme=f"IntxWeightOnlyConfig(torch.int{bits}, PerGroup({group}), SYMMETRIC, 'hqq_scale_only')",
                             scheme=s, fn="_torchao_intx_hqq"))
    return jobs


# ---- optimum-quanto ----------------------------------------------------------------------

def _quanto_job(model, tokenizer, job):
    import torch
    from optimum.quanto import HqqOptimizer, MaxOptimizer, freeze, qint2, qint4, quantize
    from optimum.quanto.nn import QLinear

    bits, group, sym = SCHEMES[job["scheme"]]
    if bits == 3:
        raise Unsupported("optimum-quanto has no 3-bit weight type (qtypes: qint2, qint4, qint8, qfloat8*)")
    if sym:
        raise Unsupported("optimum-quanto's qint2/qint4 weights are always affine (WeightQBitsTensor requires a "
                          "shift); the symmetric optimizers apply to qint8 only")
    layers = _targets(model)
    optimizer = HqqOptimizer() if job["optimizer"] == "hqq" else MaxOptimizer()
    qtype = {2: qint2, 4: qint4}[bits]
    t = time.perf_counter()
    quantize(model.model.layers, weights=qtype, optimizer=optimizer)
    qmods = {f"model.layers.{n}": m for n, m in model.model.layers.named_modules() if isinstance(m, QLinear)}
    default_groups = sorted({m.weight_group_size for m in qmods.values()})
    for m in qmods.values():
        m.weight_group_size = group  # the weight is only quantized at freeze()
    freeze(model.model.layers)
    secs = time.perf_counter() - t
    if set(qmods) != set(layers):
        raise RuntimeError("quanto did not quantize exactly the target layers")
    q0 = next(iter(qmods.values())).weight
    info = (f"{type(q0).__name__}: scale {q0._scale.dtype} {tuple(q0._scale.shape)}, shift {q0._shift.dtype}")
    for name, qm in qmods.items():
        w = qm.weight.dequantize()
        lin = layers[name]  # quanto cleared the original module's parameters
        lin.weight = torch.nn.Parameter(w.detach().float().reshape(qm.weight.shape).contiguous(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, lin)
    notes = (f"quantize(model.model.layers, weights={qtype.name}, optimizer={type(optimizer).__name__}()), "
             f"weight_group_size set to {group} on every QLinear before freeze() (quanto's own choice here: "
             f"{default_groups}); affine uint{bits} codes 0..{2**bits - 1}, W=q*scale-shift with a float shift "
             f"(=-min, range not forced to include 0; no integer zero point); {info}; dequantized with "
             f"WeightQBitsTensor.dequantize()")
    if job["optimizer"] == "hqq":
        notes += "; HqqOptimizer(lp_norm=0.7, beta=10, kappa=1.01, iters=20) refines the shift only"
    return secs, None, notes


def _quanto_jobs(schemes):
    jobs = []
    for s in schemes:
        bits, group, sym = SCHEMES[s]
        qt = f"qint{bits}"
        for opt, alg in (("max", "RTN min/max (MaxOptimizer, default)"), ("hqq", "HQQ (HqqOptimizer)")):
            if (bits == 3 or sym) and opt == "hqq":
                continue  # one unsupported row per scheme is enough
            jobs.append(dict(peer="quanto", dist="optimum-quanto", algorithm=alg,
                             peer_scheme=f"weights={qt}, weight_group_size={group}", scheme=s,
                             fn="_quanto_job", optimizer=opt))
    return jobs


# ---- llm-compressor ----------------------------------------------------------------------

def _llmc_job(model, tokenizer, job):
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from torch.utils.data import DataLoader

    bits, group, sym = SCHEMES[job["scheme"]]
    n = job["calib_samples"]
    patched = ""
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
        patched = "; IntermediatesCache.pin_memory patched to a no-op (CPU-only torch cannot pin)"
    calib = _calib(tokenizer, job)
    loader = DataLoader([{"input_ids": c} for c in calib], batch_size=1,
                        collate_fn=lambda b: {"input_ids": b[0]["input_ids"][None],
                                              "attention_mask": torch.ones(1, SEQLEN, dtype=torch.long)})
    wargs = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group)
    # PEER_ALGOS_DEBUG_ONE_LAYER=1 (plumbing test only): quantize decoder layer 0 alone
    debug = bool(os.environ.get("PEER_ALGOS_DEBUG_ONE_LAYER"))
    groups = {"group_0": QuantizationScheme(targets=[r"re:^model\.layers\.0\..*"] if debug else ["Linear"],
                                            weights=wargs)}
    if job["algo"] == "gptq":
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    else:
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    t = time.perf_counter()
    qmodel = oneshot(model=model, tokenizer=tokenizer, dataset=loader, recipe=recipe,
                     num_calibration_samples=n, max_seq_length=SEQLEN, shuffle_calibration_samples=False)
    secs = time.perf_counter() - t
    if qmodel is None:
        qmodel = model
    # fresh float model; copy every parameter, fake-quantizing the target Linear weights
    fresh, _ = _load()
    targets = _targets(fresh)
    qmods = dict(qmodel.named_modules())
    sd = {k: v for k, v in qmodel.state_dict().items()}
    wa, n_fq = None, 0
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            mod_name, _, pname = name.rpartition(".")
            if mod_name in targets and pname == "weight" and hasattr(qmods[mod_name], "weight_scale"):
                m = qmods[mod_name]
                wa = m.quantization_scheme.weights
                if getattr(m, "weight_g_idx", None) is not None and (m.weight_g_idx.diff() < 0).any():
                    raise RuntimeError("g_idx reordering present; fake_quantize here ignores it")
                w = fake_quantize(m.weight.data.float(), m.weight_scale.float(), m.weight_zero_point, wa)
                p.data.copy_(w.to(p.dtype))
                n_fq += 1
            else:
                p.data.copy_(sd[name].to(p.dtype))
    if n_fq != (7 if debug else N_TARGET_LINEARS):
        raise RuntimeError(f"llm-compressor quantized {n_fq} target Linear layers")
    m0 = qmods[next(iter(targets))]
    info = (f"weight_scale {m0.weight_scale.dtype} {tuple(m0.weight_scale.shape)}, weight_zero_point "
            f"{m0.weight_zero_point.dtype}{' (all 0)' if bool((m0.weight_zero_point == 0).all()) else ''}; "
            f"observer {wa.observer!r}, actorder {wa.actorder!r}")
    alg = ("GPTQModifier(block_size=128, dampening_frac=0.01, actorder=static)" if job["algo"] == "gptq"
           else "AWQModifier(duo_scaling=True, n_grid=20) + QuantizationModifier")
    notes = (f"{alg}, QuantizationArgs(num_bits={bits}, type=int, symmetric={sym}, strategy=group, "
             f"group_size={group}), targets=Linear, ignore=lm_head; oneshot sequential pipeline on CPU, batch 1; "
             f"signed codes {-2**(bits-1)}..{2**(bits-1)-1}; {info}; fake-quantized weights + all other params "
             f"copied into a fresh float32 model{patched}")
    return secs, _calib_desc(job), notes, fresh


def _llmc_jobs(schemes, n):
    jobs = []
    for algo, name in (("gptq", "GPTQ (GPTQModifier)"), ("awq", "AWQ (AWQModifier + QuantizationModifier)")):
        for s in schemes:
            bits, group, sym = SCHEMES[s]
            jobs.append(dict(peer="llmc", dist="llmcompressor", algorithm=name,
                             peer_scheme=f"W{bits}A16 int, group_size={group}, symmetric={sym}",
                             scheme=s, fn="_llmc_job", algo=algo, calib_samples=n))
    return jobs


# ---- lowbit (its own cells, from frozen inputs) --------------------------------------------
def _lowbit_job(model, tokenizer, job):
    import lowbit

    windows = _calib(tokenizer, job)
    # calibration_batches' shape: (8, 512) batches in the frozen order (the last may be smaller)
    batches = [windows[i : i + 8] for i in range(0, len(windows), 8)]
    t = time.perf_counter()
    q = lowbit.quantize(model, job["scheme"], method=job["algo"], calibration=batches)
    secs = time.perf_counter() - t
    return secs, _calib_desc(job), f"lowbit.quantize(model, {job['scheme']!r}, method={job['algo']!r})", q


def _lowbit_jobs(schemes, n):
    return [dict(peer="lowbit", dist="lowbit", algorithm=f"lowbit {algo}", peer_scheme=s, scheme=s,
                 fn="_lowbit_job", algo=algo, calib_samples=n)
            for s in schemes for algo in ("gptq", "awq", "awq+gptq")]


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------

def _fp32_job(model, tokenizer, job):
    return 0.0, None, (f"no quantization: harness check in this interpreter (torch {_version('torch')}, "
                       f"transformers {_version('transformers')})")


def run_child(job: dict, tokens: int) -> dict:
    import torch

    from lowbit.evaluate.kernel_bench import machine_info

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(THREADS)
    model, tok = _load()
    rss_load = _rss_mb()
    row = dict(peer=job["peer"], version=_version(job["dist"]), algorithm=job["algorithm"],
               peer_scheme=job["peer_scheme"], scheme=job["scheme"], ppl=None, tokens=tokens,
               scored_tokens=None, quant_seconds=None, peak_rss_mb=None, rss_after_load_mb=round(rss_load, 1),
               calib=None, notes="", status="ok",
               env=f"torch {_version('torch')}, transformers {_version('transformers')}, {THREADS} threads"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    load0 = os.getloadavg()[0]
    try:
        res = globals()[job["fn"]](model, tok, job)
    except Unsupported as e:
        row.update(status="unsupported", notes=str(e))
        return row
    secs, calib, notes = res[:3]
    if len(res) > 3:
        model = res[3]
    row.update(quant_seconds=round(secs, 2), peak_rss_mb=round(_rss_mb(), 1), calib=calib, notes=notes,
               loadavg_1min=[round(load0, 2), round(os.getloadavg()[0], 2)])  # machine shared: see the timings
    if job.get("device"):
        model.to(job["device"])
    if job.get("calib_domain"):
        by_domain, eval_s = _domain_ppl(model, tok, tokens, job.get("data"))
        row.update(ppl_by_domain=by_domain, calib_domain=job["calib_domain"], seed=job["seed"],
                   calib_samples=job["calib_samples"], calib_seqlen=SEQLEN, cpu=machine_info()["cpu"],
                   eval_seconds=round(eval_s, 1))  # fmt: skip
        return row
    r, eval_s = _ppl(model, tok, tokens)
    row.update(ppl=round(r.ppl, 4), scored_tokens=r.tokens, eval_seconds=round(eval_s, 1))
    return row


def _jobs(peer: str, schemes: list[str], calib_samples: int, fp32: bool) -> list[dict]:
    if peer == "hqq":
        jobs = _hqq_jobs(schemes)
    elif peer == "torchao":
        jobs = _torchao_jobs(schemes)
    elif peer == "quanto":
        jobs = _quanto_jobs(schemes)
    elif peer == "llmc":
        jobs = _llmc_jobs(schemes, calib_samples)
    elif peer == "lowbit":
        jobs = _lowbit_jobs(schemes, calib_samples)
    else:
        raise SystemExit(f"unknown peer {peer!r}")
    if fp32:
        dist = {"hqq": "hqq", "torchao": "torchao", "quanto": "optimum-quanto", "llmc": "llmcompressor",
                "lowbit": "lowbit"}[peer]
        jobs.insert(0, dict(peer=peer, dist=dist, algorithm="FP32 reference (no quantization)",
                            peer_scheme="-", scheme="fp32", fn="_fp32_job"))
    return jobs


def run_in_child(script: str, job: dict, *extra: str) -> tuple[dict | None, int, float]:
    """Run ``script --child JOB --out TMP *extra`` in a fresh process (its own peak RSS, THREADS threads).

    Returns (the row the child wrote, or None when it wrote nothing; its exit status; wall seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               TOKENIZERS_PARALLELISM="false")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        tmp = Path(f.name)
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--child", json.dumps(job),
                               "--out", str(tmp), *extra], env=env)  # fmt: skip
        wall = time.perf_counter() - t
        row = json.loads(tmp.read_text()) if proc.returncode == 0 and tmp.stat().st_size else None
    finally:
        tmp.unlink(missing_ok=True)
    return row, proc.returncode, wall


def _key(row: dict) -> tuple:
    """What makes a result row unique (a rerun of the same job replaces it)."""
    return row["peer"], row["algorithm"], row["scheme"], row.get("calib_domain"), row.get("seed")


def _merge(out: Path, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else []
    new = {_key(r): r for r in rows}
    merged = [new.pop(_key(r)) if _key(r) in new else r for r in old] + list(new.values())
    tmp = out.with_suffix(".tmp")  # atomic: an interrupted run keeps every finished row
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.replace(out)


def main(argv=None) -> int:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", choices=["hqq", "torchao", "quanto", "llmc", "lowbit"], required=False)
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--tokens", type=int, default=None, help="held-out tokens (default 16384; 4096 per domain "
                    "with --calib-domains)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration windows of 512 tokens (default 64; "
                    "32 with --calib-domains, as lowbit's domains cells)")
    ap.add_argument("--calib-domains", nargs="+", default=None, metavar="DOMAIN",
                    help="cross-domain mode (issue 13): calibrate on each of these text domains, score perplexity "
                    "on the eval split of every domain; rows go to results/peer_domains.json")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds (with --calib-domains)")
    ap.add_argument("--algorithms", nargs="*", default=None,
                    help="only jobs whose algorithm name starts with one of these (e.g. GPTQ AWQ HQQ)")
    ap.add_argument("--fp32-check", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--write-data", type=Path, default=None, metavar="FILE",
                    help="with --calib-domains: freeze the cells' calibration windows and eval texts into FILE, run nothing")
    ap.add_argument("--data", type=Path, default=None, metavar="FILE",
                    help="with --calib-domains: take calibration windows and eval texts from a --write-data FILE")
    ap.add_argument("--skip-done", type=Path, default=None, metavar="FILE",
                    help="with --calib-domains: skip the cells run_all's domains cache FILE already holds "
                    "(results/domains_rows.json; --peer lowbit)")
    ap.add_argument("--device", default=None, help="score each quantized model on this torch device (e.g. cuda)")
    ap.add_argument("--parallel", type=int, default=1, help="children at once (default 1)")
    ap.add_argument("--threads", type=int, default=THREADS, help=f"torch threads per child (default {THREADS})")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    THREADS = args.threads

    cross = bool(args.calib_domains)
    args.tokens = args.tokens or (4096 if cross else 16384)
    args.calib_samples = args.calib_samples or (32 if cross else 64)
    args.out = args.out or (DOMAINS_OUT if cross else DEFAULT_OUT)
    if args.child:  # one job in this process; the row goes to the file named by --out
        job = json.loads(args.child)
        row = run_child(job, args.tokens)
        args.out.write_text(json.dumps(row))
        return 0

    if (args.write_data or args.data) and not cross:
        ap.error("--write-data and --data belong to the cross-domain mode (--calib-domains)")
    if args.write_data:
        import torch

        torch.set_num_threads(THREADS)
        write_data(args.write_data, _load()[1], args.calib_domains, args.seeds, args.calib_samples, args.tokens)
        print(f"wrote {args.write_data}", flush=True)
        return 0
    if not args.peer:
        ap.error("--peer is required")
    jobs = _jobs(args.peer, args.schemes, args.calib_samples, args.fp32_check)
    if args.algorithms:
        jobs = [j for j in jobs if j["scheme"] == "fp32" or any(j["algorithm"].startswith(a) for a in args.algorithms)]
    if cross:  # calibrated algorithms only, once per (seed, calibration domain); seed outermost
        extra = {k: str(v) for k, v in (("data", args.data and args.data.resolve()), ("device", args.device)) if v}
        jobs = [dict(j, calib_samples=args.calib_samples, calib_domain=c, seed=sd, **extra)
                for sd in args.seeds for j in jobs if "calib_samples" in j for c in args.calib_domains]
    if cross and args.out.is_file():  # the cross-domain table takes hours: a rerun resumes, finished rows kept
        done = {_key(r) for r in json.loads(args.out.read_text()) if r.get("status") == "ok"}
        jobs = [j for j in jobs if _key(dict(j, version=None)) not in done]
    if cross and args.skip_done:
        jobs = _skip_done(jobs, args.skip_done, args.tokens)

    def one(job: dict):
        print(f"== {job['peer']} | {job['algorithm']} | {job['scheme']} | {job.get('calib_domain')} {job.get('seed')}",
              flush=True)
        return job, *run_in_child(__file__, job, "--tokens", str(args.tokens), "--threads", str(THREADS))

    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max(1, args.parallel)) as pool:  # each child is its own process; rows merged here
        for fut in as_completed([pool.submit(one, j) for j in jobs]):
            _finish(args, *fut.result())
    return 0


def _skip_done(jobs: list[dict], cache: Path, tokens: int) -> list[dict]:
    """The cross-domain jobs whose cell ``run_all.py``'s domains cache (its keys:
    ``scheme/method/calib/seed/tokens/NxSEQLEN``) does not hold yet; all of them without the file."""
    from run_all import domain_cell_key

    done = json.loads(cache.read_text()) if cache.is_file() else {}
    return [j for j in jobs if domain_cell_key(j["scheme"], j.get("algo"), j["calib_domain"], j["seed"], tokens,
                                               j["calib_samples"], SEQLEN) not in done]


def _finish(args, job: dict, row: dict | None, rc: int, wall: float) -> None:
    if row is None:
        row = dict(peer=job["peer"], version=_version(job["dist"]), algorithm=job["algorithm"],
                   peer_scheme=job["peer_scheme"], scheme=job["scheme"], ppl=None, tokens=args.tokens,
                   quant_seconds=None, peak_rss_mb=None, calib=None, status="error",
                   notes=f"child process exited with {rc}; see the console output")
        row.update({k: job[k] for k in ("calib_domain", "seed") if k in job})
    row["run_seconds"] = round(wall, 1)
    print(f"   -> status={row['status']} ppl={row.get('ppl_by_domain', row['ppl'])} quant_s={row['quant_seconds']} "
          f"peak_rss_mb={row['peak_rss_mb']} ({wall:.0f}s)", flush=True)
    _merge(args.out, [row])


if __name__ == "__main__":
    sys.exit(main())
