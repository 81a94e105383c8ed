"""GGUF export (llama.cpp) of lowbit Llama-family decoders: lowbit's own codes and scales written
into llama.cpp's block types, bit-exact where the mapping is.

Block layouts follow ggml's ``ggml-common.h`` (block_q4_0, block_q4_1, block_q8_0) as the ``gguf``
package (gguf-py, the writer llama.cpp ships) mirrors them; the file is written with
``gguf.GGUFWriter``. What maps (``../shared/notes/exports.md`` section 1.2):

* symmetric int4 / int3 / int2, groups of a multiple of 32 (or per channel / per tensor, the input
  width a multiple of 32) -> **Q4_0**, exact: ``d`` is lowbit's float16 scale (signed, as ggml's),
  the 4-bit code is lowbit's (int3 / int2 codes shifted by 4 / 6 onto Q4_0's offset of 8), and
  ggml's nibble order (byte ``j`` holds elements ``j`` and ``j + 16`` of a block) replaces
  lowbit's (elements ``2j``, ``2j + 1``);
* symmetric int8 -> **Q8_0**, exact: ``qs = q - 128`` (-128 included, which ggml's dot products
  take);
* asymmetric int4 / int3 / int2 (integer or fractional zero points) -> **Q4_1**: ``d = s``, the
  code kept, ``m = -s * z`` rounded to float16 once; exact when ``s * z`` fits float16's
  significand, otherwise off by at most half a float16 ulp of ``s * z`` (reported per layer);
* anything else (asymmetric int8, nf4, fp8, groups of 8 / 16 / 24, an input width that is not a
  multiple of 32, float32 scales): lowbit's weight dequantized and quantized again to a named
  type (``requantize``, default Q8_0) with the error that adds reported per layer, or refused
  (``exact=True``).

Unquantized float weights are written F32 (exact) or, when asked, F16 / BF16 / Q8_0; norms are
F32. A *float* model can instead go through llama.cpp's own quantizer (``llama_quantize=``, any of
its file types: the K-quants Q4_K_M, Q5_K_M, Q6_K, ..., the IQ types), optionally with an importance
matrix lowbit measures on calibration data (:func:`importance_matrix`): lowbit writes the F32 file,
``llama_model_quantize`` (llama-cpp-python's binding of ``llama-quantize``) makes the typed file,
and every tensor's added error is read back with gguf's dequantizers. The q and k projections' rows are permuted into the order llama.cpp's rotary embedding
expects (a row permutation: scales move with their rows, exactness is kept). A tied LM head is
written once, as ``token_embd`` (llama.cpp's Llama loader uses it as the output matrix when no
``output.weight`` exists). Tokenizer metadata is copied field by field from a GGUF that holds the
same vocabulary (for the zoo's SmolLM2, the GGUF it comes from), as llama.cpp's own
``gguf_new_metadata`` script copies fields; llama.cpp needs the tokenizer's pre-tokenizer name,
which only its converter knows for other tokenizers.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .report import ExportEntry, ExportReport, check_finite, check_output_file, is_tied, refusals, rel_rms_error

__all__ = ["GGUF_TYPES", "REQUANT_TYPES", "GGUFExportError", "gguf_mapping", "encode_gguf_weight", "export_gguf",
           "dequantized_tensors", "qk_permutation", "importance_matrix", "llama_quantize_types", "check_gguf_source"]

QK = 32  # elements per block of the 32-block types (QK4_0 = QK4_1 = QK8_0 in ggml-common.h)

# the block types lowbit writes from its own codes and scales, and what each holds
GGUF_TYPES = {
    "Q4_0": "symmetric int4 / int3 / int2, groups of a multiple of 32 (exact)",
    "Q4_1": "asymmetric int4 / int3 / int2, groups of a multiple of 32 (zero point rounded to float16 once)",
    "Q8_0": "symmetric int8, groups of a multiple of 32 (exact)",
}
# the types a weight that maps onto none of them can be requantized to (gguf.quants' own quantizers)
REQUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32")
FLOAT_TYPES = ("F32", "F16", "BF16", "Q8_0")


class GGUFExportError(ValueError):
    """A model or option the GGUF export cannot serve (an architecture llama.cpp's Llama loader
    does not read, ``exact=True`` with layers that need requantizing, no tokenizer source)."""


# ---- one weight -------------------------------------------------------------------------------
def gguf_mapping(qw) -> tuple[str | None, str]:
    """The GGUF type a :class:`lowbit.qweight.QWeight` maps onto without requantizing,
    ``("Q4_0" | "Q4_1" | "Q8_0" | "F16" | "BF16", "")`` (the last two: fp16 / bf16 weights as
    stored), or ``(None, reason)``."""
    s = qw.scheme
    fmt = s.fmt
    if s.is_cast and qw.data.dtype in (torch.float16, torch.bfloat16):
        return ("F16" if qw.data.dtype == torch.float16 else "BF16"), ""  # stored as is
    if fmt.kind != "affine":
        return None, f"{fmt.name} has no GGUF block type"
    if qw.cols % QK:
        return None, f"input width {qw.cols} is not a multiple of {QK}"
    if s.group_size is not None and s.group_size % QK:
        return None, f"group size {s.group_size} is not a multiple of {QK}"
    if qw.scale.dtype != torch.float16:
        return None, "its scales are float32 (out of float16's range), GGUF blocks hold float16"
    if fmt.bits == 8:
        return ("Q8_0", "") if s.symmetric else (None, "asymmetric int8 (q - z spans -255..255) does not fit Q8_0")
    if fmt.bits <= 4:
        if s.symmetric:
            return "Q4_0", ""
        if not bool(torch.isfinite((qw.scales() * qw.zero_points()).to(torch.float16)).all()):
            return None, "its Q4_1 offset -s*z overflows float16"
        return "Q4_1", ""
    return None, f"{fmt.bits}-bit codes have no GGUF block type"


def _per_block(t: torch.Tensor, qw) -> torch.Tensor:
    """Per-row, per-group parameters ``(R, ng)`` -> one per 32-block ``(N, K / 32)``."""
    n, k = qw.rows, qw.cols
    g = qw.scheme.group_size or k
    idx = torch.arange(k // QK) * QK // g
    return t.expand(n, t.shape[1])[:, idx] if t.shape[0] == 1 else t[:, idx]


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``(N, K)`` (0..15) -> ggml's 4-bit block bytes ``(N, K / 32, 16)``: byte ``j`` holds
    element ``j`` (low nibble) and element ``j + 16`` (high) of its block."""
    c = codes.reshape(codes.shape[0], -1, QK)
    return c[..., :16] | (c[..., 16:] << 4)


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(*t.shape, 2)


def encode_gguf_weight(qw, gguf_type: str) -> tuple[np.ndarray, dict]:
    """Blocks of GGUF type ``gguf_type`` holding ``qw`` exactly as :func:`gguf_mapping` says
    (``gguf_type`` must be what it returned): uint8 ``(N, K / 32 * block bytes)``, the byte shape
    ``gguf.GGUFWriter.add_tensor`` takes with ``raw_dtype``; and what the mapping cost (Q4_1:
    ``max_abs_error``, ``exact_blocks``)."""
    qw = qw.to_layout("rows")
    info: dict = {}
    if gguf_type in ("F16", "BF16"):  # the half-precision weight's own bits; BF16 as bytes
        data = qw.data.reshape(qw.rows, qw.cols)
        return (data.numpy() if gguf_type == "F16" else data.view(torch.uint8).numpy()), info
    codes = qw.codes()
    d = _per_block(qw.scale, qw)  # float16 (N, nb)
    n = qw.rows
    if gguf_type == "Q4_0":
        shift = 8 - qw.scheme.fmt.sym_zero  # int3 / int2 codes onto Q4_0's offset of 8
        blocks = torch.cat([_half_bytes(d), _nibbles(codes + shift if shift else codes)], dim=-1)
    elif gguf_type == "Q8_0":
        qs = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8).reshape(n, -1, QK)
        blocks = torch.cat([_half_bytes(d), qs], dim=-1)
    elif gguf_type == "Q4_1":
        m, max_err, exact_blocks = _q4_1_offsets(qw)
        info = {"max_abs_error": max_err, "exact_blocks": exact_blocks}
        blocks = torch.cat([_half_bytes(d), _half_bytes(m.to(torch.float16)), _nibbles(codes)], dim=-1)
    else:
        raise ValueError(f"lowbit writes Q4_0, Q4_1 and Q8_0 blocks itself, not {gguf_type}")
    return blocks.reshape(n, -1).numpy(), info


def _requantize(w: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, float, str, str]:
    """``w`` (float32 ``(N, K)``) in ``gguf_type`` by gguf's own quantizer: ``(data, relative RMS
    error against w, the type written, why it differs)``. The block types hold float16 scales
    (and F16 the values themselves): when float16's range, not the type's bits, makes the error
    (tiny or huge weights; the same weight scaled by a power of two to unit RMS quantizes better
    than 2/3 of the error), F32 is written instead and ``why`` says so."""
    a = w.float().numpy()
    if gguf_type == "F32":
        return a, 0.0, "F32", ""
    out, err = _quantize_as(a, gguf_type)
    rms = float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
    if err > 0 and rms > 0 and np.isfinite(rms):
        k = np.float32(2.0 ** round(float(np.log2(rms))))  # exact rescaling
        _, ideal = _quantize_as(a / k, gguf_type)
        if err > 1.5 * ideal + 1e-4:
            why = (f"{gguf_type}'s float16 {'values' if gguf_type == 'F16' else 'scales'} cannot hold this weight's "
                   f"range ({100 * err:.1f}% error against {100 * ideal:.1f}% at unit scale): written F32")
            return a, 0.0, "F32", why
    return out, err, gguf_type, ""


def _quantize_as(a: np.ndarray, gguf_type: str) -> tuple[np.ndarray, float]:
    import gguf

    if gguf_type == "F16":
        out = a.astype(np.float16)
        back = out.astype(np.float32)
    else:
        t = gguf.GGMLQuantizationType[gguf_type]
        out = gguf.quants.quantize(a, t)
        back = gguf.quants.dequantize(out, t).reshape(a.shape)
    return out, rel_rms_error(a, back)


def _q4_1_offsets(qw) -> tuple[torch.Tensor, float, float]:
    """Q4_1's offset ``m = -s * z`` for an asymmetric ``qw``, one per 32-block (float32, exact: an
    11-bit significand times a code or a float16 zero point), and what storing it in float16
    costs: the largest change of a weight and the share of blocks left exact."""
    m = -_per_block(qw.scales(), qw) * _per_block(qw.zero_points(), qw)
    err = (m.to(torch.float16).float() - m).abs()
    if not err.numel():
        return m, 0.0, 1.0
    return m, float(err.max()), float((err == 0).float().mean())


# ---- the model --------------------------------------------------------------------------------
def _llama_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in ("llama", "mistral"):
        kind = getattr(cfg, "model_type", type(model).__name__)
        raise GGUFExportError(f"GGUF export writes Llama-family decoders (llama, mistral); this model is {kind}")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(cfg, key, False):
            raise GGUFExportError(f"{key}=True: llama.cpp's Llama graph has no such bias")
    rope = _rope(cfg)
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in (None, "default"):
        raise GGUFExportError(f"rope scaling {kind!r} is not exported (llama.cpp needs rope_freqs / scaling keys)")
    return cfg


def _rope(cfg) -> dict:
    """The rotary embedding's parameters (transformers 5 keeps them in ``rope_parameters``, older
    versions in ``rope_theta`` / ``rope_scaling``)."""
    out = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if getattr(cfg, "rope_theta", None) is not None:
        out.setdefault("rope_theta", cfg.rope_theta)
    return out


def qk_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's rotary embedding expects for a q or k projection of ``heads`` heads:
    each head's two halves interleaved (the inverse of transformers' GGUF loader's
    ``reverse_permute``; llama.cpp's converter applies it to HF checkpoints)."""
    idx = torch.arange(rows).reshape(heads, 2, rows // heads // 2)
    return idx.transpose(1, 2).reshape(rows)


def _tokenizer_source(model: nn.Module, tokenizer_gguf) -> Path:
    if tokenizer_gguf is not None:
        return Path(tokenizer_gguf)
    if getattr(model, "lowbit_source", None) == "smollm2-135m":
        from ..models.zoo import smollm2_gguf_path

        return smollm2_gguf_path()
    raise GGUFExportError(
        "GGUF export needs the tokenizer's llama.cpp metadata (its pre-tokenizer name): pass tokenizer_gguf= "
        "(CLI --tokenizer-gguf) a GGUF of the same vocabulary, e.g. one llama.cpp's convert_hf_to_gguf.py "
        "--vocab-only wrote for this model")


def check_gguf_source(model: nn.Module, tokenizer_gguf: str | os.PathLike | None = None) -> None:
    """What :func:`export_gguf` checks of the model before writing (its architecture, the
    tokenizer source and vocabulary), for callers that quantize first: ``GGUFExportError``."""
    cfg = _llama_config(model)
    _tokenizer_fields(_tokenizer_source(model, tokenizer_gguf), int(cfg.vocab_size))


def _tokenizer_fields(src: Path, vocab: int) -> list:
    """The ``tokenizer.*`` fields of the GGUF ``src``, checked to hold a vocabulary of ``vocab``
    tokens (read before anything is written; parsing a 49k-token vocabulary takes seconds, so a
    file unchanged since the last export is read once)."""
    if not src.is_file():
        raise GGUFExportError(f"tokenizer GGUF {src}: no such file")
    st = src.stat()
    return _read_tokenizer_fields(str(src.resolve()), st.st_mtime_ns, st.st_size, vocab)


@functools.lru_cache(maxsize=4)
def _read_tokenizer_fields(path: str, _mtime: int, _size: int, vocab: int) -> list:
    import gguf

    src = Path(path)
    try:
        fields = gguf.GGUFReader(str(src)).fields
    except Exception as e:  # gguf raises ValueError / struct errors / numpy errors on foreign files
        raise GGUFExportError(f"tokenizer GGUF {src} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    if "tokenizer.ggml.tokens" not in fields:
        raise GGUFExportError(f"{src} holds no tokenizer (no tokenizer.ggml.tokens)")
    n = len(fields["tokenizer.ggml.tokens"].data)
    if n != vocab:
        raise GGUFExportError(f"{src} has a vocabulary of {n} tokens, the model {vocab}: not this model's tokenizer")
    return [f for name, f in fields.items() if name.startswith("tokenizer.")]


def _copy_tokenizer(writer, fields: list) -> None:
    import gguf

    for f in fields:
        arr = f.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if arr else None)


def export_gguf(model: nn.Module, path: str | os.PathLike, *, exact: bool = False, requantize: str = "Q8_0",
                float_type: str = "F32", tokenizer_gguf: str | os.PathLike | None = None,
                name: str | None = None, overwrite: bool = False, llama_quantize: str | None = None,
                importance: dict[str, torch.Tensor] | None = None) -> ExportReport:  # fmt: skip
    """Write a lowbit-quantized (or float) transformers Llama-family decoder as a GGUF file
    llama.cpp runs (GGUF v3, ``gguf.GGUFWriter``; block layouts of ggml-common.h; see the module
    docstring for what maps exactly).

    Args:
        model: a ``LlamaForCausalLM``-like model, quantized by lowbit or loaded with
            :func:`lowbit.load` (any layout; the tiled CPU layouts are converted back per layer).
        path: the ``.gguf`` file; written to a temporary file beside it and renamed (atomic).
        exact: refuse (``GGUFExportError`` naming the layers) instead of requantizing weights no
            GGUF block type holds exactly.
        requantize: the type those weights are requantized to (one of ``REQUANT_TYPES``); the
            error added is reported per layer.
        float_type: unquantized 2-D weights (an embedding or head kept in float): ``F32``
            (exact), ``F16``, ``BF16`` or ``Q8_0``.
        tokenizer_gguf: a GGUF whose ``tokenizer.*`` fields are copied (same vocabulary size
            required); the zoo's SmolLM2 uses its own GGUF when this is None.
        name: ``general.name`` (default: the model's source).
        overwrite: replace an existing file at ``path`` (otherwise ``FileExistsError``).
        llama_quantize: a llama.cpp file type (:func:`llama_quantize_types`: ``"Q4_K_M"``,
            ``"Q6_K"``, ``"IQ4_XS"`` ...): quantize a float model with llama.cpp's own quantizer
            (its per-tensor type mix and fallbacks) instead of writing lowbit's codes; needs
            ``llama_cpp`` (``pip install lowbit[export]``) and disk for the F32 file beside ``path``.
        importance: with ``llama_quantize``, llama.cpp's importance matrix per layer, from
            :func:`importance_matrix` (transformers module name -> float32 ``(K,)``); the IQ1/IQ2
            types require one.

    Returns an :class:`lowbit.io.report.ExportReport` (per tensor: GGUF type, exact / zero point
    rounded / requantized and the error; ``notes``: llama.cpp's fallbacks). Raises ``GGUFExportError`` for other architectures, a missing tokenizer source or
    ``exact`` refusals, ``ValueError`` for unknown type names, ``FileExistsError`` for an existing
    ``path`` without ``overwrite``, ``OSError`` for write errors; nothing is left half-written and
    a previous file at ``path`` is kept unless the new one is complete.
    """
    import gguf

    from ..nn import QuantModule

    if llama_quantize is not None:
        return _export_llama_quantized(model, Path(path), llama_quantize, importance, tokenizer_gguf=tokenizer_gguf,
                                       name=name, overwrite=overwrite)  # fmt: skip
    if importance is not None:
        raise ValueError("importance= applies with llama_quantize= (llama.cpp's quantizer reads it)")
    requantize, float_type = str(requantize).upper(), str(float_type).upper()
    if requantize not in REQUANT_TYPES:
        raise ValueError(f"requantize (CLI --requantize) must be one of {', '.join(REQUANT_TYPES)}, got {requantize!r}")
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type (CLI --float-type) must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    path = Path(path)
    check_output_file(path, overwrite, "model.gguf")
    cfg = _llama_config(model)
    nblocks = int(cfg.num_hidden_layers)
    heads, kv_heads = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    tok_src = _tokenizer_source(model, tokenizer_gguf)
    tok_fields = _tokenizer_fields(tok_src, int(cfg.vocab_size))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, nblocks)
    tied = is_tied(model)

    # plan every tensor first: a refusal is raised before anything is written
    plan, refused = [], []
    modules = dict(model.named_modules())
    for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
        mod_name, _, leaf = pname.rpartition(".")
        mod = modules.get(mod_name)
        if isinstance(mod, QuantModule):
            if leaf != "qweight":
                if leaf == "bias" and p is not None:
                    raise GGUFExportError(f"{mod_name} has a bias; llama.cpp's Llama graph has none")
                continue
            pname = f"{mod_name}.weight"
        elif leaf not in ("weight",):
            if "rotary_emb" in mod_name:
                continue  # recomputed by llama.cpp from rope.freq_base
            raise GGUFExportError(f"{pname}: llama.cpp's Llama graph has no such tensor")
        if tied and mod is model.get_output_embeddings():
            continue
        gname = tmap.get_name(pname, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise GGUFExportError(f"{pname}: no GGUF tensor name for it in the Llama architecture")
        gtype, why = None, ""
        if isinstance(mod, QuantModule):
            for part, t in (("scales", mod.qw.scale), ("zero points", mod.qw.zero)):
                check_finite(f"{mod_name} {part}", t)
            gtype, why = gguf_mapping(mod.qw)
            if gtype == "Q4_1" and exact:
                if _q4_1_offsets(mod.qw.to_layout("rows"))[2] < 1.0:
                    gtype, why = None, "Q4_1 holds the offset -s*z in float16, which rounds it in some blocks"
            if gtype is None and exact:
                refused.append((mod_name, str(mod.scheme), why))
            elif gtype is None and mod.qw.cols % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[requantize]][0]:
                raise GGUFExportError(f"{mod_name}: its rows of {mod.qw.cols} are not whole {requantize} blocks; "
                                      "requantize it to F16 or F32 instead")  # fmt: skip
        else:
            check_finite(pname, p)
            if p is not None and p.dim() == 2 and p.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[float_type]][0]:
                raise GGUFExportError(f"{pname}: its rows of {p.shape[-1]} are not whole {float_type} blocks; use F16 or F32")
        plan.append((gname, mod_name, mod, gtype, why))
    if refused:
        raise GGUFExportError("these layers have no exact GGUF type (exact=True, CLI --exact): " + refusals(refused))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    report = ExportReport(path, 0, tokenizer_from=str(tok_src))
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name or Path(str(getattr(model, "lowbit_source", None) or "lowbit model")).name)
        w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(nblocks)
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(_rope(cfg).get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(int(cfg.vocab_size))
        if head_dim != cfg.hidden_size // heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        _copy_tokenizer(w, tok_fields)
        types: dict[str, int] = {}  # elements per type, quantized layers
        floats: dict[str, int] = {}  # ... and unquantized 2-D weights (the file type of a float model)
        for gname, mod_name, mod, gtype, why in plan:
            perm = None
            if gname.endswith(("attn_q.weight", "attn_k.weight")):
                perm = qk_permutation(heads * head_dim if "attn_q" in gname else kv_heads * head_dim,
                                       heads if "attn_q" in gname else kv_heads)  # fmt: skip
            rec = ExportEntry(gname, mod_name, "F32", "float")
            if isinstance(mod, QuantModule):
                qw = mod.qw.to_layout("rows")
                rec.scheme = str(mod.scheme)
                if gtype is not None:
                    data, info = encode_gguf_weight(qw, gtype)
                    # llama.cpp quantizes activations itself (Q8_0 blocks), whatever lowbit's a8 did
                    rec.target, rec.mapping = gtype, "weights exact" if qw.scheme.act_bits else "exact"
                    if qw.scheme.act_static:
                        rec.why = "its static input scales are not written (llama.cpp quantizes activations itself)"
                    if gtype == "Q4_1" and info["exact_blocks"] < 1.0:
                        rec.mapping = "zero point rounded"
                        rec.max_abs_error, rec.exact_fraction = info["max_abs_error"], info["exact_blocks"]
                else:
                    wd = qw.dequantize(torch.float32).reshape(qw.rows, qw.cols)
                    data, rec.rel_rms_error, rec.target, fallback = _requantize(wd, requantize)
                    rec.mapping = "requantized" if rec.target != "F32" else "exact"
                    rec.why = f"{why}; {fallback}" if fallback else why
                # the file type llama.cpp reports: what most quantized weights are
                types[rec.target] = types.get(rec.target, 0) + qw.rows * qw.cols
            else:
                t = mod.weight.detach()
                if t.dim() == 1:
                    data = t.float().numpy()
                else:
                    data, rec.rel_rms_error, rec.target, rec.why = _requantize(t.float(), float_type)
                    rec.mapping = "float" if rec.target == "F32" else "requantized"
                    floats[rec.target] = floats.get(rec.target, 0) + t.numel()
            if perm is not None:
                data = data[perm.numpy()]
            raw = None if rec.target in ("F32", "F16") else gguf.GGMLQuantizationType[rec.target]
            w.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=raw)
            rec.nbytes = int(data.nbytes)
            report.entries.append(rec)
        elements = types or floats
        main_type = max(elements, key=elements.get) if elements else "F32"
        ftype = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16",
                 "BF16": "MOSTLY_BF16"}.get(main_type, "ALL_F32")  # fmt: skip
        w.add_file_type(int(gguf.LlamaFileType[ftype]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report.nbytes = path.stat().st_size
    return report


def dequantized_tensors(path: str | os.PathLike, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """Every 2-D tensor of a GGUF file as llama.cpp's own block formulas (``gguf.dequantize``, the
    numpy mirror of ggml's) read it, float32 ``(N, K)``, the q / k rows put back in transformers'
    order: the tensor-level check of an export."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) < 2:
            continue
        a = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))
        a = a.reshape(int(t.shape[1]), int(t.shape[0]))  # GGUF dims are reversed
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            h = heads if "attn_q" in t.name else kv_heads
            inv = torch.argsort(qk_permutation(a.shape[0], h))
            a = a[inv]
        out[t.name] = a
    return out


# ---- llama.cpp's own quantizer (K-quants, IQ types) ------------------------------------------------
def llama_quantize_types() -> list[str]:
    """The file types llama.cpp's quantizer makes (``LLAMA_FTYPE_MOSTLY_*`` of the installed
    llama-cpp-python, e.g. Q4_K_M, Q5_K_S, Q6_K, IQ4_XS). Raises ``ImportError`` naming the extra
    when llama-cpp-python is missing."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("llama.cpp's quantizer needs llama-cpp-python: pip install 'lowbit[export]'") from e
    return sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))


def importance_matrix(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """llama.cpp's importance matrix, measured by lowbit: for every ``nn.Linear`` of ``model``
    (transformers module name), the mean over all calibration tokens of each input column's
    square, float32 ``(K,)``. It is what ``llama-imatrix`` accumulates (``in_sum2 / counts``) and
    what ``llama_model_quantize`` weighs each weight's rounding error by (llama.cpp
    ``tools/imatrix``, ``tools/quantize/quantize.cpp``). ``batches``: model inputs as
    :func:`lowbit.calibration_batches` makes them; padding is not excluded."""
    from .. import calibrate

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            for b in calibrate.as_batches(batches, "importance_matrix"):
                calibrate._call(model, b)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def _export_llama_quantized(model: nn.Module, path: Path, ftype: str, importance, **options) -> ExportReport:
    """``llama_quantize=``: the F32 export, then ``llama_model_quantize`` into ``path``."""
    import gguf

    from ..nn import quantized_summary

    types = llama_quantize_types()
    if ftype not in types:
        raise ValueError(f"llama_quantize must be a llama.cpp file type ({', '.join(types)}), got {ftype!r}")
    done = quantized_summary(model)
    if done:
        raise GGUFExportError(
            f"llama_quantize= quantizes a float model with llama.cpp's quantizer; this one is quantized by lowbit "
            f"({done}): export it without llama_quantize (its codes go out exact), or pass the float model")
    check_output_file(path, options["overwrite"], "model.gguf")
    cfg = _llama_config(model)
    nblocks = int(cfg.num_hidden_layers)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, nblocks)
    imatrix = {}
    for mod_name, v in (importance or {}).items():
        mod = model.get_submodule(mod_name) if mod_name else None
        if mod is model.get_output_embeddings() and is_tied(model):
            gname = "token_embd.weight"  # llama.cpp multiplies by the embedding when the head is tied
        else:
            gname = tmap.get_name(f"{mod_name}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise GGUFExportError(f"importance for {mod_name}: no GGUF tensor of that name in the Llama architecture")
        v = np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(-1))
        if not np.isfinite(v).all():
            raise GGUFExportError(f"importance for {mod_name} holds NaN or Inf")
        imatrix[gname] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    src = path.with_name(f".{path.name}.f32-{os.getpid()}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        export_gguf(model, src, float_type="F32", **{**options, "overwrite": True})
        log = _llama_model_quantize(src, tmp, ftype, imatrix)
        report = ExportReport(path, 0, tokenizer_from=str(_tokenizer_source(model, options.get("tokenizer_gguf"))))
        report.notes = sorted({f"llama.cpp: {ln.strip()}" for ln in log if "fallback" in ln.lower()})
        source = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
        names = {gn: n for n, _ in model.named_parameters() if (gn := tmap.get_name(n, try_suffixes=(".weight",)))}
        for t in gguf.GGUFReader(str(tmp)).tensors:
            kind = t.tensor_type.name
            rec = ExportEntry(t.name, names.get(t.name, t.name), kind, "float" if kind == "F32" else "requantized")
            rec.nbytes = int(t.n_bytes)
            if kind != "F32":
                ref = np.asarray(source[t.name].data, dtype=np.float32)
                try:
                    rec.rel_rms_error = rel_rms_error(ref, gguf.dequantize(t.data, t.tensor_type))
                except NotImplementedError:  # a type newer than the installed gguf package's dequantizers
                    rec.rel_rms_error, rec.why = float("nan"), "the gguf package cannot read it back: error not measured"
            report.entries.append(rec)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        src.unlink(missing_ok=True)
    report.nbytes = path.stat().st_size
    return report


def _llama_model_quantize(src: Path, dst: Path, ftype: str, imatrix: dict[str, np.ndarray]) -> list[str]:
    """llama.cpp's ``llama_model_quantize`` (through llama-cpp-python) from the GGUF ``src`` into
    ``dst``; its log lines. Raises ``GGUFExportError`` with llama.cpp's reason when it fails."""
    import ctypes

    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(_level, text, _user):
        lines.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = torch.get_num_threads()
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # NULL-name terminated
    keep = []
    for i, (gname, v) in enumerate(imatrix.items()):
        keep.append(gname.encode())
        entries[i].name, entries[i].data, entries[i].size = keep[-1], v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    if imatrix:
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if rc != 0:
        logged = [ln.strip() for ln in "".join(lines).splitlines() if ln.strip()]
        # llama.cpp's own summary line first ("failed to quantize: <reason>"), else its last error
        why = [ln.split("failed to quantize:", 1)[1].strip() for ln in logged if "failed to quantize:" in ln]
        why = why or [ln for ln in logged if "error" in ln.lower() or "requires" in ln.lower()]
        reason = why[-1] if why else (logged[-1] if logged else "no reason logged")
        if "invalid output file type" in reason:
            reason = f"the installed llama.cpp does not make this type ({reason})"
        raise GGUFExportError(f"llama.cpp's quantizer failed to make {ftype}: {reason}")
    return "".join(lines).splitlines()
