"""compressed-tensors export (what transformers and vLLM load as ``quant_method:
"compressed-tensors"``): a transformers model directory whose quantized Linear layers hold
lowbit's own codes in compressed-tensors' layouts, with the ``quantization_config`` its library
writes (``compressed_tensors.quantization.QuantizationConfig``, validated by it).

Layouts (compressed-tensors 0.20, ``compressors/pack_quantized``, ``naive_quantized``,
``float_quantized``; ``../shared/notes/exports.md`` section 2):

* **pack-quantized** (int2 / int4 / int8 weights, group or channel, symmetric or not):
  ``weight_packed`` int32 ``(N, K * b / 32)``, codes offset-binary, element ``i`` of each word at
  bits ``b * i``: for 2, 4 and 8 bits exactly lowbit's packed row bytes read as little-endian
  int32 (no repacking); ``weight_scale`` ``(N, groups)``: lowbit's float16 scales, stored as
  float32 in a float32 export (the library dequantizes in the scale's dtype);
  ``weight_zero_point`` (asymmetric) int32 packed along the *output* dimension, offset like the
  codes (``pack_to_int32(zp, b, packed_dim=0)``); ``weight_shape`` int64 ``[N, K]``. Dequantized
  ``(q - z) * s`` in the scale's dtype: lowbit's values exactly when read in float32.
* **int-quantized** (W8A8, int8 weights per channel with dynamic per-token int8 activations):
  ``weight`` int8 ``q - 128``, ``weight_scale`` ``(N, 1)``.
* **float-quantized** (fp8 e4m3 per channel): ``weight`` float8_e4m3fn, ``weight_scale`` float32
  ``(N, 1)``: lowbit's bytes and scales.

Not held (requantized to a named scheme with the error reported, or refused with ``exact=True``):
3-bit (its packing changed in compressed-tensors 0.18), nf4, HQQ's fractional zero points,
groups that do not divide the row, per-tensor scales on int4, static activations, activation
groups. Embeddings and the LM head stay dense (``ignore``), in the model's float dtype.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..files import temp_dir_beside
from .report import ExportEntry, ExportReport, check_finite, is_tied, refusals, rel_rms_error, requantize_weight

__all__ = ["CTExportError", "ct_mapping", "export_compressed_tensors"]


class CTExportError(ValueError):
    """A model or option the compressed-tensors export cannot serve."""


def ct_mapping(qw) -> tuple[str | None, str]:
    """The compressed-tensors format that holds :class:`lowbit.qweight.QWeight` ``qw`` exactly
    (``"pack-quantized"``, ``"int-quantized"``, ``"float-quantized"``), or ``(None, reason)``."""
    s, fmt = qw.scheme, qw.scheme.fmt
    if s.act_bits is not None:
        if s.act_static:
            return None, "lowbit writes no static input scales to compressed-tensors (the layer goes out weight-only)"
        if s.act_group is not None:
            return None, "grouped activations have no compressed-tensors scheme vLLM runs"
        if fmt.bits != 8 or not s.symmetric or s.group_size is not None or s.per_tensor:
            return None, "W8A8 there is symmetric int8 weights per channel"
        return "int-quantized", ""
    if fmt.kind == "float" and fmt.scale_dtype is not None:
        return "float-quantized", ""
    if fmt.kind != "affine":
        return None, f"{fmt.name} has no compressed-tensors format"
    if fmt.bits not in (2, 4, 8):
        return None, f"{fmt.bits}-bit packing differs between compressed-tensors versions (0.18 changed it)"
    if s.per_tensor:
        return None, "pack-quantized takes group or channel scales, not one per tensor"
    if s.group_size is not None and qw.cols % s.group_size:
        return None, f"group size {s.group_size} does not divide the row ({qw.cols})"
    if (qw.cols * fmt.bits) % 32:
        return None, f"a row of {qw.cols} {fmt.bits}-bit codes is not whole int32 words"
    if qw.zero is not None and qw.zero.dtype != torch.uint8:
        return None, "fractional (HQQ) zero points: compressed-tensors' are integers"
    return "pack-quantized", ""


def _args(qw, fmt_name: str) -> dict:
    """compressed-tensors ``QuantizationArgs`` fields of the weights (and activations)."""
    s = qw.scheme
    if fmt_name == "float-quantized":
        w = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}
        return {"weights": w, "input_activations": None}
    w = {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "dynamic": False}
    if s.group_size is not None:
        w.update(strategy="group", group_size=s.group_size)
    else:
        w.update(strategy="channel")
    a = None
    if fmt_name == "int-quantized":
        a = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return {"weights": w, "input_activations": a}


def _tensors(prefix: str, qw, fmt_name: str, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The layer's tensors in ``fmt_name``'s layout. ``scale_dtype``: compressed-tensors dequantizes
    in the scale's dtype, so float32 scales (lowbit's float16 values, widened exactly) give
    lowbit's weights exactly; float16 rounds each product once."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qw = qw.to_layout("rows")
    n, k = qw.rows, qw.cols
    if fmt_name == "float-quantized":
        return {f"{prefix}.weight": qw.data.contiguous(), f"{prefix}.weight_scale": qw.scale.float().reshape(n, 1)}
    if fmt_name == "int-quantized":
        q = (qw.codes().to(torch.int16) - 128).to(torch.int8)
        return {f"{prefix}.weight": q, f"{prefix}.weight_scale": qw.scale.to(scale_dtype).reshape(n, 1).contiguous()}
    out = {
        f"{prefix}.weight_packed": qw.data.contiguous().view(torch.int32).reshape(n, k * qw.scheme.bits // 32),
        f"{prefix}.weight_scale": qw.scale.to(scale_dtype).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if qw.zero is not None:  # offset-binary like the codes (signed zp + 2^(b-1) = lowbit's zero)
        zp = (qw.zero_points().to(torch.int32) - (1 << (qw.scheme.bits - 1))).to(torch.int8)
        out[f"{prefix}.weight_zero_point"] = pack_to_int32(zp, qw.scheme.bits, packed_dim=0)
    return out


# what a compressed-tensors export directory holds (anything else in it is not replaced by overwrite=True)
_CT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "recipe.yaml", "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja",
             "chat_template.json")  # fmt: skip


def _ct_file(name: str) -> bool:
    return name in _CT_FILES or name.startswith(("tokenizer", "vocab.", "model-0"))


def _is_ct_export(path: Path) -> bool:
    """Whether directory ``path`` holds an earlier compressed-tensors export (what ``overwrite``
    may replace; never a source model or an unrelated directory)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors" and not (path / "lowbit.json").exists()


def export_compressed_tensors(model: nn.Module, path: str | os.PathLike, *, exact: bool = False,
                              requantize: str = "w8", dtype: str = "float32", tokenizer=None,
                              overwrite: bool = False) -> ExportReport:  # fmt: skip
    """Write a lowbit-quantized transformers model as a compressed-tensors model directory
    (``config.json`` with ``quantization_config``, ``model.safetensors``, the tokenizer if
    given): what ``transformers.AutoModelForCausalLM.from_pretrained`` (with the
    ``compressed-tensors`` package) and vLLM load. Layouts: module docstring.

    Args:
        model: a transformers model whose Linear layers lowbit quantized (QuantLinear); other
            quantized module kinds (embeddings, convolutions) are refused.
        path: the output directory; written beside it and swapped into place (atomic).
        exact: refuse (``CTExportError`` naming the layers) instead of requantizing layers no
            compressed-tensors format holds exactly.
        requantize: the lowbit scheme those layers are requantized to (default ``w8``: int8 per
            channel, pack-quantized); the added error is reported per layer.
        dtype: dtype of the dense tensors and of ``config.json`` (``float32``: lowbit's values
            exactly; ``float16`` / ``bfloat16``: what GPU servers run; bf16 rounds the float16
            scales when a runtime casts them).
        tokenizer: saved beside the model; None (default): the tokenizer of the model's source
            (a zoo model, a model directory), if it has one (the report's ``notes`` say when
            none was written); False: none.
        overwrite: replace an existing directory at ``path`` (otherwise ``FileExistsError``).

    Returns an :class:`lowbit.io.report.ExportReport` (per layer: format, exact or requantized
    and the added error). Raises ``CTExportError`` for models without a transformers
    config, quantized non-Linear modules or ``exact`` refusals, ``ValueError`` for a bad
    ``requantize`` / ``dtype``, ``FileExistsError``, ``OSError`` for write errors (nothing is left
    half-written; an earlier output stays until the new one is complete)."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file

    from ..nn import QuantLinear, QuantModule
    from ..scheme import parse_scheme
    from .writer import _exchange, _permissions

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    target = parse_scheme(requantize)
    path = Path(path)
    from .writer import _remove_stale

    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} is a file; a compressed-tensors export is a directory")
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI --force) to replace it")
        if any(path.iterdir()) and not _is_ct_export(path):
            raise FileExistsError(f"{path} is a non-empty directory that is not a compressed-tensors export; "
                                  "not replacing it")  # fmt: skip
        foreign = sorted(f.name for f in path.iterdir() if f.is_dir() or not _ct_file(f.name))
        if foreign:
            raise FileExistsError(f"{path} also holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                                  "which an export does not write; replacing the directory would delete "
                                  "them: move them or choose another path")  # fmt: skip
    _remove_stale(path)
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise CTExportError(f"compressed-tensors export writes transformers models; {type(model).__name__} has no config")

    layers, groups, refused, tensors = [], {}, [], {}
    asym = False  # an asymmetric layer is written
    text_model = hasattr(model, "get_input_embeddings")
    if tokenizer is None:
        from ..models.zoo import source_tokenizer

        tokenizer = source_tokenizer(getattr(model, "lowbit_source", None))
    quantized: set[str] = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # from the data: a config saying "tied" over an untied head would load the embedding as the head
    tied = head is not None and is_tied(model)
    fdtype = getattr(torch, dtype)
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantModule):
            continue
        quantized.add(name)
        if tied and mod is head:
            continue  # the loader ties it to the embedding, written below
        if not isinstance(mod, QuantLinear):
            # compressed-tensors quantizes Linear layers: an embedding stays dense (lowbit's values)
            if exact and dtype != "float32":
                refused.append((name, type(mod).__name__, f"dense {dtype} rounds lowbit's values"))
                continue
            tensors[f"{name}.weight"] = mod.qw.dequantize(torch.float32).reshape(mod.weight_shape).to(fdtype)
            layers.append(ExportEntry(name, name, "dense", "exact" if dtype == "float32" else "rounded", str(mod.scheme)))
            continue
        qw = mod.qw
        for part, t in (("scales", qw.scale), ("zero points", qw.zero)):
            check_finite(f"{name} {part}", t)
        if qw.scheme.is_cast:  # float16 / bfloat16: a dense tensor as stored, listed in "ignore"
            half = str(qw.data.dtype).replace("torch.", "")
            ok = dtype in ("float32", half)
            if exact and not ok:
                refused.append((name, str(mod.scheme), f"dense {dtype} rounds its {half} weights"))
                continue
            tensors[f"{name}.weight"] = qw.data.reshape(mod.weight_shape).clone()
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().to(fdtype)
            layers.append(ExportEntry(name, name, "dense", "exact" if ok else "rounded", str(mod.scheme)))
            continue
        fmt_name, why = ct_mapping(qw)
        # int-quantized W8A8: the weights are exact; the runtime rounds the activations its own way
        rec = ExportEntry(name, name, fmt_name or "", "weights exact" if qw.scheme.act_bits else "exact", str(mod.scheme))
        if fmt_name is None:
            if exact:
                refused.append((name, str(mod.scheme), why))
                continue
            qw, rec.rel_rms_error = requantize_weight(qw, target)
            fmt_name, why2 = ct_mapping(qw)
            if fmt_name is None:
                raise ValueError(f"requantize={requantize!r} (CLI --requantize) has no compressed-tensors format "
                                 f"either: {why2}")  # fmt: skip
            rec.target, rec.mapping, rec.why = f"{fmt_name} {qw.scheme}", "requantized", why
            if rec.rel_rms_error == 0.0:  # the same codes and scales (w8a8-static's weights): only activations go
                rec.mapping = "weights exact" if mod.scheme.act_bits else "exact"
        scale_dtype = torch.float32 if dtype == "float32" else torch.float16  # lowbit's float16 scales, exact
        if dtype != "float32" and qw.scale.dtype == torch.float32 and fmt_name != "float-quantized":
            # float32 scales (lowbit keeps them when float16 would lose them): the export's dtype
            # decides (bfloat16 holds their range, float16 may not)
            scale_dtype = fdtype
            cast = qw.scale.to(fdtype).float()
            if not torch.equal(cast, qw.scale):
                lost = ~torch.isfinite(cast) | ((cast == 0) & (qw.scale != 0))
                if exact or bool(lost.any()):
                    why = (f"its float32 scales do not fit {dtype} ({int(lost.sum())} of {lost.numel()} become 0 or Inf)"
                           if bool(lost.any()) else f"its float32 scales are rounded to {dtype}")  # fmt: skip
                    refused.append((name, str(mod.scheme), f"{why}; use dtype float32"))
                    continue
                w = qw.dequantize(torch.float32)
                rounded = dataclasses.replace(qw, scale=cast).dequantize(torch.float32)
                rec.mapping, rec.rel_rms_error = "scales rounded", rel_rms_error(w, rounded)
                rec.why = f"its float32 scales are rounded to {dtype} (a float32 export keeps them)"
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().to(fdtype)
        tensors.update(_tensors(name, qw, fmt_name, scale_dtype))
        asym = asym or not qw.scheme.symmetric
        key = json.dumps({"format": fmt_name, **_args(qw, fmt_name)}, sort_keys=True)
        groups.setdefault(key, []).append(name)
        layers.append(rec)
    if refused:
        raise CTExportError("these layers have no exact compressed-tensors format" + (" (exact=True, CLI --exact)" if exact else "")
                            + ": " + refusals(refused))  # fmt: skip
    if not groups:
        raise CTExportError("no Linear layer of this model is quantized: nothing for compressed-tensors to describe")
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        mod = name.rpartition(".")[0]
        if mod in quantized or name in tensors:
            continue
        t = t.detach()
        check_finite(name, t)
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:
            if tied and head is not None and name.startswith(next(n for n, m in model.named_modules() if m is head)):
                continue  # a tied head is not stored (transformers ties it on load)
            t = t.clone()
        seen.add(key)
        tensors[name] = t.to(fdtype) if t.is_floating_point() else t
    packed = {n for names in groups.values() for n in names}
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    config_groups = {}
    one = len(groups) == 1
    for i, (key, names) in enumerate(sorted(groups.items())):
        spec = json.loads(key)
        fmt_name = spec.pop("format")
        targets = ["Linear"] if one else [f"re:^{n.replace('.', '[.]')}$" for n in names]
        config_groups[f"group_{i}"] = {"targets": targets, "format": fmt_name, **spec, "output_activations": None}
    formats = {json.loads(k)["format"] for k in groups}
    qcfg = QuantizationConfig.model_validate({
        "config_groups": config_groups,
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "ignore": [n for n in linears if n not in packed],
    })  # fmt: skip
    qdict = qcfg.model_dump(exclude_none=False)
    import compressed_tensors

    qdict.update(quant_method="compressed-tensors", version=compressed_tensors.__version__, sparsity_config={},
                 transform_config={})  # fmt: skip

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        d = cfg.to_dict()
        d.pop("quantization_config", None)
        if head is not None:
            d["tie_word_embeddings"] = tied
        d["quantization_config"] = qdict
        d["dtype"] = dtype
        d.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(d, indent=2, default=str) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer:
            tokenizer.save_pretrained(tmp)
        _permissions(tmp)
        _exchange(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ExportReport(path, sum(f.stat().st_size for f in path.iterdir() if f.is_file()), layers)
    if dtype != "float32":
        report.notes.append(f"float tensors (embeddings, norms, unquantized layers) are written in {dtype}, rounded")
    if tokenizer is None and text_model:
        report.notes.append("no tokenizer written (the model's source has none): pass tokenizer= to include one")
    if asym:
        report.notes.append(
            "transformers 5 loads asymmetric compressed-tensors layers only dequantized: from_pretrained(..., "
            "quantization_config=CompressedTensorsConfig(dequantize=True)) (llm-compressor#1618)"
            + ("; a model that mixes them with other layer formats does not load that way either" if len(groups) > 1 else ""))
    return report
