"""Streaming quantization: transformers checkpoints larger than memory, one layer at a time.

A checkpoint directory (``config.json`` plus ``model.safetensors`` or shards listed by
``model.safetensors.index.json``; bf16, fp16 or fp32) is read tensor by tensor (plain reads at
the offsets the safetensors header gives); the model itself only ever exists as a skeleton on the meta
device (transformers' class from the config, built under accelerate's ``init_empty_weights``).
For each layer the recipe quantizes, its weight is read, converted to float32, quantized, written
to the output's current shard (:class:`lowbit.io.writer.ModelWriter`) and freed; every other
tensor is copied through in its source dtype (a bf16 embedding stays bf16). Peak memory is one
layer's float32 weight and its quantization temporaries plus two output shards' buffers (one
filling while the one before it is written), whatever the model's size.

The output is the native format (:mod:`lowbit.io.safetensors_io`) and holds exactly the tensors,
in the same order, that quantizing the loaded model in memory and calling :func:`lowbit.save`
gives (same bytes for an fp32 source; a bf16 source's unquantized tensors stay bf16 here).

Calibrated methods (GPTQ, AWQ, SmoothQuant, static activations) run the calibration driver
(:func:`lowbit.calibrate.run`) on the skeleton itself: a :class:`BlockStream` gives the modules
before the first block their values while the calibration inputs are captured, then each block
its values when its turn comes; the block is calibrated and quantized exactly as in memory,
its outputs feed the next block, and it is written out and emptied. Layers after the blocks
(a quantized LM head) are calibrated on the last block's outputs, replayed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import swappable
from .algorithms import get_algorithm
from .driver import LayerRecord, QuantizeError, _plan, _set_module, _swap, layer_errors
from .io.shards import DEFAULT_SHARD_BYTES, DTYPES, read_header, read_rows, read_tensors, shard_name
from .io.writer import ModelWriter
from .memory import trim
from .nn import QuantModule
from .primitives import NonFiniteError, check_finite
from .recipe import Recipe

__all__ = ["Checkpoint", "CheckpointError", "BlockStream", "skeleton", "model_classes", "quantize_checkpoint", "tokenizer_of"]

INDEX = "model.safetensors.index.json"
SINGLE = shard_name(1, 1)  # model.safetensors


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
        self.info: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # name -> (file, safetensors dtype, shape)
        self._headers: dict[str, tuple[int, dict]] = {}  # file -> read_header(), kept once read
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
        t = DTYPES.get(self.info[name][1])
        return t if t in (torch.bfloat16, torch.float16, torch.float32) else None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name][2]

    def nbytes_of(self, name: str) -> int:
        """Bytes of tensor ``name``'s data (from the header alone)."""
        t = DTYPES.get(self.info[name][1])
        return math.prod(self.info[name][2]) * (t.itemsize if t is not None else 1)

    def tensor(self, name: str, *, check: bool = True) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, read into memory of its own (no memory map:
        :func:`lowbit.io.shards.read_tensors`). Raises :class:`lowbit.primitives.NonFiniteError`
        naming it when a float tensor holds NaN or Inf (``check=False``: the caller checks, as
        every quantization method does for the weight it quantizes)."""
        path, header = self._shard_of(name)
        t = read_tensors(path, {name}, header=header)[name]
        if check:
            self._check(name, t)
        return t

    def rows(self, name: str, start: int, stop: int, *, check: bool = True) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (dim 0), read alone; checked as :meth:`tensor`."""
        path, header = self._shard_of(name)
        t = read_rows(path, name, start, stop, header)
        if check:
            self._check(name, t)
        return t

    def _shard_of(self, name: str) -> tuple[Path, tuple[int, dict]]:
        """The shard holding ``name`` and its parsed header (read once per shard)."""
        if name not in self.info:
            raise CheckpointError(f"{self.dir} holds no tensor {name!r}")
        fname = self.info[name][0]
        if fname not in self._headers:
            self._headers[fname] = read_header(self.dir / fname)
        return self.dir / fname, self._headers[fname]

    def _check(self, name: str, t: torch.Tensor) -> None:
        if not t.is_floating_point():
            return
        from .kernels import cpu

        bad = cpu.count_nonfinite(t)  # exponent bits tested in C: no float copy of a bf16 tensor
        if bad is None:  # (no CPU library, or float64)
            flat, step = t.reshape(-1), 1 << 24  # (isfinite's bool temporary stays at 16 MiB per step)
            bad = sum(int((~torch.isfinite(flat[j : j + step])).sum()) for j in range(0, flat.numel(), step))
        if bad:
            raise NonFiniteError(f"{self.dir}: tensor {name!r} has {bad} NaN/Inf value(s); lowbit "
                                 "quantizes and copies finite models only")  # fmt: skip


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
    problems = []
    for cls in model_classes(config):
        with init_empty_weights(include_buffers=False):
            model = cls._from_config(config, dtype=torch.float32)
        model.tie_weights()  # (from_config on empty weights leaves tied weights untied)
        model.eval()
        problem = _mismatch(ck, model)
        if problem is None:
            break
        problems.append(problem)
    else:
        raise CheckpointError(problems[0] if problems else f"{ck.dir}: transformers has no model class for this config")
    used = set(model.state_dict(keep_vars=True))
    unused = [n for n in ck.info if n not in used and not n.endswith(IGNORED)]
    if unused:
        warnings.warn(f"{ck.dir}: {len(unused)} stored tensor(s) are not part of {type(model).__name__} and are "
                      f"not written, e.g. {', '.join(unused[:3])}", stacklevel=2)  # fmt: skip
    model.lowbit_source = str(ck.dir)
    return model


IGNORED = ("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")  # buffers old transformers saved


def model_classes(config) -> list:
    """transformers classes that may build a checkpoint with ``config``, most likely first: those
    its ``architectures`` name (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...), then the
    config's causal-LM class and its base model (a config without ``architectures``)."""
    import transformers

    out = []
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            out.append(cls)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            cls = auto._model_mapping[type(config)]
        except KeyError:
            continue
        if cls not in out:
            out.append(cls)
    return out


def _mismatch(ck: Checkpoint, model: nn.Module) -> str | None:
    """Why checkpoint ``ck`` cannot fill skeleton ``model`` (None: it can): a tensor the model
    needs is absent, or not a float tensor of the config's shape."""
    tied = {id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        first = seen.setdefault(id(t), name)
        if name not in ck.info:
            if first != name and id(t) in tied:
                continue  # a tied weight stored once under its first name
            return f"{ck.dir} lacks {name!r}, which the config's {type(model).__name__} needs"
        if ck.shape(name) != tuple(t.shape) or ck.dtype(name) is None:
            return (f"{ck.dir}: {name!r} is {ck.info[name][1]} {ck.shape(name)}; the config's "
                    f"{type(model).__name__} needs a bf16, fp16 or fp32 tensor of shape {tuple(t.shape)}")  # fmt: skip
    return None


CHUNK_BYTES = 64 << 20  # float32 rows quantized at a time: bounds a huge layer's temporaries


def _quantize_rows(algo, rows_of, shape: tuple[int, int], scheme, name: str, options: dict):
    """Quantize a 2-D weight of ``shape`` whose rows ``rows_of(start, stop)`` gives (in the stored
    float dtype: the data-free methods read bf16/fp16 and convert what they need) in blocks of
    rows of at most :data:`CHUNK_BYTES` as float32, each block's codes and parameters copied into
    the output as soon as it is quantized: a huge weight (an LM head) is never whole in memory,
    stored or quantized twice. The same bytes as one call on the whole float32 weight for the
    data-free methods, whose per-channel/per-group parameters never span rows; per-tensor schemes,
    and the rare weight whose blocks chose different scale dtypes (some outside float16's range),
    are quantized whole."""
    from .qweight import QWeight

    n, k = shape
    step = max(1, CHUNK_BYTES // (4 * max(1, k)))
    if scheme.per_tensor or n <= step:  # (the methods refuse NaN/Inf, naming ``name``)
        return algo.quantize_weight(rows_of(0, n), scheme, name=name, **options)
    first, out = None, None
    for i in range(0, n, step):
        part = algo.quantize_weight(rows_of(i, min(n, i + step)), scheme, name=name, **options)
        ts = (part.data, part.scale, part.zero)
        if first is None:
            first = part
            out = [None if t is None else torch.empty((n, *t.shape[1:]), dtype=t.dtype) for t in ts]
        if part.layout != "rows" or any(
            (t is None) != (o is None) or (t is not None and (t.dtype != o.dtype or t.shape[1:] != o.shape[1:]))
            for t, o in zip(ts, out)
        ):  # fmt: skip
            del out, part, ts
            return algo.quantize_weight(rows_of(0, n), scheme, name=name, **options)
        for t, o in zip(ts, out):
            if t is not None:
                o[i : i + t.shape[0]] = t
    return QWeight(first.scheme, (n, k), *out)


READ_AHEAD_BYTES = 512 << 20  # larger stored weights (an LM head) are read a block of rows at a time


def _read_ahead(ck: Checkpoint, names: list[str]):
    """The checkpoint's tensors ``names`` in order, the next one read from disk in a thread while
    the caller quantizes this one (reads release the GIL): the disk and the CPU work at once, for
    one more stored weight in memory. A weight over :data:`READ_AHEAD_BYTES` is not read (None):
    :func:`quantize_layer` reads it in blocks of rows."""
    from concurrent.futures import ThreadPoolExecutor

    def read(name):
        # (unchecked: every method refuses NaN/Inf in the weight it quantizes, naming the layer)
        return ck.tensor(name, check=False) if ck.nbytes_of(name) <= READ_AHEAD_BYTES else None

    with ThreadPoolExecutor(1, thread_name_prefix="lowbit-read") as pool:
        nxt = pool.submit(read, names[0]) if names else None
        for i in range(len(names)):
            w = nxt.result()
            nxt = pool.submit(read, names[i + 1]) if i + 1 < len(names) else None
            yield w
            del w


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
def quantize_layer(ck: Checkpoint, mname: str, mod: nn.Module, kind: str, scheme, algo, options: dict,
                   weight: torch.Tensor | None = None, weight_name: str | None = None):  # fmt: skip
    """Quantize planned layer ``mname`` (its skeleton module ``mod``) of checkpoint ``ck``: returns
    its manifest entry and ``[(leaf name, tensor)]`` in the quantized module's state-dict order.
    ``weight``: its stored weight, when already read (:func:`_read_ahead`); ``weight_name``: the
    name the checkpoint stores it under, when not ``<mname>.weight`` (a head tied to the embedding)."""
    from .io.writer import module_entry

    real = _module_for(mod, mname, ck)
    wname = weight_name or f"{mname}.weight"
    with layer_errors(mname):
        shape = ck.shape(wname)  # (out, in...); rows read in the stored dtype
        if kind == "linear" and swappable.is_hf_conv1d(real):  # stored (in, out): read whole
            wt = (ck.tensor(wname, check=False) if weight is None else weight).t()
            shape = tuple(wt.shape)
            rows_of = lambda a, b: wt[a:b]  # noqa: E731
        elif weight is not None:
            rows_of = lambda a, b: weight[a:b].reshape(b - a, -1)  # noqa: E731
        else:
            rows_of = lambda a, b: ck.rows(wname, a, b, check=False).reshape(b - a, -1)  # noqa: E731
        qw = _quantize_rows(algo, rows_of, (shape[0], math.prod(shape[1:])), scheme, f"{mname}.weight", options)
        qw.shape = tuple(shape)
        new: QuantModule = _swap(real, kind, qw, algo.name)
    new.orig_dtype = str(ck.dtype(wname)).replace("torch.", "")
    return module_entry(new), list(new.state_dict().items())


def _stored_names(state: dict, ck: Checkpoint) -> dict[int, str]:
    """``id(tensor)`` -> the name checkpoint ``ck`` stores it under, for a skeleton's state dict
    (``keep_vars``): a tied tensor (head and embedding) is stored once, under one of its names."""
    out: dict[int, str] = {}
    for name, t in state.items():
        if name in ck.info:
            out.setdefault(id(t), name)
    return out


class _Values:
    """Checkpoint values put into a meta skeleton's modules (as float32) and taken out again."""

    def __init__(self, ck: Checkpoint, stored: dict[int, str]):
        self.ck = ck
        self.stored = stored  # id(meta tensor) -> the name the checkpoint stores it under (_stored_names)
        self.real: dict[int, torch.Tensor] = {}  # id(meta tensor) -> its values (tied tensors: once)

    def load(self, mod: nn.Module, recurse: bool = True) -> list:
        """Give ``mod`` (and its children) their values; returns what :meth:`unload` takes."""
        undo = []
        for m in mod.modules() if recurse else [mod]:
            for store in (m._parameters, m._buffers):
                for k, t in list(store.items()):
                    if t is None or t.device.type != "meta":
                        continue
                    v = self.real.get(id(t))
                    if v is None:
                        name = self.stored.get(id(t))
                        if name is None:
                            raise CheckpointError(f"{self.ck.dir} stores no values for {k!r} of a {type(m).__name__}")
                        v = self.ck.tensor(name).to(torch.float32)
                        v = nn.Parameter(v, requires_grad=False) if isinstance(t, nn.Parameter) else v
                        self.real[id(t)] = v
                    store[k] = v
                    undo.append((store, k, t))
        return undo

    def unload(self, undo: list) -> None:
        for store, k, t in undo:
            store[k] = t
            self.real.pop(id(t), None)


class BlockStream:
    """What :func:`lowbit.calibrate.run` needs to calibrate a meta skeleton block by block: it
    reads each block's values when the block's turn comes (``load``), the modules outside the
    blocks when a forward pass calls them (``outside``), and writes each finished block to the
    output in state-dict order and frees it (``block_done``); quantized layers outside the blocks
    (``take``) are written where the order puts them once they exist (the head, after the blocks).

    A float tensor of a block (a norm's weight) is written in the checkpoint's dtype when that
    holds its value exactly, else in float32 (a norm that AWQ or SmoothQuant folded scales into).
    """

    def __init__(self, ck: Checkpoint, model: nn.Module, plan: list, planned: dict, writer: ModelWriter,
                 records: dict, method: str, prefix: str, stored: dict[int, str],
                 activation_budget: int | None = None):  # fmt: skip
        self.ck, self.model, self.plan, self.planned, self.w = ck, model, plan, planned, writer
        self.activation_budget, self.spilling, self.spilled = activation_budget, False, 0
        self.ray: tuple | None = None  # (address, workers): the calibration batches on Ray workers
        self.opened: list = []  # their RayInputs, closed at the end
        self.records, self.method, self.prefix = records, method, prefix + "."
        self.values = _Values(ck, stored)
        # each planned layer's weight as the checkpoint names it (a tied head: the embedding's name)
        self.weight_names = {n: stored.get(id(t[1].weight)) for n, t in planned.items()}
        self.names = {id(t[1]): n for n, t in planned.items()}  # planned float module -> its name
        self.loaded: dict[int, list] = {}  # id(module) -> its values' undo list (blocks, embeddings)
        self.scopes: list[list] = []  # undo lists of the open outside() passes
        self.ready: dict[str, nn.Module] = {}  # quantized layers not yet written
        self.pos = 0  # plan items written
        self.deferred: list[str] = []  # planned layers outside the blocks, quantized later

    def load(self, mod: nn.Module, recurse: bool = True) -> None:
        undo = self.values.load(mod, recurse)
        (self.scopes[-1] if self.scopes else self.loaded.setdefault(id(mod), [])).extend(undo)
        for m in mod.modules() if recurse else [mod]:
            if id(m) in self.names:
                check_finite(m.weight, f"{self.names[id(m)]}.weight")

    @contextlib.contextmanager
    def outside(self, model: nn.Module, blocks: nn.Module | None):
        """While open, a module outside ``blocks`` gets its values when called; freed on exit."""
        inside = {id(m) for m in blocks.modules()} if blocks is not None else set()
        handles = []
        for m in model.modules():
            own = [*m._parameters.values(), *m._buffers.values()]
            if id(m) not in inside and any(t is not None and t.device.type == "meta" for t in own):
                handles.append(m.register_forward_pre_hook(lambda mod, args: self.load(mod, recurse=False)))
        self.scopes.append([])
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.values.unload(self.scopes.pop())

    def spills(self, nbytes: int) -> bool:
        """Whether the calibration activations (``nbytes`` per copy; a block's inputs and outputs
        coexist) go to disk: when two copies exceed the budget (default a quarter of the memory
        available now)."""
        from .memory import available_bytes

        budget = self.activation_budget if self.activation_budget is not None else available_bytes() // 4
        self.spilling = 2 * nbytes > budget
        return self.spilling

    def spill(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` copied into a file-backed tensor (a shared memory map of an unlinked file beside
        the output): its pages are written back and evicted under memory pressure instead of
        staying resident; the file is gone as soon as the tensor is (nothing is left behind, even
        by a killed run)."""
        import tempfile

        fd, path = tempfile.mkstemp(prefix=f".{self.w.dst.name}.act-", dir=self.w.dst.parent)
        try:
            os.close(fd)
            mapped = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        finally:
            os.unlink(path)
        mapped.copy_(t)
        self.spilled += t.nbytes
        return mapped

    def take(self, quantized: list) -> None:
        """Quantized layers outside the blocks (their float values are freed)."""
        for name, new in quantized:
            self._record(name, new)
            self.ready[name] = new
            self.values.unload(self.loaded.pop(id(self.planned[name][1]), []))

    def block_done(self, bname: str, block: nn.Module, quantized: list) -> None:
        """Write block ``bname`` (its quantized layers ``[(name, module)]`` are in it) and free it."""
        for name, new in quantized:
            self._record(name, new)
            self.ready[name] = new
        self._write(block_limit=int(bname[len(self.prefix) :]) + 1, block=(bname, block.state_dict()))
        for name, _ in quantized:  # the skeleton's float modules back in place, emptied
            _set_module(self.model, name, self.planned[name][1])
        self.values.unload(self.loaded.pop(id(block), []))

    def finish(self) -> None:
        self._write(block_limit=None, block=None)
        for name in self.deferred:
            self._write_layer(name)

    def _record(self, name: str, new) -> None:
        _, mod, _kind, scheme, why = self.planned[name]
        w = self.weight_names[name]
        new.orig_dtype = str(self.ck.dtype(w) if w is not None else torch.float32).replace("torch.", "")
        self.records[name] = LayerRecord(name, type(mod).__name__, "quantized", str(new.scheme), new.method, why)

    def _block_of(self, name: str) -> int | None:
        if not name.startswith(self.prefix):
            return None
        return int(name[len(self.prefix) :].split(".", 1)[0])

    def _write(self, block_limit: int | None, block) -> None:
        """Write plan items in order up to the first of block ``block_limit`` (None: to the end);
        ``block``: (name, state dict) of the block just finished, whose tensors are due."""
        while self.pos < len(self.plan):
            item = self.plan[self.pos]
            b = self._block_of(item[1])
            if block_limit is not None and b is not None and b >= block_limit:
                return  # a later block's
            self.pos += 1
            if item[0] == "alias":
                self.w.aliases[item[1]] = item[2]
            elif item[0] == "layer":
                if item[1] in self.ready:
                    self._write_layer(item[1])
                elif b is None:
                    self.deferred.append(item[1])
                else:  # pragma: no cover - calibrate.run quantizes every planned layer of a block
                    raise RuntimeError(f"{item[1]} was planned but not quantized")
            elif b is None:
                self.w.make_room(item[1], self.ck.nbytes_of(item[2]), len(self.ck.shape(item[2])))
                self.w.add_tensor(item[1], self.ck.tensor(item[2]))
            else:
                bname, sd = block
                v = sd[item[1][len(bname) + 1 :]]
                src = self.ck.dtype(item[2]) or torch.float32
                stored = v.to(src)
                self.w.add_tensor(item[1], stored if torch.equal(stored.to(v.dtype), v) else v)

    def _write_layer(self, name: str) -> None:
        from .io.writer import module_entry

        new = self.ready.pop(name)
        self.w.modules[name] = module_entry(new)
        for leaf, v in new.state_dict().items():
            self.w.add_tensor(f"{name}.{leaf}", v)
        trim()


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
    calibration=None,
    observer: str = "minmax",
    bias_correction: bool | None = None,
    activation_budget: int | None = None,
    **options,
) -> Path:
    """Quantize the checkpoint in directory ``src`` layer by layer into the lowbit directory ``out``.

    Args:
        src: a transformers checkpoint directory (config.json + safetensors, single or sharded).
        spec: a scheme string, :class:`lowbit.scheme.Scheme` or :class:`Recipe` (as for
            :func:`lowbit.quantize`).
        out: the output directory, written atomically (an existing lowbit model there is replaced
            only once the new one is complete).
        method: any method; a calibrated one (``gptq``, ``awq``, ``awq+gptq``, ``smoothquant``;
            or a static activation scheme) needs ``calibration`` and runs block by block
            (:func:`lowbit.calibrate.run` on the skeleton, each block read when its turn comes:
            :class:`BlockStream`), giving the bytes the in-memory path gives for a float32 source.
        max_shard_bytes: the largest output tensor file in bytes.
        tokenizer: saved beside the model when given (else the checkpoint's tokenizer files are
            copied as they are).
        ray_address: run on a Ray cluster (``"local"``: start one here; ``"auto"`` or
            ``"host:port"``: join one; :mod:`lowbit.distributed`). Data-free methods: the layers
            are quantized on its nodes, which read ``src`` from the same path (shared storage);
            the output is byte-identical to a run without Ray. Calibrated methods (not static
            activation schemes): the calibration batches are split across workers that run each
            block on their part and send back its statistics (Hessians, activation maxima,
            sampled rows), summed here; the output equals one process's up to float summation
            order in the Hessians.
        ray_workers: at most this many layers in flight at once, or this many calibration
            workers (default: the cluster's CPUs).
        calibration, observer: as for :func:`lowbit.quantize`.
        bias_correction: must be False or None when a static layer has a bias (bias correction
            needs the whole model's outputs; streaming refuses it).
        activation_budget: bytes of calibration activations (a block's inputs and outputs, float32)
            kept in memory; above it they live in memory-mapped files beside the output, which
            the OS writes back and evicts as needed (default: a quarter of the memory available).
        **options: the method's options, as for :func:`lowbit.quantize`.

    With ``method="rtn"`` or ``"hqq"`` (both fused in C) sets glibc's mmap threshold for the process
    (:func:`lowbit.memory.release_large_frees`).
    Peak memory is about one layer's float32 weight with its quantization temporaries plus two
    output shards (``2 * max_shard_bytes``: one fills while the other is written), independent of the number of layers; calibrated methods
    add one block's float32 weights, the block's inputs and outputs for every calibration batch
    and the block's statistics (Hessians), and the modules before the first block (the
    embedding, as float32) while the calibration inputs are captured. Raises
    :class:`CheckpointError` for unreadable checkpoints, :class:`lowbit.driver.QuantizeError`
    (bad method, options or scheme), ``ValueError`` for NaN/Inf weights (naming the layer).
    """
    from .memory import release_large_frees

    algo = get_algorithm(method)
    algo_options = algo.check_options(options)
    if algo.prunes:
        raise QuantizeError(f"{method} prunes weights, which streaming quantization does not do yet: load the model "
                            "and use lowbit.quantize (or the CLI without --stream)")  # fmt: skip
    recipe = Recipe.coerce(spec)
    if recipe.has_options:
        raise QuantizeError("the recipe prunes or corrects layers (+N%, +N:M, +rN), which streaming quantization does "
                            "not do yet: load the model and use lowbit.quantize (or the CLI without --stream)")  # fmt: skip
    ck = Checkpoint(src)
    if method in ("rtn", "hqq"):  # layer after layer of large buffers, each returned to the OS when freed
        release_large_frees()  # (torch-heavy methods would pay 3-5x in page faults: glibc's defaults there)
    model = skeleton(ck)
    todo, records, heads = _plan(model, recipe, allow_meta=True)
    for scheme in sorted({t[3] for t in todo}, key=str):
        problem = algo.serves(scheme)
        if problem:
            raise QuantizeError(f"method {method!r} cannot serve scheme {scheme}: {problem}")
    static = any(t[3].act_static for t in todo)
    if static and ray_address is not None:
        raise QuantizeError("--ray does not take static activation schemes (their observers calibrate in one process)")
    planned = {t[0]: t for t in todo}
    owner = {}  # state-dict name -> the planned module it belongs to
    for name in planned:
        for leaf, _ in planned[name][1].named_parameters():
            owner[f"{name}.{leaf}"] = name
    # what to write, in state-dict order: ("tensor", name, checkpoint name) copied through, ("alias",
    # name, first name) for a tied tensor stored once, ("layer", module) for a planned layer
    plan: list[tuple] = []
    first: dict[int, str] = {}
    seen: set[str] = set()
    state = model.state_dict(keep_vars=True)
    in_ck = _stored_names(state, ck)
    source = {tname: in_ck.get(id(t), tname) for tname, t in state.items()}
    for tname, t in state.items():
        stored = first.setdefault(id(t), tname)
        mname = owner.get(tname)
        if mname is None:
            # a tied tensor whose first name is a quantized layer's is written float here, in full
            if stored == tname or owner.get(stored) is not None:
                plan.append(("tensor", tname, source[tname]))
            else:
                plan.append(("alias", tname, stored))
        elif mname not in seen:
            seen.add(mname)
            plan.append(("layer", mname))
    if algo.uses_calibration or static:
        return _calibrated(ck, model, plan, planned, todo, records, heads, algo, algo_options, method, out,
                           max_shard_bytes, progress, tokenizer, calibration, observer, bias_correction, in_ck,
                           activation_budget, None if ray_address is None else (ray_address, ray_workers))  # fmt: skip
    layers = [p[1] for p in plan if p[0] == "layer"]
    wnames = [source[f"{m}.weight"] for m in layers]  # (a tied head's weight is stored under the embedding's name)
    if ray_address is not None:
        from .distributed import ray_layers

        results = ray_layers(ray_address, str(ck.dir), [(m, planned[m][1], planned[m][2], str(planned[m][3]), wn)
                                                         for m, wn in zip(layers, wnames)], method, algo_options,
                             workers=ray_workers)  # fmt: skip
    else:
        results = (quantize_layer(ck, m, planned[m][1], planned[m][2], planned[m][3], algo, algo_options, weight=w,
                                  weight_name=wn) for m, wn, w in zip(layers, wnames, _read_ahead(ck, wnames)))  # fmt: skip
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
                w.make_room(item[1], ck.nbytes_of(item[2]), len(ck.shape(item[2])))  # before reading it
                w.add_tensor(item[1], ck.tensor(item[2]))
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
            tokenizer = tokenizer_of(ck.dir)
        return w.finish(model, layers={n: r.to_dict() for n, r in records.items()}, source=str(ck.dir.resolve()),
                        tokenizer=tokenizer)  # fmt: skip


def _calibrated(ck, model, plan, planned, todo, records, heads, algo, options, method, out, max_shard_bytes,
                progress, tokenizer, calibration, observer, bias_correction, stored, activation_budget,
                ray=None) -> Path:  # fmt: skip
    """The calibrated half of :func:`quantize_checkpoint`: :func:`lowbit.calibrate.run` on the
    skeleton with a :class:`BlockStream` reading and writing block by block."""
    from . import calibrate
    from .observers import OBSERVERS

    if observer not in OBSERVERS:
        raise QuantizeError(f"unknown observer {observer!r}; observers: {', '.join(OBSERVERS)}")
    static = [t for t in todo if t[3].act_static]
    if bias_correction and not static:
        raise QuantizeError("bias_correction applies to static activation schemes (w8a8-static, ...); none is used")
    corrected = [t[0] for t in static if bias_correction or getattr(t[1], "bias", None) is not None]
    if bias_correction is not False and corrected:
        raise QuantizeError(
            f"bias correction needs the whole quantized model's outputs, which streaming never holds ({corrected[0]}"
            f"{' and others' if len(corrected) > 1 else ''} would be corrected): pass bias_correction=False "
            "(--no-bias-correction) or quantize in memory (--no-stream)"
        )
    bad = sorted({t[0] for t in todo if t[2] not in ("linear", "embedding")})
    if bad:
        raise QuantizeError(f"streaming calibration quantizes linear layers and embeddings, not {', '.join(bad[:3])}")
    found = calibrate.find_blocks(model, outermost=True)
    if found is None:
        raise QuantizeError(f"{ck.dir}: streaming calibration needs a model of repeated blocks; this one has none")
    head_quantized = any(t[0] in heads for t in todo)
    with ModelWriter(out, max_shard_bytes=max_shard_bytes) as w:
        stream = BlockStream(ck, model, plan, planned, w, records, method, found[0], stored, activation_budget)
        stream.ray = ray
        try:
            calibrate.run(model, todo, algo, calibration, options, progress=progress, method=method,
                          make_module=lambda mod, kind, qw, act: _swap(mod, kind, qw, method, act), observer=observer,
                          bias_correction=False, stream=stream)  # fmt: skip
        finally:
            for inputs in stream.opened:
                inputs.close()
        stream.finish()
        model.lowbit_calibration = calibrate.provenance(calibration)
        if head_quantized and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # as lowbit.quantize does
        return w.finish(model, layers={n: r.to_dict() for n, r in records.items()}, source=str(ck.dir.resolve()),
                        tokenizer=tokenizer if tokenizer is not None else tokenizer_of(ck.dir))  # fmt: skip


def tokenizer_of(d: Path):
    """The checkpoint's tokenizer, or None when it has none (or none transformers can read)."""
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from .models.zoo import _offline

    _offline()
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d))
        tok.init_kwargs.pop("local_files_only", None)  # how it was loaded here, not part of the tokenizer
        return tok
    except (OSError, ValueError) as e:
        warnings.warn(f"{d}: its tokenizer files cannot be read ({str(e)[:120]}); the output gets no tokenizer",
                      stacklevel=2)  # fmt: skip
        return None
