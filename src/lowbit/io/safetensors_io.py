"""lowbit's native format: a directory of safetensors shards and ``lowbit.json`` (reading; the
writer is :mod:`lowbit.io.writer`).

* Shards (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` when the model is
  larger than one shard: :mod:`lowbit.io.shards`): every tensor of the model's state dict, named
  by module path: quantized modules store ``<path>.qweight`` / ``.scales`` / ``.zeros`` (layouts
  in :mod:`lowbit.qweight`), float modules their usual ``<path>.weight`` etc. A tensor shared by
  two names (tied embeddings) is stored once; ``lowbit.json`` lists the other name as an alias.
* ``lowbit.json``: ``format`` ("lowbit"), ``format_version``, the lowbit version, per quantized
  module its type, scheme, method, original weight shape and dtype (plus conv/embedding
  arguments), the per-layer records ``lowbit inspect`` prints, aliases, the source model, and
  (version 2) ``shards`` (file, size, SHA-256, tensor count of each) and ``weight_map``
  (tensor -> shard file). Version 3 is version 2 with pruned weights: a module entry with
  ``"sparse": "bitmask"`` stores ``<path>.mask`` and only its kept codes
  (:mod:`lowbit.sparse`), and with low-rank corrections: a linear module entry with ``"rank": r``
  stores ``<path>.lowrank_a`` ``(N, r)`` and ``<path>.lowrank_b`` ``(r, K)`` float16 (the layer
  computes with ``deq(Q) + A @ B``), and with structured pruning: ``"resized"`` lists the shape
  of the layer in the model's original skeleton, which the smaller stored layer replaces (a model
  without a config still loads into its class as built); lowbit writes 3 only when a file has one of these, so other
  files stay readable by version-2 readers. Version 1 (still read) had one file, ``model.safetensors``, described by
  a ``tensors`` section, whose metadata held the digest of the whole manifest; a version-2 shard's
  metadata holds the digest of the entries of the modules it stores. Either way a manifest edited
  after saving is found.
* HF models also carry ``config.json`` (and ``generation_config.json`` and tokenizer files when
  given), so :func:`load` can rebuild the architecture without the caller's help.

Saves are atomic: everything is written to a temporary directory beside the target, then swapped
into place (``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames), so an interrupted save
leaves the previous output intact. Loads read JSON and safetensors only: no pickle, no code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .. import __version__, kernels
from ..algorithms.pruning import PruningError
from ..driver import LayerRecord, outside_inference_mode
from ..memory import trim
from ..nn import QuantConv2d, QuantEmbedding, QuantLinear, QuantModule, keep_half_storage
from ..qweight import QWeight
from ..scheme import SchemeError, parse_scheme
from ..sparse import sparse_from_tensors
from .shards import is_shard_name, map_tensors, module_of, modules_digest, read_tensors, sha256
from .writer import FORMAT_VERSION, MANIFEST, LowbitFormatError, save

__all__ = ["save", "load", "LowbitFormatError", "FORMAT_VERSION", "read_manifest"]

SUPPORTED_VERSIONS = (1, 2, 3)
TENSORS = "model.safetensors"  # version 1's one tensor file
MAX_MANIFEST_BYTES = 256 << 20
_DIGEST = "_digest"  # read_manifest's note of the manifest's digest as read (never saved)

# Which transformers class rebuilds a model: looked up by name in this allow-list only.
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModel", "AutoModelForSequenceClassification", "AutoModelForMaskedLM")


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and validate ``lowbit.json`` of a model directory (no tensors are read)."""
    d = Path(path)
    if not d.is_dir():
        raise LowbitFormatError(f"{d} is not a directory (a lowbit model is a directory with {MANIFEST})")
    mf = d / MANIFEST
    if not mf.is_file():
        raise LowbitFormatError(f"{d} is not a lowbit model: it has no {MANIFEST}")
    if mf.stat().st_size > MAX_MANIFEST_BYTES:
        raise LowbitFormatError(f"{mf} is {mf.stat().st_size:,} bytes; a lowbit manifest is far smaller (foreign file?)")
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number
        raise LowbitFormatError(f"{mf} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lowbit":
        raise LowbitFormatError(f"{mf} is not a lowbit manifest (no \"format\": \"lowbit\")")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise LowbitFormatError(
            f"{d}: format_version {version!r} is not one this lowbit {__version__} reads "
            f"({', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade lowbit to load it"
        )
    sections = ("modules", "tensors", "model") if version == 1 else ("modules", "weight_map", "model")
    if version >= 2 and not isinstance(manifest.get("shards"), list):
        raise LowbitFormatError(f"{mf} lacks its 'shards' list")
    for key in sections:
        if not isinstance(manifest.get(key), dict):
            raise LowbitFormatError(f"{mf} lacks its {key!r} section")
    digest = _manifest_digest(manifest)  # of the file as written, before any normalisation below
    manifest.setdefault("layers", {})
    manifest.setdefault("aliases", {})
    if manifest["layers"] is None:
        manifest["layers"] = {}
    if manifest["aliases"] is None:
        manifest["aliases"] = {}
    bad = _manifest_problem(manifest)
    if bad:
        raise LowbitFormatError(f"{mf}: {bad}")
    manifest[_DIGEST] = digest
    return manifest


_RECORD_FIELDS = {"name": str, "type": str, "status": str, "scheme": (str, type(None)), "method": (str, type(None)),
                  "reason": str}  # fmt: skip


def _manifest_problem(m: dict) -> str | None:
    """What is malformed in a manifest's sections (types only; meaning is checked at load)."""
    if not isinstance(m["aliases"], dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m["aliases"].items()):
        return "'aliases' must map tensor names to tensor names"
    if not isinstance(m["layers"], dict):
        return "'layers' must be an object"
    for name, rec in m["layers"].items():
        if not isinstance(rec, dict):
            return f"layer record {name!r} is not an object"
        for key, typ in _RECORD_FIELDS.items():
            if key in ("name", "type", "status") and key not in rec:
                return f"layer record {name!r} lacks {key!r}"
            if key in rec and not isinstance(rec[key], typ):
                return f"layer record {name!r}: {key!r} has the wrong type"
        for key in [k for k in rec if k not in _RECORD_FIELDS]:  # fields of a later minor version
            del rec[key]
    if m.get("calibration") is not None and not isinstance(m["calibration"], dict):
        return "'calibration' must be an object"
    model = m["model"]
    for key in ("class", "hf_auto_class", "source"):
        if model.get(key) is not None and not isinstance(model.get(key), str):
            return f"model.{key} must be a string"
    if not all(isinstance(k, str) for k in m["modules"]):
        return "'modules' must be an object"
    if m["format_version"] >= 2:
        files = []
        for sh in m["shards"]:
            if not isinstance(sh, dict) or not is_shard_name(sh.get("file")):
                return f"bad shard record {str(sh)[:100]!r} (a shard is a plain model*.safetensors file name)"
            if not all(isinstance(sh.get(k), int) and not isinstance(sh.get(k), bool) for k in ("bytes", "tensors")):
                return f"shard {sh['file']!r}: 'bytes' and 'tensors' must be integers"
            if not isinstance(sh.get("sha256"), str):
                return f"shard {sh['file']!r} lacks its SHA-256"
            files.append(sh["file"])
        if len(set(files)) != len(files) or not files:
            return "the shard list is empty or names a file twice"
        if not all(isinstance(k, str) and v in files for k, v in m["weight_map"].items()):
            return "'weight_map' must map tensor names to the listed shard files"
    return None


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of everything in the manifest but its ``tensors`` section (which records the
    tensor file's own hash): saved in the tensor file's metadata, so an edited manifest is found."""
    core = {k: v for k, v in manifest.items() if k not in ("tensors", _DIGEST)}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_tensors(d: Path, manifest: dict, verify: bool, mmap: bool = False) -> dict[str, torch.Tensor]:
    if manifest["format_version"] == 1:
        return _read_tensors_v1(d, manifest, verify)
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    held: dict[str, str] = {}
    for sh in manifest["shards"]:
        f = d / sh["file"]
        if not f.is_file():
            raise LowbitFormatError(f"{d} lacks its tensor file {sh['file']}")
        size = f.stat().st_size
        if size != sh["bytes"]:
            raise LowbitFormatError(f"{f} is {size} bytes, the manifest says {sh['bytes']}: truncated or replaced")
        if verify and sha256(f) != sh["sha256"]:
            raise LowbitFormatError(f"{f} fails its SHA-256 check: the file is corrupted or was modified")
        try:
            with safe_open(str(f), framework="pt") as sf:  # validates the header
                meta = sf.metadata() or {}
                names = list(sf.keys())
            for n in names:
                if n in held:
                    raise LowbitFormatError(f"tensor {n!r} is in both {held[n]} and {sh['file']}")
                held[n] = sh["file"]
            tensors.update(map_tensors(f) if mmap else read_tensors(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            if isinstance(e, LowbitFormatError):
                raise
            raise LowbitFormatError(f"{f} is not a readable safetensors file: {str(e)[:300]}") from None
        mods = {m: manifest["modules"][m] for m in (module_of(n, manifest["modules"]) for n in names) if m is not None}
        if meta.get("lowbit_modules_sha256") != modules_digest(mods):
            raise LowbitFormatError(f"{d / MANIFEST} was modified after saving (its module entries no longer match "
                                    f"{sh['file']}), or {sh['file']} is not lowbit's")  # fmt: skip
    if held != manifest["weight_map"]:
        wrong = sorted(set(held.items()) ^ set(manifest["weight_map"].items()))
        raise LowbitFormatError(f"the manifest's weight_map disagrees with the shards about {wrong[0][0]!r}"
                                + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""))  # fmt: skip
    return tensors


def _read_tensors_v1(d: Path, manifest: dict, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    info = manifest["tensors"]
    f = d / TENSORS
    if info.get("file", TENSORS) != TENSORS or not f.is_file():
        raise LowbitFormatError(f"{d} lacks its tensor file {TENSORS}")
    size = f.stat().st_size
    if size != info.get("bytes"):
        raise LowbitFormatError(f"{f} is {size} bytes, the manifest says {info.get('bytes')}: truncated or replaced")
    if verify and sha256(f) != info.get("sha256"):
        raise LowbitFormatError(f"{f} fails its SHA-256 check: the file is corrupted or was modified")
    try:
        with safe_open(str(f), framework="pt") as sf:
            digest = (sf.metadata() or {}).get("manifest_sha256")
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LowbitFormatError(f"{f} is not a readable safetensors file: {str(e)[:300]}") from None
    # files from before the digest existed have none; their manifest is checked field by field only
    if digest is not None and digest != manifest.get(_DIGEST, _manifest_digest(manifest)):
        raise LowbitFormatError(f"{d / MANIFEST} was modified after saving (it no longer matches {TENSORS})")
    return tensors


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
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(str(d))
    # parameters on the meta device (each is then taken from the file, never allocated twice);
    # buffers that are not stored (rotary frequencies) real
    # the saved class itself when transformers has it (GPT2LMHeadModel, not the Auto class's guess)
    cls = getattr(transformers, str(manifest["model"].get("class")), None)
    exact = isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    with no_init_weights(), init_empty_weights(include_buffers=False):
        if exact:
            model = cls._from_config(config, dtype=torch.float32)
        else:
            model = getattr(transformers, auto).from_config(config, dtype=torch.float32)
    model.tie_weights()  # from_config under no_init_weights leaves tied weights untied
    return model


def _expect(name: str, what: str, t: torch.Tensor | None, shape: tuple, dtypes: tuple) -> None:
    """Raise unless ``t`` is a tensor of ``shape`` in one of ``dtypes``."""
    if t is None:
        raise LowbitFormatError(f"module {name!r}: the tensor file lacks its {what}")
    if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise LowbitFormatError(
            f"module {name!r}: its {what} is {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}, "
            f"the manifest's scheme needs {want} {tuple(shape)}"
        )


def _check_weight_tensors(name: str, scheme, shape: tuple[int, ...], tensors: dict) -> None:
    """The stored tensors of one quantized weight have exactly the layout its scheme and shape give
    (:mod:`lowbit.qweight`), and finite scales; anything else is a corrupt or foreign file."""
    from ..packing import packed_row_bytes

    fmt = scheme.fmt
    n, k = shape[0], math.prod(shape[1:])
    qweight, scales, zeros = (tensors.get(f"{name}.{t}") for t in ("qweight", "scales", "zeros"))
    if fmt.kind == "float":
        _expect(name, "qweight", qweight, (n, k), (fmt.torch_dtype,))
    else:
        _expect(name, "qweight", qweight, (n, packed_row_bytes(k, fmt.bits)), (torch.uint8,))
    rows = 1 if scheme.per_tensor else n
    groups = 1 if scheme.per_tensor or scheme.group_size is None else -(-k // scheme.group_size)
    if scheme.is_cast:
        if scales is not None or zeros is not None:
            raise LowbitFormatError(f"module {name!r}: a {scheme} cast stores no scales or zero points")
        return
    _expect(name, "scales", scales, (rows, groups), (torch.float16, torch.float32))
    if not bool(torch.isfinite(scales).all()):
        raise LowbitFormatError(f"module {name!r}: its scales hold NaN/Inf")
    if scheme.symmetric or fmt.kind != "affine":
        if zeros is not None:
            raise LowbitFormatError(f"module {name!r}: a symmetric {scheme} weight stores no zero points")
        return
    if zeros is None:
        raise LowbitFormatError(f"module {name!r}: the tensor file lacks the zero points of its {scheme} weight")
    if zeros.dtype == torch.uint8:
        _expect(name, "zeros", zeros, (rows, packed_row_bytes(groups, fmt.bits)), (torch.uint8,))
    else:
        _expect(name, "zeros", zeros, (rows, groups), (torch.float16,))
        if not bool(torch.isfinite(zeros).all()):
            raise LowbitFormatError(f"module {name!r}: its zero points hold NaN/Inf")


def _sparse_weight(name: str, entry: dict, scheme, shape: tuple[int, ...], tensors: dict) -> tuple[QWeight, torch.Tensor]:
    """A pruned module's dense QWeight (the code of 0 where weights were removed) and packed mask,
    from its mask and kept codes, each checked (:mod:`lowbit.sparse`)."""
    if entry["sparse"] != "bitmask":
        raise LowbitFormatError(f"module {name!r}: unknown sparse storage {entry['sparse']!r} (this lowbit reads 'bitmask')")
    n, k = shape[0], math.prod(shape[1:])
    _expect(name, "mask", tensors.get(f"{name}.mask"), (n, -(-k // 8)), (torch.uint8,))
    try:
        sw = sparse_from_tensors(scheme, shape, tensors, f"{name}.")
        _check_weight_tensors(name, sw.kept.scheme, sw.kept.shape, tensors)
        return sw.to_qweight(), sw.mask
    except PruningError as e:
        raise LowbitFormatError(f"module {name!r}: {e}") from None


def _conv_entry(name: str, entry: dict, float_mod: nn.Module) -> dict:
    """The manifest's convolution arguments, checked against the skeleton's (which must agree)."""
    conv = entry.get("conv")
    if not isinstance(conv, dict):
        raise LowbitFormatError(f"module {name!r}: a QuantConv2d entry needs its 'conv' arguments")
    pad = conv.get("padding")
    ok = all(_int_list(conv.get(k), 2) for k in ("stride", "dilation")) and isinstance(conv.get("groups"), int)
    ok = ok and not isinstance(conv.get("groups"), bool) and conv["groups"] >= 1
    ok = ok and (pad in ("valid", "same") or _int_list(pad, 2))
    if not ok:
        raise LowbitFormatError(f"module {name!r}: bad convolution arguments {conv!r}")
    if isinstance(float_mod, (nn.Conv2d, QuantConv2d)):
        have = QuantConv2d.conv_args(float_mod) if isinstance(float_mod, nn.Conv2d) else {
            "stride": list(float_mod.stride), "padding": float_mod.padding if isinstance(float_mod.padding, str)
            else list(float_mod.padding), "dilation": list(float_mod.dilation), "groups": float_mod.groups}  # fmt: skip
        mine = {k: conv[k] for k in ("stride", "padding", "dilation", "groups")}
        resized = entry.get("resized")
        if resized and have["groups"] == resized[0] > 1 and mine["groups"] == entry["shape"][0]:
            have["groups"] = mine["groups"]  # a depthwise convolution with fewer channels (structured pruning)
        if mine != have:
            raise LowbitFormatError(f"module {name!r}: the file's convolution {mine} differs from the model's {have}")
    return conv


def _int_list(v, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


def _build_module(name: str, entry: dict, tensors: dict[str, torch.Tensor], float_mod: nn.Module) -> QuantModule:
    if not isinstance(entry, dict):
        raise LowbitFormatError(f"module {name!r} has a bad manifest entry: {entry!r}")
    kind = entry.get("type")
    if kind not in ("QuantLinear", "QuantConv2d", "QuantEmbedding"):
        raise LowbitFormatError(f"module {name!r} has unknown type {kind!r}")
    try:
        scheme = parse_scheme(entry["scheme"])
        raw = entry["shape"]
        if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in raw):
            raise ValueError(f"shape must be a list of positive integers, got {raw!r}")
        shape = tuple(raw)
        method = entry.get("method", "rtn")
        orig = entry.get("orig_dtype", "float32")
        if not isinstance(method, str) or not isinstance(orig, str):
            raise ValueError("method and orig_dtype must be strings")
        if not isinstance(getattr(torch, orig, None), torch.dtype) or not getattr(torch, orig).is_floating_point:
            raise ValueError(f"orig_dtype {orig!r} is not a floating-point dtype")
    except (KeyError, TypeError, ValueError, SchemeError) as e:
        raise LowbitFormatError(f"module {name!r} has a bad manifest entry: {e}") from None
    if len(shape) != (4 if kind == "QuantConv2d" else 2):
        raise LowbitFormatError(f"module {name!r}: a {kind} weight has {4 if kind == 'QuantConv2d' else 2} dimensions, not {shape}")
    want = getattr(float_mod, "weight", None)
    if isinstance(float_mod, QuantModule):
        want_shape = float_mod.weight_shape
    elif isinstance(want, torch.Tensor):
        want_shape = tuple(want.shape[::-1]) if type(float_mod).__name__ == "Conv1D" else tuple(want.shape)
    else:
        want_shape = None
    resized = entry.get("resized")  # structured pruning made it smaller than the skeleton's (lowbit.compress)
    if resized is not None and not (isinstance(resized, list) and len(resized) == len(shape) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= s for v, s in zip(resized, shape))):  # fmt: skip
        raise LowbitFormatError(f"module {name!r}: 'resized' must list the original shape, no smaller than {list(shape)}")
    if want_shape != shape and (resized is None or tuple(resized) != want_shape):
        raise LowbitFormatError(
            f"module {name!r}: the file's weight is {shape}, the model's is {want_shape}; wrong skeleton?"
        )
    mask = None
    if "sparse" in entry:
        qw, mask = _sparse_weight(name, entry, scheme, shape, tensors)
    else:
        _check_weight_tensors(name, scheme, shape, tensors)
        qw = QWeight(scheme, shape, tensors[f"{name}.qweight"], tensors.get(f"{name}.scales"), tensors.get(f"{name}.zeros"))
    bias = tensors.get(f"{name}.bias")
    if bias is not None and (tuple(bias.shape) != (shape[0],) or not bias.is_floating_point()):
        raise LowbitFormatError(f"module {name!r}: its bias is {bias.dtype} {tuple(bias.shape)}, not a float ({shape[0]},)")
    if bias is not None and not bool(torch.isfinite(bias).all()):
        raise LowbitFormatError(f"module {name!r}: its bias holds NaN/Inf")
    if bias is None and getattr(float_mod, "bias", None) is not None and kind != "QuantEmbedding":
        # quantization never drops a bias (folding and bias correction may add one)
        raise LowbitFormatError(f"module {name!r}: the model's layer has a bias and the file holds none")
    lowrank = None
    if "rank" in entry:
        r = entry["rank"]
        if kind != "QuantLinear" or not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(shape):
            raise LowbitFormatError(f"module {name!r}: bad low-rank correction rank {r!r} for a {kind} {shape}")
        lowrank = tensors.get(f"{name}.lowrank_a"), tensors.get(f"{name}.lowrank_b")
        _expect(name, "lowrank_a", lowrank[0], (shape[0], r), (torch.float16,))
        _expect(name, "lowrank_b", lowrank[1], (r, shape[1]), (torch.float16,))
        if not all(bool(torch.isfinite(t).all()) for t in lowrank):
            raise LowbitFormatError(f"module {name!r}: its low-rank correction holds NaN/Inf")
    act = tensors.get(f"{name}.act_scale")
    if scheme.act_static and act is None:
        raise LowbitFormatError(f"module {name!r} ({scheme}) lacks its activation scale {name}.act_scale")
    if not scheme.act_static and (act is not None or f"{name}.act_zero" in tensors):
        raise LowbitFormatError(f"module {name!r} ({scheme}) has no static activations, yet the file holds an act_scale")
    # the zero point: absent in files from before it existed, which were all symmetric (zero 0)
    a = {}
    if act is not None:
        zero = tensors.get(f"{name}.act_zero", torch.zeros((), dtype=torch.int8))
        if act.shape != () or act.dtype != torch.float32 or zero.shape != () or zero.dtype != torch.int8:
            raise LowbitFormatError(f"module {name!r}: act_scale / act_zero must be float32 / int8 scalars")
        a = {"act_scale": act, "act_zero": zero}
    try:
        if kind == "QuantLinear":
            return QuantLinear(qw, bias, method=method, orig_dtype=orig, mask=mask, lowrank=lowrank, **a)
        if kind == "QuantConv2d":
            return QuantConv2d(qw, bias, _conv_entry(name, entry, float_mod), method=method, orig_dtype=orig, mask=mask,
                               **a)
        pad = entry.get("padding_idx")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not -shape[0] <= pad < shape[0]):
            raise LowbitFormatError(f"module {name!r}: bad padding_idx {pad!r}")
        have = getattr(float_mod, "padding_idx", pad)
        if pad != have:
            raise LowbitFormatError(f"module {name!r}: the file's padding_idx {pad} differs from the model's {have}")
        return QuantEmbedding(qw, pad, method=method, orig_dtype=orig, mask=mask)
    except (ValueError, TypeError) as e:
        if isinstance(e, LowbitFormatError):
            raise
        raise LowbitFormatError(f"module {name!r}: {e}") from None


def _assign_meta(model: nn.Module, tensors: dict[str, torch.Tensor], half: list) -> dict[str, tuple]:
    """Put the file's tensor in place of every meta parameter or buffer it holds (cast to the
    skeleton's dtype; tied tensors stay tied), so nothing is allocated twice; returns what puts
    each back, as :func:`_materialize_meta` does. The bf16/fp16 weight of a plain float
    ``nn.Linear``/``nn.Embedding`` (an unquantized embedding or LM head of a bf16 checkpoint) keeps
    its stored dtype (no float32 copy); those modules are appended to ``half``, for
    :func:`lowbit.nn.keep_half_storage` once the load has succeeded."""
    users: dict[int, list] = {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for tname, t in store.items():
                if t is not None:
                    users.setdefault(id(t), []).append((mod, tname))
    done: dict[int, torch.Tensor] = {}
    out: dict[str, tuple] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for tname, t in list(store.items()):
                full = f"{mname}.{tname}" if mname else tname
                if t is None or t.device.type != "meta" or full not in tensors:
                    continue
                new = done.get(id(t))
                if new is None:
                    v = tensors[full]
                    keep = (v.dtype in (torch.bfloat16, torch.float16) and t.dtype == torch.float32
                            and all(type(m) in (nn.Linear, nn.Embedding) and n == "weight" for m, n in users[id(t)]))  # fmt: skip
                    if keep:
                        half.extend(m for m, _ in users[id(t)])
                    elif v.is_floating_point() and t.is_floating_point() and v.dtype != t.dtype:
                        v = v.to(t.dtype)
                    new = nn.Parameter(v, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else v
                    done[id(t)] = new
                out[full] = (mod, store, tname, t)
                store[tname] = new
    return out


def _materialize_meta(model: nn.Module) -> dict[str, tuple]:
    """Give every parameter and buffer still on the meta device real (uninitialised) CPU storage,
    keeping shared tensors shared, for the file to fill; returns, by state-dict name, what puts
    each back: ``(module, store, name, old tensor)``."""
    done: dict[int, torch.Tensor] = {}
    out: dict[str, tuple] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for tname, t in list(store.items()):
                # meta tensors have no storage; inference tensors (a skeleton built under
                # torch.inference_mode()) cannot be written outside it: both get fresh storage
                if t is None or (t.device.type != "meta" and not t.is_inference()):
                    continue
                new = done.get(id(t))
                if new is None:
                    new = torch.empty_like(t, device="cpu")
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    done[id(t)] = new
                out[f"{mname}.{tname}" if mname else tname] = (mod, store, tname, t)
                store[tname] = new
    return out


@outside_inference_mode
def load(
    path: str | os.PathLike, model: nn.Module | None = None, *, kernel: str = "auto", verify: bool = True,
    mmap: bool = False, device: str | torch.device | None = None,
) -> nn.Module:
    """Load a model saved by :func:`save`.

    Args:
        path: the model directory.
        model: a float skeleton of the same architecture (weights are replaced); needed for any
            model that is not a transformers model. HF models are rebuilt from ``config.json``.
            The skeleton may live on the meta device: every tensor is then materialised from the
            file, and a tensor the file does not hold (a non-persistent buffer) raises
            :class:`LowbitFormatError` naming it.
        kernel: kernel preference for the quantized modules ("auto", "reference", ...).
        verify: check the tensor file's SHA-256 against the manifest.
        mmap: map the tensor files (copy-on-write) instead of reading them: tensors kept in the
            stored layout (float tensors, a bf16 embedding or head, quantized weights a kernel
            runs as stored) stay file-backed pages the OS can evict and re-read, so resident
            memory can stay below the file size; the files must not change while the model
            lives. Tensors a kernel converts to its own layout are copied as without ``mmap``.
        device: where the model runs, e.g. ``"cuda"``: every tensor moves there as stored
            (quantized weights as their packed codes, scales and zero points, never a float
            copy; a tied embedding and LM head stay one tensor) before the kernels are chosen,
            so GPU weights get the GPU kernels (:mod:`lowbit.kernels.triton`) or, where those
            cannot run, the reference kernel with the reason in ``kernel_note``. A device torch
            does not know or does not have raises ``ValueError``.
    """
    from ..driver import _set_module

    if device is not None:
        device = kernels.check_device(device)  # a bad name, or no such GPU, fails before anything is read

    d = Path(path)
    manifest = read_manifest(d)
    tensors = _read_tensors(d, manifest, verify, mmap)
    if model is None:
        model = _skeleton(d, manifest)
    for alias, target in manifest["aliases"].items():
        if target not in tensors:
            raise LowbitFormatError(f"alias {alias!r} points to missing tensor {target!r}")
        tensors[alias] = tensors[target]
    # Nothing of the caller's skeleton changes until the whole file has been checked against it;
    # what does change (swaps, materialised meta tensors) is put back if anything fails.
    swapped: list[tuple[str, nn.Module]] = []
    meta: dict[str, tuple] = {}
    try:
        for name, rec in manifest["layers"].items():  # BatchNorms folded at quantization
            if rec.get("status") == "folded":
                try:
                    old = model.get_submodule(name)
                except AttributeError:
                    raise LowbitFormatError(f"the model has no module {name!r} that the file folded") from None
                if not isinstance(old, nn.modules.batchnorm._BatchNorm):
                    raise LowbitFormatError(f"the file folded {name!r}, which is a {type(old).__name__} in this model, not a BatchNorm")
                swapped.append((name, old))
                _set_module(model, name, torch.nn.Identity())
        new_modules = []
        for name, entry in manifest["modules"].items():
            try:
                float_mod = model.get_submodule(name) if name else None
            except AttributeError:
                float_mod = None
            if float_mod is None:
                raise LowbitFormatError(f"the model has no module {name!r} that the file quantizes")
            new_modules.append((name, float_mod, _build_module(name, entry, tensors, float_mod)))
        for name, old, new in new_modules:
            swapped.append((name, old))
            _set_module(model, name, new)
        _check_against(model.state_dict(keep_vars=True), tensors)
        half: list[nn.Module] = []
        meta = _assign_meta(model, tensors, half)
        meta.update(_materialize_meta(model))
        unfilled = sorted(n for n, (_m, _s, _t, old_t) in meta.items() if n not in tensors and old_t.device.type == "meta")
        for n in [n for n in meta if n not in tensors and n not in unfilled]:  # an inference tensor kept as it is
            _mod, store, tname, old_t = meta.pop(n)
            store[tname] = old_t
        unfilled += sorted(
            f"{mn}.{an}" if mn else an
            for mn, mod in model.named_modules()
            for an, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and v.device.type == "meta"  # a plain tensor attribute
        )
        if unfilled:
            raise LowbitFormatError(
                f"the skeleton's {', '.join(unfilled[:5])}{'...' if len(unfilled) > 5 else ''} live(s) on the meta "
                "device and the file does not hold them (non-persistent buffers are not saved): build the skeleton "
                "on the CPU"
            )
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:  # pragma: no cover - _check_against found every mismatch first
            raise LowbitFormatError(f"the file does not match the model: {e}") from None
    except BaseException:
        for _mod, store, tname, old_t in meta.values():
            store[tname] = old_t
        for name, old in reversed(swapped):
            _set_module(model, name, old)
        raise
    for mod in half:
        keep_half_storage(mod)
    model.lowbit_layers = {n: LayerRecord(**r) for n, r in manifest["layers"].items()}
    model.lowbit_source = manifest["model"].get("source")
    if manifest.get("calibration") is not None:
        model.lowbit_calibration = manifest["calibration"]
    tensors.clear()  # the modules hold what they need: each row layout is freed as its kernel's replaces it
    if device is not None:
        model.to(device)
    kernels.use_kernel(model, kernel)
    trim()
    return model.eval()


def _check_against(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the model expects is in the file with its shape and kind of dtype (a float
    may be stored in another float dtype; integers and bools exactly), and nothing else is."""
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise LowbitFormatError(
            "the file does not match the model: "
            + (f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} " if missing else "")
            + (f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else "")
        )
    for k, want in expected.items():
        got = tensors[k]
        if got is want:
            continue
        same_kind = got.dtype == want.dtype or (got.is_floating_point() and want.is_floating_point())
        if tuple(got.shape) != tuple(want.shape) or not same_kind:
            raise LowbitFormatError(
                f"the file's {k} is {str(got.dtype).replace('torch.', '')} {tuple(got.shape)}, the model's is "
                f"{str(want.dtype).replace('torch.', '')} {tuple(want.shape)}"
            )
