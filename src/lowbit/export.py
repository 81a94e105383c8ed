"""``lowbit.export``: a lowbit model written in a runtime's own format (the writers live in
:mod:`lowbit.io`, one module per format; this is the table and the dispatch).

    report = lowbit.export(model, "gguf", "smollm2-q4_0.gguf")   # llama.cpp

Each writer maps lowbit's codes and scales onto the target's layout bit-exactly where the target
can hold them, requantizes the rest to a named type with the added error reported per layer (or
refuses them with ``exact=True``), writes atomically, and returns a report.
"""

from __future__ import annotations

import os

from torch import nn

__all__ = ["EXPORT_FORMATS", "export"]


def _gguf(model, path, **options):
    from .io.gguf import export_gguf

    return export_gguf(model, path, **options)


def _compressed_tensors(model, path, **options):
    from .io.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(model, path, **options)


def _onnx(model, path, **options):
    from .io.onnx import export_onnx

    return export_onnx(model, path, **options)


# format name -> (writer, what it targets)
EXPORT_FORMATS = {
    "gguf": (_gguf, "llama.cpp: Llama-family decoders; Q4_0 / Q8_0 exact, Q4_1 with its zero point rounded"),
    "compressed-tensors": (_compressed_tensors, "transformers / vLLM: pack-quantized int2/4/8, W8A8 int, FP8 (a directory)"),
    "onnx": (_onnx, "ONNX Runtime: MatMulNBits int2/3/4/8, QDQ static W8A8, GatherBlockQuantized embeddings"),
}


def export(model: nn.Module, fmt: str, path: str | os.PathLike, **options):
    """Write ``model`` (quantized by lowbit, or loaded with :func:`lowbit.load`) to ``path`` in
    format ``fmt`` (a key of :data:`EXPORT_FORMATS`); ``options`` go to that format's writer
    (:func:`lowbit.io.gguf.export_gguf` for ``"gguf"``,
    :func:`lowbit.io.compressed_tensors.export_compressed_tensors` for ``"compressed-tensors"``,
    :func:`lowbit.io.onnx.export_onnx` for ``"onnx"``). Returns the writer's report. Raises
    ``ValueError`` for an unknown format or a model with low-rank corrections (pruned weights
    export as their dense codes: exact, without the size saving), and whatever the writer raises
    for models or options it cannot serve."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
    from .nn import QuantModule

    corrected = [n for n, m in model.named_modules() if isinstance(m, QuantModule) and m.lowrank_a is not None]
    if corrected:  # no target runtime has a place for A @ B beside the codes: refuse, never drop it
        raise ValueError(f"{fmt} cannot hold low-rank corrections ({', '.join(corrected[:3])}"
                         f"{', ...' if len(corrected) > 3 else ''}): quantize without correction_rank to export")  # fmt: skip
    return EXPORT_FORMATS[fmt][0](model, path, **options)
