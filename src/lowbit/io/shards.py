"""Tensors in safetensors shards of bounded size: written in the order given, read back lazily.

A model of any size is written without ever holding more than two shards' tensors: each tensor
is added as it is produced, and a shard is handed to a writer thread (which writes it and takes its
SHA-256 while the next one fills) when the next tensor would take it past ``max_bytes`` (a tensor
larger than that gets a shard of its own).
Shards are named as transformers names them: ``model.safetensors`` when there is one, else
``model-00001-of-00003.safetensors`` and so on (the count is known only at the end, so shards
are written under temporary names and renamed by :meth:`ShardWriter.close`).

Each shard's safetensors metadata holds one key, ``lowbit_modules_sha256``: the SHA-256 of the
manifest entries of the quantized modules whose tensors it holds, so a manifest edited after
saving is found (:func:`modules_digest`). One key, because safetensors writes its metadata map in
no fixed order, and equal models must give equal bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import torch

__all__ = ["ShardWriter", "shard_name", "is_shard_name", "sha256", "modules_digest", "module_of", "read_tensors",
           "read_header", "read_rows", "map_tensors", "DTYPES", "DEFAULT_SHARD_BYTES"]

_FIXED = 8 + 256  # header length field, the metadata entry, padding
DEFAULT_SHARD_BYTES = 1 << 29  # 512 MiB: a shard is buffered whole while the one before it is written, and the
# streaming peak includes both
_SHARD_RE = re.compile(r"model(-(\d{5})-of-(\d{5}))?\.safetensors")


def shard_name(i: int, n: int) -> str:
    """File name of shard ``i`` (1-based) of ``n``."""
    return "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def is_shard_name(name: object) -> bool:
    """Whether ``name`` is a plain shard file name (never a path: manifests cannot point outside)."""
    return isinstance(name, str) and _SHARD_RE.fullmatch(name) is not None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def module_of(tensor: str, modules: dict) -> str | None:
    """The quantized module a tensor name belongs to (``<module>.<leaf>``), or None."""
    mod = tensor.rpartition(".")[0]
    return mod if mod in modules else None


def modules_digest(entries: dict) -> str:
    """SHA-256 of manifest module entries ``{name: entry}`` (canonical JSON)."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# safetensors dtype names (https://github.com/huggingface/safetensors, format description)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip


def read_header(path: str | os.PathLike) -> tuple[int, dict]:
    """``(offset of the data, header dict)`` of a safetensors file (see :func:`read_tensors`)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def map_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of a private (copy-on-write) memory map of it:
    nothing is read until used, pages stay file-backed (the OS can drop and re-read them) until
    written, and writes never reach the file. The file must not be truncated or rewritten while
    the tensors live (the process would get SIGBUS, as with any memory map). Validated as
    :func:`read_tensors` requires."""
    import mmap

    base, header = read_header(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which lowbit does not read")
        lo, hi = e["data_offsets"]
        buf = torch.frombuffer(mm, dtype=torch.uint8, count=hi - lo, offset=base + lo) if hi > lo else \
            torch.empty(0, dtype=torch.uint8)  # fmt: skip
        out[name] = buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


def read_tensors(path: str | os.PathLike, names=None, header: tuple[int, dict] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (all, or those in ``names``) read with plain file reads into
    memory of their own: no memory map, so nothing stays resident but the tensors themselves
    (a mapping keeps every page read resident while any tensor of the file lives).
    ``header``: the file's :func:`read_header`, when the caller keeps it (reading one tensor at a
    time, a large file's header is not parsed again for each).

    The file must already have been opened once with ``safetensors.safe_open``, which validates
    the header (offsets inside the file, no overlaps); raises ``ValueError`` for a dtype this
    reader does not know and ``OSError`` for a short read."""
    out: dict[str, torch.Tensor] = {}
    base, header = header if header is not None else read_header(path)
    with open(path, "rb") as f:
        for name, e in header.items():
            if name == "__metadata__" or (names is not None and name not in names):
                continue
            if e["dtype"] not in DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which lowbit does not read")
            lo, hi = e["data_offsets"]
            buf = torch.empty(hi - lo, dtype=torch.uint8)
            f.seek(base + lo)
            if hi > lo and f.readinto(memoryview(buf.numpy())) != hi - lo:
                raise OSError(f"{path}: short read of tensor {name!r}")
            out[name] = buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


class ShardWriter:
    """Write tensors into shard files of at most ``max_bytes`` each (header included; a tensor
    too large for that gets a file of its own) in ``directory``.

    ``modules``: the manifest's module entries, filled in by the caller before it adds a
    module's tensors (each shard records the digest of the entries of its modules).
    Raises ``ValueError`` for a tensor name added twice or a non-positive ``max_bytes``.
    """

    def __init__(self, directory: str | os.PathLike, max_bytes: int = DEFAULT_SHARD_BYTES, modules: dict | None = None):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.dir = Path(directory)
        self.max_bytes = int(max_bytes)
        self.modules = modules if modules is not None else {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = _FIXED
        self._done: list[tuple] = []  # (temporary path, tensor names, future of its write: its SHA-256)
        self._writer = None
        self._flight_bytes = 0  # bytes of the shard being written (0 once it is known to be done)
        self._names: set[str] = set()

    @staticmethod
    def _cost(name: str, nbytes: int, dim: int) -> int:
        """A tensor's data plus a generous bound on its header entry: the file stays within max_bytes."""
        return nbytes + len(name.encode()) + 128 + 21 * dim

    def make_room(self, name: str, nbytes: int, dim: int) -> None:
        """Write the current shard now if a tensor of ``nbytes`` would not fit in it, and wait for
        the shard in flight if the tensor would take what is held past two shards: called before
        reading a large tensor, so the buffers and the tensor never hold more than
        ``max(2 * max_bytes, the tensor)`` together."""
        cost = self._cost(name, nbytes, dim)
        if self._pending and self._pending_bytes + cost > self.max_bytes:
            self._flush()
        self._hold(self._pending_bytes + cost)

    def _hold(self, nbytes: int) -> None:
        """Wait for the shard in flight if it and ``nbytes`` more would exceed two shards."""
        if self._flight_bytes and self._flight_bytes + nbytes > 2 * self.max_bytes:
            self._settle()

    def _settle(self) -> None:
        """Wait until the shard in flight is written (its error, if any, is raised here)."""
        if self._done:
            self._done[-1][2].result()
        self._flight_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; writes the current shard first if it would overflow."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        nbytes = self._cost(name, tensor.numel() * tensor.element_size(), tensor.dim())
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._hold(self._pending_bytes + nbytes)
        self._names.add(name)
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        """Hand the current shard to the writer thread: it writes the file, then takes its SHA-256
        while the file is still in the page cache (safetensors and hashlib release the GIL), and
        the caller goes on quantizing the next block meanwhile. One shard is in flight at a time:
        the previous one is waited for first, so at most two shards' tensors are ever held
        (``2 * max_bytes``, which the streaming peak counts) and a failed write is raised here or
        by :meth:`close`, naming its shard."""
        self._settle()  # one shard in flight at a time
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(1, thread_name_prefix="lowbit-shard")
        index = len(self._done) + 1
        path = self.dir / f".shard-{index:05d}.tmp"
        mods = {m: self.modules[m] for m in (module_of(n, self.modules) for n in self._pending) if m is not None}
        meta = {"lowbit_modules_sha256": modules_digest(mods)}
        names = list(self._pending)  # (before the writer thread owns, and finally clears, the dict)
        earlier = [p for p, *_ in self._done]  # (all written: their sizes, should this one fail)
        job = self._writer.submit(self._write, self._pending, path, meta, index, self._pending_bytes, earlier)
        self._done.append((path, names, job))
        self._flight_bytes = self._pending_bytes
        self._pending, self._pending_bytes = {}, _FIXED

    def _write(self, tensors: dict, path: Path, meta: dict, index: int, nbytes: int, earlier: list) -> str:
        """Write one shard (in the writer thread); returns its SHA-256."""
        from safetensors.torch import save_file

        try:
            save_file(tensors, str(path), metadata=meta)
        except Exception as e:  # a full disk, a quota, an I/O error: say which file and how far it got
            tensors.clear()  # (a kept exception must not keep the shard's tensors)
            if isinstance(e, MemoryError):
                raise
            written = sum(p.stat().st_size for p in earlier)
            code = getattr(e, "errno", None)  # safetensors' own error names it only in its text
            if code is None and (m := re.search(r"os error (\d+)", str(e))):
                code = int(m.group(1))
            raise OSError(code or errno.EIO,
                          f"writing shard {index} ({nbytes / 1e6:.1f} MB) in {self.dir} failed "
                          f"after {written / 1e6:.1f} MB of shards: {e}") from e  # fmt: skip
        tensors.clear()
        return sha256(path)

    def discard(self):
        """Stop writing without waiting (an interrupt during an abort must not strand the files):
        queued work is cancelled and the tensors are dropped; returns the future of a shard still
        being written in its thread (``None`` if none), so the caller can remove the files again
        once that write ends."""
        running = None
        if self._writer is not None:
            self._writer.shutdown(wait=False, cancel_futures=True)
            running = next((job for *_, job in self._done if not job.done()), None)
        # a failed write's exception holds the caller's frames (and through them this writer):
        # drop the tensors now rather than when the garbage collector finds that cycle
        self._done.clear()
        self._pending, self._flight_bytes = {}, 0
        return running

    def close(self) -> tuple[list[dict], dict[str, str]]:
        """Write the last shard, give every shard its final name; returns the shard records
        ``[{"file", "bytes", "sha256", "tensors"}]`` and the weight map ``{tensor: file}``."""
        if self._pending or not self._done:
            self._flush()  # (a model without tensors still gets its one, empty, shard)
        n = len(self._done)
        shards, weight_map = [], {}
        digests = [d.result() for _, _, d in self._done]  # (before any file is renamed under its writer)
        for i, ((tmp, names, _), digest) in enumerate(zip(self._done, digests), 1):
            final = self.dir / shard_name(i, n)
            os.rename(tmp, final)
            shards.append({"file": final.name, "bytes": final.stat().st_size, "sha256": digest, "tensors": len(names)})
            weight_map.update(dict.fromkeys(names, final.name))
        self._writer.shutdown()
        return shards, weight_map


def read_rows(path: str | os.PathLike, name: str, start: int, stop: int, header: tuple[int, dict]) -> torch.Tensor:
    """Rows ``start:stop`` (along dim 0) of tensor ``name`` of a safetensors file, read alone
    (a row block of a C-contiguous tensor is one byte range): a weight larger than memory allows
    is read a block of rows at a time. ``header``: the file's :func:`read_header`; the file must
    have been validated as :func:`read_tensors` requires. Raises ``OSError`` for a short read."""
    base, h = header
    e = h[name]
    if e["dtype"] not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which lowbit does not read")
    shape = e["shape"]
    row = (e["data_offsets"][1] - e["data_offsets"][0]) // max(1, shape[0])
    start, stop = max(0, start), min(shape[0], stop)
    buf = torch.empty(max(0, stop - start) * row, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(base + e["data_offsets"][0] + start * row)
        if buf.numel() and f.readinto(memoryview(buf.numpy())) != buf.numel():
            raise OSError(f"{path}: short read of rows {start}:{stop} of tensor {name!r}")
    return buf.view(DTYPES[e["dtype"]]).reshape(max(0, stop - start), *shape[1:])
