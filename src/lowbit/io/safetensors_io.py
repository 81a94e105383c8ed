"""lowbit's native format: a directory with ``model.safetensors`` and ``lowbit.json``.

* ``model.safetensors``: every tensor of the model's state dict, named by module path:
  quantized modules store ``<path>.qweight`` / ``.scales`` / ``.zeros`` (layouts in
  :mod:`lowbit.qweight`), float modules their usual ``<path>.weight`` etc. A tensor shared by
  two names (tied embeddings) is stored once; ``lowbit.json`` lists the other name as an alias.
* ``lowbit.json``: ``format`` ("lowbit"), ``format_version``, the lowbit version, per quantized
  module its type, scheme, method, original weight shape and dtype (plus conv/embedding
  arguments), the per-layer records ``lowbit inspect`` prints, aliases, the source model, and the
  tensor file's size and SHA-256.
* HF models also carry ``config.json`` (and ``generation_config.json`` and tokenizer files when
  given), so :func:`load` can rebuild the architecture without the caller's help.

Saves are atomic: everything is written to a temporary directory beside the target, then swapped
into place (``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames), so an interrupted save
leaves the previous output intact. Loads read JSON and safetensors only: no pickle, no code.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__, kernels
from ..driver import LayerRecord
from ..nn import QuantConv2d, QuantEmbedding, QuantLinear, QuantModule, shared_row_conversion
from ..qweight import QWeight
from ..scheme import SchemeError, parse_scheme

__all__ = ["save", "load", "LowbitFormatError", "FORMAT_VERSION", "read_manifest"]

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
TENSORS = "model.safetensors"
MANIFEST = "lowbit.json"

# Which transformers class rebuilds a model: looked up by name in this allow-list only.
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModel", "AutoModelForSequenceClassification", "AutoModelForMaskedLM")


class LowbitFormatError(ValueError):
    """A directory or file that is not a (valid, readable) lowbit model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _auto_class_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        return None
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    if arch.endswith("ForCausalLM"):
        return "AutoModelForCausalLM"
    if arch.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification"
    if arch.endswith("ForMaskedLM"):
        return "AutoModelForMaskedLM"
    return "AutoModel"


def _module_entry(mod: QuantModule) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": type(mod).__name__,
        "scheme": str(mod.scheme),
        "method": mod.method,
        "shape": list(mod.weight_shape),
        "orig_dtype": mod.orig_dtype,
    }
    if isinstance(mod, QuantConv2d):
        entry["conv"] = {
            "stride": list(mod.stride),
            "padding": mod.padding if isinstance(mod.padding, str) else list(mod.padding),
            "dilation": list(mod.dilation),
            "groups": mod.groups,
        }
    if isinstance(mod, QuantEmbedding):
        entry["padding_idx"] = mod.padding_idx
    return entry


def _exchange(tmp: Path, dst: Path) -> None:
    """Put ``tmp`` at ``dst``; the old ``dst`` (if any) stays whole until the new one is in place."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(tmp), at_fdcwd, os.fsencode(dst), rename_exchange) == 0:
            shutil.rmtree(tmp)  # tmp now holds the old output
            return
    except (AttributeError, OSError):
        pass
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old)


def _permissions(d: Path) -> None:
    """Give the temp directory and its files the modes a plain mkdir/open would have (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    d.chmod(0o777 & ~umask)
    for f in d.iterdir():
        f.chmod(0o666 & ~umask)


def save(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, source: str | None = None) -> Path:
    """Write ``model`` to directory ``path`` atomically; returns the path. See the module docstring."""
    from safetensors.torch import save_file

    dst = Path(path)
    if dst.exists() and not dst.is_dir():
        raise LowbitFormatError(f"{dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()) and not (dst / MANIFEST).exists():
        raise LowbitFormatError(f"{dst} is a non-empty directory that is not a lowbit model; not overwriting it")
    dst.parent.mkdir(parents=True, exist_ok=True)

    with shared_row_conversion():  # row layout, a shared weight converted (and stored) once
        state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in by_ptr:
            aliases[name] = by_ptr[key]
            continue
        by_ptr[key] = name
        tensors[name] = t.detach().contiguous()

    modules = {n: _module_entry(m) for n, m in model.named_modules() if isinstance(m, QuantModule)}
    records = {n: r.to_dict() for n, r in (getattr(model, "lowbit_layers", {}) or {}).items()}
    auto = _auto_class_name(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "lowbit"})
        manifest = {
            "format": "lowbit",
            "format_version": FORMAT_VERSION,
            "lowbit_version": __version__,
            "modules": modules,
            "layers": records,
            "aliases": aliases,
            "model": {
                "class": type(model).__name__,
                "hf_auto_class": auto,
                "source": source or getattr(model, "lowbit_source", None),
            },
            "tensors": {"file": TENSORS, "bytes": (tmp / TENSORS).stat().st_size, "sha256": _sha256(tmp / TENSORS)},
        }
        if auto is not None:
            cfg = model.config
            if getattr(cfg, "quantization_config", None) is not None:
                del cfg.quantization_config  # transformers' own quantizer marks do not apply here
            cfg.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _permissions(tmp)
        _exchange(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and validate ``lowbit.json`` of a model directory (no tensors are read)."""
    d = Path(path)
    if not d.is_dir():
        raise LowbitFormatError(f"{d} is not a directory (a lowbit model is a directory with {MANIFEST})")
    mf = d / MANIFEST
    if not mf.is_file():
        raise LowbitFormatError(f"{d} is not a lowbit model: it has no {MANIFEST}")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitFormatError(f"{mf} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lowbit":
        raise LowbitFormatError(f"{mf} is not a lowbit manifest (no \"format\": \"lowbit\")")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise LowbitFormatError(
            f"{d}: format_version {version!r} is not one this lowbit {__version__} reads "
            f"({', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade lowbit to load it"
        )
    for key in ("modules", "tensors", "model"):
        if not isinstance(manifest.get(key), dict):
            raise LowbitFormatError(f"{mf} lacks its {key!r} section")
    return manifest


def _read_tensors(d: Path, manifest: dict, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = manifest["tensors"]
    f = d / str(info.get("file", TENSORS))
    if f.name != TENSORS or not f.is_file():
        raise LowbitFormatError(f"{d} lacks its tensor file {TENSORS}")
    size = f.stat().st_size
    if size != info.get("bytes"):
        raise LowbitFormatError(f"{f} is {size} bytes, the manifest says {info.get('bytes')}: truncated or replaced")
    if verify and _sha256(f) != info.get("sha256"):
        raise LowbitFormatError(f"{f} fails its SHA-256 check: the file is corrupted or was modified")
    try:
        return load_file(str(f))
    except SafetensorError as e:
        raise LowbitFormatError(f"{f} is not a readable safetensors file: {e}") from None


def _skeleton(d: Path, manifest: dict) -> nn.Module:
    auto = manifest["model"].get("hf_auto_class")
    if auto is None:
        raise LowbitFormatError(
            f"{d} holds a {manifest['model'].get('class')} that is not a transformers model; "
            "pass its float skeleton: lowbit.load(path, model=MyModel())"
        )
    if auto not in _AUTO_CLASSES:
        raise LowbitFormatError(f"{d}: unknown model class {auto!r} (known: {', '.join(_AUTO_CLASSES)})")
    if not (d / "config.json").is_file():
        raise LowbitFormatError(f"{d} lacks config.json to rebuild its {auto}")
    try:
        import transformers
        from transformers.initialization import no_init_weights
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("loading a transformers model needs the 'hf' extra: pip install 'lowbit[hf]'") from e
    config = transformers.AutoConfig.from_pretrained(str(d))
    with no_init_weights():
        model = getattr(transformers, auto).from_config(config, dtype=torch.float32)
    model.tie_weights()  # from_config under no_init_weights leaves tied weights untied
    return model


def _build_module(name: str, entry: dict, tensors: dict[str, torch.Tensor], float_mod: nn.Module) -> QuantModule:
    try:
        scheme = parse_scheme(entry["scheme"])
        shape = tuple(int(s) for s in entry["shape"])
        kind = entry["type"]
        method = str(entry.get("method", "rtn"))
        orig = str(entry.get("orig_dtype", "float32"))
    except (KeyError, TypeError, ValueError, SchemeError) as e:
        raise LowbitFormatError(f"module {name!r} has a bad manifest entry: {e}") from None
    try:
        qw = QWeight(
            scheme,
            shape,
            tensors[f"{name}.qweight"],
            tensors.get(f"{name}.scales"),
            tensors.get(f"{name}.zeros"),
        )
    except KeyError:
        raise LowbitFormatError(f"the tensor file lacks {name}.qweight") from None
    want = getattr(float_mod, "weight", None)
    if isinstance(float_mod, QuantModule):
        want_shape = float_mod.weight_shape
    elif want is not None:
        want_shape = tuple(want.shape[::-1]) if type(float_mod).__name__ == "Conv1D" else tuple(want.shape)
    else:
        want_shape = None
    if want_shape != shape:
        raise LowbitFormatError(
            f"module {name!r}: the file's weight is {shape}, the model's is {want_shape}; wrong skeleton?"
        )
    bias = tensors.get(f"{name}.bias")
    act = tensors.get(f"{name}.act_scale")
    if scheme.act_static and act is None:
        raise LowbitFormatError(f"module {name!r} ({scheme}) lacks its activation scale {name}.act_scale")
    # the zero point: absent in files from before it existed, which were all symmetric (zero 0)
    a = {"act_scale": act, "act_zero": tensors.get(f"{name}.act_zero", 0)} if act is not None else {}
    try:
        if kind == "QuantLinear":
            return QuantLinear(qw, bias, method=method, orig_dtype=orig, **a)
        if kind == "QuantConv2d":
            return QuantConv2d(qw, bias, entry["conv"], method=method, orig_dtype=orig, **a)
    except ValueError as e:
        raise LowbitFormatError(f"module {name!r}: {e}") from None
    if kind == "QuantEmbedding":
        return QuantEmbedding(qw, entry.get("padding_idx"), method=method, orig_dtype=orig)
    raise LowbitFormatError(f"module {name!r} has unknown type {kind!r}")


def load(
    path: str | os.PathLike, model: nn.Module | None = None, *, kernel: str = "auto", verify: bool = True
) -> nn.Module:
    """Load a model saved by :func:`save`.

    Args:
        path: the model directory.
        model: a float skeleton of the same architecture (weights are replaced); needed for any
            model that is not a transformers model. HF models are rebuilt from ``config.json``.
        kernel: kernel preference for the quantized modules ("auto", "reference", ...).
        verify: check the tensor file's SHA-256 against the manifest.
    """
    from ..driver import _set_module

    d = Path(path)
    manifest = read_manifest(d)
    tensors = _read_tensors(d, manifest, verify)
    if model is None:
        model = _skeleton(d, manifest)
    for alias, target in (manifest.get("aliases") or {}).items():
        if target not in tensors:
            raise LowbitFormatError(f"alias {alias!r} points to missing tensor {target!r}")
        tensors[alias] = tensors[target]
    for name, rec in (manifest.get("layers") or {}).items():  # BatchNorms folded at quantization
        if isinstance(rec, dict) and rec.get("status") == "folded":
            try:
                _set_module(model, name, torch.nn.Identity())
            except AttributeError:
                raise LowbitFormatError(f"the model has no module {name!r} that the file folded") from None
    for name, entry in manifest["modules"].items():
        try:
            float_mod = model.get_submodule(name)
        except AttributeError:
            raise LowbitFormatError(f"the model has no module {name!r} that the file quantizes") from None
        new = _build_module(name, entry, tensors, float_mod)
        _set_module(model, name, new)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise LowbitFormatError(
            "the file does not match the model: "
            + (f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''} " if missing else "")
            + (f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else "")
        )
    model.lowbit_layers = {n: LayerRecord(**r) for n, r in (manifest.get("layers") or {}).items()}
    model.lowbit_source = manifest["model"].get("source")
    kernels.use_kernel(model, kernel)
    return model.eval()
