"""What an export wrote, layer by layer (shared by the writers in :mod:`lowbit.io`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ExportEntry", "ExportReport", "check_finite", "check_output_file", "is_tied", "refusals",
           "rel_rms_error", "requantize_weight"]  # fmt: skip


def check_output_file(path: Path, overwrite: bool, example: str, *also: Path) -> None:
    """Refuse, before anything is written, an output file ``path`` that is a directory (the
    message suggests ``path / example``), one whose parent is a file, or an existing ``path`` (or
    companion file in ``also``) without ``overwrite``: ``FileExistsError``. Temporary files a
    killed earlier export left beside ``path`` are removed."""
    from .writer import _remove_stale

    if not path.name:
        raise FileExistsError("the output path is empty; give a file name")
    if path.is_dir():
        raise FileExistsError(f"{path} is a directory; give a file name (e.g. {path / example})")
    if path.parent.exists() and not path.parent.is_dir():
        raise FileExistsError(f"{path.parent} is a file, not a directory to write {path.name} in")
    for p in (path, *also):
        if p.exists() and not p.is_file():  # a FIFO, a device (/dev/null), a socket: never replaced
            raise FileExistsError(f"{p} exists and is not a regular file; not replacing it")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass overwrite=True (CLI --force) to replace it")
    _remove_stale(path)


def check_finite(name: str, t) -> None:
    """Raise :class:`lowbit.primitives.NonFiniteError` naming ``name`` when the float tensor ``t``
    holds NaN or Inf: an export writes no tensor a runtime would turn into garbage silently (the
    quantized layers were checked when they were quantized)."""
    import torch

    from ..primitives import NonFiniteError

    if t is None or not t.is_floating_point():
        return
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()  # fp8: torch has no isfinite for it
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{name} holds {bad} NaN or Inf values; fix the model before exporting it")


def rel_rms_error(ref, approx) -> float:
    """RMS(approx - ref) / RMS(ref) in float64 (torch tensors or numpy arrays of one shape; 0 for
    an all-zero ``ref`` is measured against 1): what :attr:`ExportEntry.rel_rms_error` holds."""
    import numpy as np

    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(approx, dtype=np.float64).reshape(a.shape)
    return float(np.sqrt(np.mean((b - a) ** 2))) / (float(np.sqrt(np.mean(a**2))) or 1.0)


def requantize_weight(qw, scheme):
    """lowbit's weight ``qw`` (a :class:`~lowbit.qweight.QWeight`) dequantized and quantized again
    with ``scheme`` (a scheme string or :class:`~lowbit.scheme.Scheme`), for a target that cannot
    hold ``qw`` as it is; returns the new QWeight and its :func:`rel_rms_error` against ``qw``."""
    import torch

    from ..qweight import QWeight
    from ..scheme import parse_scheme

    w = qw.dequantize(torch.float32).reshape(qw.rows, qw.cols)
    new = QWeight.from_float(w, parse_scheme(scheme) if isinstance(scheme, str) else scheme)
    return new, rel_rms_error(w, new.dequantize(torch.float32))


def refusals(items: list[tuple[str, str, str]], shown: int = 3) -> str:
    """``(layer, scheme, reason)`` refusals as one message, grouped by scheme and reason:
    ``"a, b, c and 207 more (w3g64: 3-bit ...)"``; a group of one reads ``"a (w3g64: ...)"``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, scheme, why in items:
        groups.setdefault((scheme, why), []).append(name)
    parts = []
    for (scheme, why), names in groups.items():
        listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        parts.append(f"{listed} ({scheme}: {why})")
    return "; ".join(parts)


def is_tied(model) -> bool:
    """Whether ``model``'s output head holds the very weights of its input embedding (the same
    float storage, or one shared packed tensor), decided from the data rather than the config's
    ``tie_word_embeddings``, which a model edited after loading need not keep true. A model
    without an output head counts as tied (there is nothing else to write)."""
    from ..nn import QuantModule

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return True
    if isinstance(emb, QuantModule) and isinstance(head, QuantModule):
        return emb.qweight.data_ptr() == head.qweight.data_ptr()
    if isinstance(emb, QuantModule) or isinstance(head, QuantModule):
        return False
    return emb.weight.data_ptr() == head.weight.data_ptr()


@dataclass
class ExportEntry:
    """One tensor or layer as written.

    ``mapping``: ``"exact"`` (the runtime reads lowbit's values bit for bit), ``"weights exact"``
    (so are the weights of a layer with dynamic int8 activations, but the runtime rounds the
    activations its own way), ``"zero point
    rounded"`` (GGUF Q4_1: ``max_abs_error`` is the largest change of a weight, ``exact_fraction``
    the share of blocks untouched), ``"requantized"`` (``rel_rms_error`` = RMS(written - lowbit)
    / RMS(lowbit)), ``"rounded"`` (a float weight stored narrower) or ``"float"``."""

    name: str  # the name in the target (blk.0.attn_q.weight, or the module path)
    source: str  # the module's name in the model
    target: str  # the target's type or format (Q4_0, pack-quantized, F32, dense ...)
    mapping: str
    scheme: str = "-"  # lowbit's scheme of the layer ("-": a float tensor)
    nbytes: int = 0
    rel_rms_error: float = 0.0
    max_abs_error: float = 0.0
    exact_fraction: float = 1.0
    why: str = ""  # why a layer is not "exact" (no exact form, what a fallback avoided)


@dataclass(repr=False)
class ExportReport:
    path: Path
    nbytes: int
    entries: list[ExportEntry] = field(default_factory=list)
    tokenizer_from: str = ""
    notes: list[str] = field(default_factory=list)  # what the target's own tools said (GGUF: llama.cpp's fallbacks)

    def __repr__(self) -> str:
        return f"ExportReport({str(self.path)!r}, {self.nbytes} bytes: {self.summary()}; {len(self.notes)} notes)"

    def summary(self) -> str:
        """The counts as one phrase: ``"62 F32 float, 210 Q4_0 exact"``."""
        return ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items())) or "no quantized layers"

    def counts(self) -> dict[str, int]:
        """``{"<target> <mapping>": count}``."""
        out: dict[str, int] = {}
        for e in self.entries:
            key = f"{e.target} {e.mapping}"
            out[key] = out.get(key, 0) + 1
        return out
