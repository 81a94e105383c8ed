"""Writing lowbit's native format (``format_version`` 2, or 3 when a weight is pruned or has a
low-rank correction): a directory of safetensors shards plus
``lowbit.json``, written piece by piece and swapped into place atomically.

:class:`ModelWriter` is the one writer: :func:`lowbit.save` hands it a whole model's tensors,
the streaming quantizer (:mod:`lowbit.checkpoint`) one layer's at a time, and both give the same
bytes for the same tensors in the same order. Layout of the files: :mod:`lowbit.io.safetensors_io`.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..files import temp_dir_beside
from ..nn import QuantConv2d, QuantEmbedding, QuantModule, shared_row_conversion
from .shards import DEFAULT_SHARD_BYTES, ShardWriter

__all__ = ["ModelWriter", "save", "module_entry", "auto_class_name", "FORMAT_VERSION", "SPARSE_FORMAT_VERSION",
           "MANIFEST"]

FORMAT_VERSION = 2
SPARSE_FORMAT_VERSION = 3  # a file with a pruned, corrected or resized weight: older readers refuse it
MANIFEST = "lowbit.json"


class LowbitFormatError(ValueError):
    """A directory or file that is not a (valid, readable) lowbit model."""


def auto_class_name(model: nn.Module) -> str | None:
    """The transformers Auto class that rebuilds ``model`` from its config, or None."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        return None
    import transformers

    for auto in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForMaskedLM"):
        mapping = getattr(transformers, auto)._model_mapping
        try:
            if mapping[type(cfg)] is type(model):
                return auto
        except KeyError:
            continue
    return "AutoModel"


def module_entry(mod: QuantModule) -> dict[str, Any]:
    """The manifest entry of one quantized module (type, scheme, method, shape, arguments)."""
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
    if mod.mask is not None:
        entry["sparse"] = "bitmask"  # <name>.mask + only the kept codes (lowbit.sparse)
    if mod.lowrank_a is not None:
        entry["rank"] = mod.rank  # <name>.lowrank_a (N, r), .lowrank_b (r, K) float16
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
        exchanged = renameat2(at_fdcwd, os.fsencode(tmp), at_fdcwd, os.fsencode(dst), rename_exchange) == 0
    except (AttributeError, OSError):
        exchanged = False
    if exchanged:  # the new output is in place; tmp now holds the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old)


def _remove_stale(dst: Path) -> None:
    """Remove what a killed earlier run (SIGTERM before lowbit handled it, SIGKILL, power loss)
    left beside ``dst``: temporary files or directories ``.<name>.<tag>-<pid>[-*]`` (tag ``tmp``,
    or ``f32`` for the GGUF a llama.cpp quantization starts from) whose process no longer exists
    (a live writer's are kept)."""
    if not dst.parent.is_dir():
        return
    for d in dst.parent.iterdir():
        for tag in ("tmp", "f32"):
            prefix = f".{dst.name}.{tag}-"
            if d.name.startswith(prefix):
                break
        else:
            continue
        pid = d.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's): not ours to remove
        except ProcessLookupError:
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
        except OSError:
            continue


def _permissions(d: Path) -> None:
    """Give the temp directory and its files the modes a plain mkdir/open would have (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    d.chmod(0o777 & ~umask)
    for f in d.iterdir():
        f.chmod(0o666 & ~umask)


class ModelWriter:
    """A lowbit model directory being written: a temporary directory beside ``path`` until
    :meth:`finish` swaps it into place; on any error (or :meth:`abort`) it is removed and the
    previous output at ``path`` is untouched. Use as a context manager.

    Raises :class:`LowbitFormatError` when ``path`` is a file, or a non-empty directory that is
    not a lowbit model (never overwritten).
    """

    def __init__(self, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        # a symbolic link is written through: the directory it names is replaced, the link stays
        self.dst = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
        if self.dst.exists() and not self.dst.is_dir():
            raise LowbitFormatError(f"{self.dst} exists and is not a directory")
        if self.dst.exists() and any(self.dst.iterdir()) and not (self.dst / MANIFEST).exists():
            raise LowbitFormatError(f"{self.dst} is a non-empty directory that is not a lowbit model; not overwriting it")
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if self.dst.parent.exists() and not self.dst.parent.is_dir():
            raise LowbitFormatError(f"cannot write {self.dst}: {self.dst.parent} is a file")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.dst)
        self.modules: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self.tmp = temp_dir_beside(self.dst)
        self.shards = ShardWriter(self.tmp, max_shard_bytes, self.modules)

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self.abort()

    def add_module(self, name: str, mod: QuantModule) -> None:
        """Record quantized module ``name`` (before its tensors are added)."""
        self.modules[name] = module_entry(mod)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.add(name, tensor)

    def make_room(self, name: str, nbytes: int, dim: int) -> None:
        """See :meth:`ShardWriter.make_room`."""
        self.shards.make_room(name, nbytes, dim)

    def abort(self) -> None:
        running = self.shards.discard()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if running is not None:  # a shard still being written: its thread's file goes once it ends
            tmp = self.tmp
            running.add_done_callback(lambda _job: shutil.rmtree(tmp, ignore_errors=True))

    def finish(self, model: nn.Module, *, layers: dict, source: str | None = None, tokenizer=None) -> Path:
        """Write the last shard, the manifest and (transformers models) ``config.json``; swap the
        directory into place. ``model`` (real or a meta skeleton) gives the class, config and the
        module order of ``layers`` (name -> record dict)."""
        try:
            shards, weight_map = self.shards.close()
            order = {n: i for i, (n, _) in enumerate(model.named_modules())}
            auto = auto_class_name(model)
            manifest = {
                "format": "lowbit",
                "format_version": SPARSE_FORMAT_VERSION if any(k in e for e in self.modules.values() for k in ("sparse", "rank", "resized"))
                else FORMAT_VERSION,
                "lowbit_version": __version__,
                "modules": self.modules,
                "layers": dict(sorted(layers.items(), key=lambda kv: order.get(kv[0], len(order)))),
                "aliases": self.aliases,
                "model": {
                    "class": type(model).__name__,
                    "hf_auto_class": auto,
                    "source": source or getattr(model, "lowbit_source", None),
                },
                "shards": shards,
                "weight_map": weight_map,
            }
            calibration = getattr(model, "lowbit_calibration", None)
            if calibration is not None:  # what the calibrated methods saw (calibration_batches' provenance)
                manifest["calibration"] = calibration
            if auto is not None:
                cfg = model.config
                if getattr(cfg, "quantization_config", None) is not None:
                    del cfg.quantization_config  # transformers' own quantizer marks do not apply here
                cfg.save_pretrained(self.tmp)
                gen = getattr(model, "generation_config", None)
                if gen is not None:
                    gen.save_pretrained(self.tmp)
            if tokenizer is not None:
                try:
                    tokenizer.save_pretrained(self.tmp)
                except OSError:
                    raise
                except Exception as e:  # the tokenizers library raises plain Exceptions for I/O errors
                    raise OSError(f"writing the tokenizer into {self.tmp} failed: {e}") from None
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            _permissions(self.tmp)
            _exchange(self.tmp, self.dst)
        except BaseException:
            self.abort()
            raise
        return self.dst


def save(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, source: str | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:  # fmt: skip
    """Write ``model`` to directory ``path`` atomically (:mod:`lowbit.io.safetensors_io` gives
    the layout); returns the path. ``max_shard_bytes``: the largest tensor file (bytes; a tensor
    larger than that gets a file of its own). Raises :class:`LowbitFormatError` as
    :class:`ModelWriter` does; on any error the previous output at ``path`` is kept."""
    with ModelWriter(path, max_shard_bytes=max_shard_bytes) as w:
        with shared_row_conversion():  # row layout, a shared weight converted (and stored) once
            state = model.state_dict()
        by_ptr: dict[tuple, str] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if t.numel() and key in by_ptr:
                w.aliases[name] = by_ptr[key]
                continue
            by_ptr[key] = name
            tensors[name] = t
        resized = getattr(model, "lowbit_resized", {}) or {}
        for n, m in model.named_modules():
            if isinstance(m, QuantModule):
                w.add_module(n, m)
                if n in resized and tuple(resized[n]) != tuple(m.weight_shape):
                    w.modules[n]["resized"] = list(resized[n])  # its skeleton's shape (structured pruning)
        for name, t in tensors.items():
            w.add_tensor(name, t)
        records = {n: r.to_dict() for n, r in (getattr(model, "lowbit_layers", {}) or {}).items()}
        return w.finish(model, layers=records, source=source, tokenizer=tokenizer)
