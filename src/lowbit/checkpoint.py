"""Streaming quantization: transformers checkpoints larger than memory, one layer at a time.

A checkpoint directory (``config.json`` plus ``model.safetensors`` or shards listed by
``model.safetensors.index.json``; bf16, fp16 or fp32) is read tensor by tensor (plain reads at
the offsets the safetensors header gives); the model itself only ever exists as a skeleton on the meta
device (transformers' class from the config, built under accelerate's ``init_empty_weights``).
For each layer the recipe quantizes, its weight is read, converted to float32, quantized, written
to the output's current shard (:class:`lowbit.io.writer.ModelWriter`) and freed; every other
tensor is copied through in its source dtype (a bf16 embedding stays bf16). Peak memory is one
layer's float32 weight and its quantization temporaries plus one output shard's buffer, whatever
the model's size.

The output is the native format (:mod:`lowbit.io.safetensors_io`) and holds exactly the tensors,
in the same order, that quantizing the loaded model in memory and calling :func:`lowbit.save`
gives (same bytes for an fp32 source; a bf16 source's unquantized tensors stay bf16 here).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from . import swappable
from .algorithms import get_algorithm
from .driver import LayerRecord, QuantizeError, _plan, _swap, layer_errors
from .io.shards import DEFAULT_SHARD_BYTES, read_tensors
from .io.writer import ModelWriter
from .memory import trim
from .nn import QuantModule
from .primitives import check_finite
from .recipe import Recipe

__all__ = ["Checkpoint", "CheckpointError", "skeleton", "quantize_checkpoint"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be streamed: missing, truncated or foreign files, an index
    that names absent tensors, tensors that do not match the config."""


class Checkpoint:
    """The tensors of a transformers checkpoint directory, read one at a time (memory-mapped).

    Opening checks every shard's header (a missing or truncated shard is named) and that the index
    names only tensors its shards hold; no tensor data is read until :meth:`tensor`.
    Raises :class:`CheckpointError`.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.dir = Path(path)
        if not (self.dir / "config.json").is_file():
            raise CheckpointError(f"{self.dir} is not a transformers checkpoint: it has no config.json")
        if (self.dir / INDEX).is_file():
            try:
                index = json.loads((self.dir / INDEX).read_text())
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{self.dir / INDEX} is not a safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            pickled = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
            raise CheckpointError(
                f"{self.dir} has no {SINGLE} or {INDEX}"
                + (f"; {', '.join(pickled[:3])} are pickle files, which lowbit never loads: convert them to safetensors"
                   if pickled else "")  # fmt: skip
            )
        self.info: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}
        self.nbytes = 0
        for fname in files:
            f = self.dir / fname
            if Path(fname).name != fname or not f.is_file():
                raise CheckpointError(f"shard {fname} of {self.dir} is missing")
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for k in handle.keys():
                        sl = handle.get_slice(k)
                        self.info[k] = (fname, sl.get_dtype(), tuple(sl.get_shape()))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"shard {fname} of {self.dir} is truncated or not a safetensors file: "
                                      f"{str(e)[:200]}") from None  # fmt: skip
            self.nbytes += f.stat().st_size
        if weight_map is not None:
            absent = sorted(n for n, fname in weight_map.items() if self.info.get(n, (None,))[0] != fname)
            if absent:
                raise CheckpointError(f"{INDEX} names {len(absent)} tensor(s) its shards do not hold, e.g. "
                                      f"{absent[0]!r} in {weight_map[absent[0]]}")  # fmt: skip

    def names(self) -> list[str]:
        return list(self.info)

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's torch dtype if it is a float (BF16/F16/F32), else None."""
        return _FLOATS.get(self.info[name][1])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name][2]

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, read into memory of its own (no memory map:
        :func:`lowbit.io.shards.read_tensors`)."""
        if name not in self.info:
            raise CheckpointError(f"{self.dir} holds no tensor {name!r}")
        return read_tensors(self.dir / self.info[name][0], {name})[name]


def skeleton(ck: Checkpoint) -> nn.Module:
    """The checkpoint's transformers model with every parameter on the meta device (buffers that
    are not stored, e.g. rotary frequencies, are real), checked against the checkpoint: each
    parameter and stored buffer must be a float tensor of the config's shape (an LM head tied to
    the embedding may be absent). Raises :class:`CheckpointError`."""
    from .models.zoo import _offline

    _offline()
    try:
        import transformers
        from accelerate import init_empty_weights
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("streaming a transformers checkpoint needs the 'hf' extra: pip install 'lowbit[hf]'") from e
    try:
        config = transformers.AutoConfig.from_pretrained(str(ck.dir))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ck.dir / 'config.json'} is not a transformers config: {str(e)[:200]}") from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = transformers.AutoModelForCausalLM if arch.endswith("ForCausalLM") else transformers.AutoModel
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=torch.float32)
    model.tie_weights()  # (from_config on empty weights leaves tied weights untied)
    model.eval()
    tied = {id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        first = seen.setdefault(id(t), name)
        if name not in ck.info:
            if first != name and id(t) in tied:
                continue  # a tied weight stored once under its first name
            raise CheckpointError(f"{ck.dir} lacks {name!r}, which the config's {type(model).__name__} needs")
        if ck.shape(name) != tuple(t.shape) or ck.dtype(name) is None:
            raise CheckpointError(
                f"{ck.dir}: {name!r} is {ck.info[name][1]} {ck.shape(name)}; the config's {type(model).__name__} "
                f"needs a float tensor of shape {tuple(t.shape)}"
            )
    model.lowbit_source = str(ck.dir)
    return model


CHUNK_BYTES = 64 << 20  # float32 rows quantized at a time: bounds a huge layer's temporaries


def _quantize_rows(algo, w: torch.Tensor, scheme, name: str, options: dict):
    """Quantize ``w`` (2-D, any float dtype) in blocks of rows of at most :data:`CHUNK_BYTES` as
    float32, joined (:meth:`QWeight.cat_rows`): the same bytes as one call on the whole float32
    weight for the data-free methods, whose per-channel/per-group parameters never span rows;
    per-tensor schemes, and the rare weight whose blocks chose different scale dtypes (some
    outside float16's range), are quantized whole."""
    from .qweight import QWeight

    rows = max(1, CHUNK_BYTES // (4 * max(1, w.shape[1])))
    if scheme.per_tensor or w.shape[0] <= rows:
        wf = w.float()
        check_finite(wf, name)
        return algo.quantize_weight(wf, scheme, name=name, **options)
    parts = []
    for i in range(0, w.shape[0], rows):
        wf = w[i : i + rows].float()
        check_finite(wf, name)
        parts.append(algo.quantize_weight(wf, scheme, name=name, **options))
    try:
        return QWeight.cat_rows(parts)
    except ValueError:
        del parts
        return algo.quantize_weight(w.float(), scheme, name=name, **options)


def _module_for(mod: nn.Module, prefix: str, ck: Checkpoint) -> nn.Module:
    """A copy of skeleton module ``mod`` (named ``prefix``) that a quantized module can be built
    from: its weight stays on the meta device (read and quantized separately), every other
    parameter or buffer is read from the checkpoint in float32."""
    real = copy.deepcopy(mod)
    for store in (real._parameters, real._buffers):
        for n, t in list(store.items()):
            if t is None or n == "weight":
                continue
            v = ck.tensor(f"{prefix}.{n}").to(torch.float32)
            store[n] = nn.Parameter(v, requires_grad=False) if isinstance(t, nn.Parameter) else v
    return real


@torch.no_grad()
def quantize_layer(ck: Checkpoint, mname: str, mod: nn.Module, kind: str, scheme, algo, options: dict):
    """Quantize planned layer ``mname`` (its skeleton module ``mod``) of checkpoint ``ck``: returns
    its manifest entry and ``[(leaf name, tensor)]`` in the quantized module's state-dict order."""
    from .io.writer import module_entry

    real = _module_for(mod, mname, ck)
    with layer_errors(mname):
        wt = ck.tensor(f"{mname}.weight")  # (out, in...) in the stored dtype
        src_dtype = wt.dtype
        if kind == "linear" and swappable.is_hf_conv1d(real):
            wt = wt.t()
        qw = _quantize_rows(algo, wt.reshape(wt.shape[0], -1), scheme, f"{mname}.weight", options)
        qw.shape = tuple(wt.shape)
        new: QuantModule = _swap(real, kind, qw, algo.name)
    new.orig_dtype = str(src_dtype).replace("torch.", "")
    return module_entry(new), list(new.state_dict().items())


@torch.no_grad()
def quantize_checkpoint(
    src: str | os.PathLike,
    spec,
    out: str | os.PathLike,
    *,
    method: str = "rtn",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    tokenizer=None,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    **options,
) -> Path:
    """Quantize the checkpoint in directory ``src`` layer by layer into the lowbit directory ``out``.

    Args:
        src: a transformers checkpoint directory (config.json + safetensors, single or sharded).
        spec: a scheme string, :class:`lowbit.scheme.Scheme` or :class:`Recipe` (as for
            :func:`lowbit.quantize`).
        out: the output directory, written atomically (an existing lowbit model there is replaced
            only once the new one is complete).
        method: a data-free method (``rtn``, ``hqq``).
        max_shard_bytes: the largest output tensor file in bytes.
        tokenizer: saved beside the model when given (else the checkpoint's tokenizer files are
            copied as they are).
        ray_address: quantize the layers on a Ray cluster (``"local"``: start one here; ``"auto"``
            or ``"host:port"``: join one) whose nodes read ``src`` from the same path (shared
            storage); the output is byte-identical to a run without Ray (:mod:`lowbit.distributed`).
        ray_workers: at most this many layers in flight at once (default: the cluster's CPUs).
        **options: the method's options, as for :func:`lowbit.quantize`.

    Peak memory is about one layer's float32 weight with its quantization temporaries plus one
    output shard (``max_shard_bytes``), independent of the number of layers. Raises
    :class:`CheckpointError` for unreadable checkpoints, :class:`lowbit.driver.QuantizeError`
    (bad method, options or scheme), ``ValueError`` for NaN/Inf weights (naming the layer).
    """
    algo = get_algorithm(method)
    if algo.uses_calibration:
        raise QuantizeError(f"streaming quantization with {method!r} (a calibrated method) is not available yet; "
                            "use a data-free method (rtn, hqq)")  # fmt: skip
    algo_options = algo.check_options(options)
    recipe = Recipe.coerce(spec)
    ck = Checkpoint(src)
    model = skeleton(ck)
    todo, records, heads = _plan(model, recipe, allow_meta=True)
    for scheme in sorted({t[3] for t in todo}, key=str):
        problem = algo.serves(scheme)
        if problem:
            raise QuantizeError(f"method {method!r} cannot serve scheme {scheme}: {problem}")
    acts = sorted(t[0] for t in todo if t[3].act_bits)
    if acts:
        raise QuantizeError(f"activation schemes need calibration or a kernel pass that streaming does not do yet: "
                            f"{', '.join(acts[:3])}")  # fmt: skip
    planned = {t[0]: t for t in todo}
    owner = {}  # state-dict name -> the planned module it belongs to
    for name in planned:
        for leaf, _ in planned[name][1].named_parameters():
            owner[f"{name}.{leaf}"] = name
    # what to write, in state-dict order: ("tensor", name) copied through, ("alias", name, first
    # name) for a tied tensor stored once, ("layer", module) for a planned layer
    plan: list[tuple] = []
    first: dict[int, str] = {}
    seen: set[str] = set()
    for tname, t in model.state_dict(keep_vars=True).items():
        stored = first.setdefault(id(t), tname)
        mname = owner.get(tname)
        if mname is None:
            plan.append(("alias", tname, stored) if stored != tname else ("tensor", tname))
        elif mname not in seen:
            seen.add(mname)
            plan.append(("layer", mname))
    layers = [p[1] for p in plan if p[0] == "layer"]
    if ray_address is not None:
        from .distributed import ray_layers

        results = ray_layers(ray_address, str(ck.dir), [(m, planned[m][2], str(planned[m][3])) for m in layers],
                             method, algo_options, workers=ray_workers)  # fmt: skip
    else:
        results = (quantize_layer(ck, m, planned[m][1], planned[m][2], planned[m][3], algo, algo_options)
                   for m in layers)  # fmt: skip
    it = plan
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(plan, desc=f"quantize ({method}, streaming)", unit="tensor")
    head_quantized = False
    with ModelWriter(out, max_shard_bytes=max_shard_bytes) as w:
        for item in it:
            if item[0] == "alias":
                w.aliases[item[1]] = item[2]
                continue
            if item[0] == "tensor":
                w.add_tensor(item[1], ck.tensor(item[1]))
                continue
            mname = item[1]
            entry, tensors = next(results)
            w.modules[mname] = entry
            for leaf, v in tensors:
                w.add_tensor(f"{mname}.{leaf}", v)
            _, mod, _kind, scheme, why = planned[mname]
            records[mname] = LayerRecord(mname, type(mod).__name__, "quantized", str(scheme), method, why)
            head_quantized |= mname in heads
            del entry, tensors
            trim()
        if head_quantized and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # as lowbit.quantize does
        if tokenizer is None:
            tokenizer = _tokenizer(ck.dir)
        return w.finish(model, layers={n: r.to_dict() for n, r in records.items()}, source=str(ck.dir),
                        tokenizer=tokenizer)  # fmt: skip


def _tokenizer(d: Path):
    """The checkpoint's tokenizer, or None when it has none (or none transformers can read)."""
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d))
    except (OSError, ValueError):
        return None
