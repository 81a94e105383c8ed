"""lowbit: make trained PyTorch networks smaller and faster by quantization, and measure the cost.

The public face::

    import lowbit
    model = lowbit.quantize(model, "w4g64")            # RTN, weight-only, in place; returns model
    lowbit.save(model, "out/")                         # safetensors + lowbit.json, atomic
    lowbit.quantize_checkpoint("hf_dir/", "w4g128", "out/")   # larger than memory: layer by layer
    model = lowbit.load("out/")                        # HF models rebuilt from config.json
    model = lowbit.load("out/", model=skeleton)        # any other nn.Module
    lowbit.size_of(model)                              # bytes, bits/weight, per layer
    lowbit.estimate(params=70e9, scheme="w4g128")      # memory calculator
    model = lowbit.prepare_qat(model, "w4g64")         # QAT: fake quantization, learned steps
    model = lowbit.convert(model)                      # ... then the same packed modules as PTQ
    ids = lowbit.generate(model, input_ids, 64)        # lean batch-1 decode (Llama family)
    lowbit.export(model, "gguf", "m.gguf")             # llama.cpp's format, exact where it can be
"""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import CheckpointError, quantize_checkpoint  # noqa: E402
from .driver import QuantizeError, UnsupportedModuleError, quantize  # noqa: E402
from .estimate import estimate  # noqa: E402
from .evaluate.domains import calibration_batches  # noqa: E402
from .evaluate.size import size_of  # noqa: E402
from .export import export  # noqa: E402
from .generate import GenerateError, generate  # noqa: E402
from .io import LowbitFormatError, load, save  # noqa: E402
from .qat import QATError, convert, prepare_qat  # noqa: E402
from .recipe import Recipe, RecipeError  # noqa: E402
from .scheme import Scheme, SchemeError, parse_scheme  # noqa: E402

__all__ = [
    "__version__",
    "quantize",
    "quantize_checkpoint",
    "CheckpointError",
    "prepare_qat",
    "convert",
    "save",
    "load",
    "size_of",
    "estimate",
    "generate",
    "GenerateError",
    "export",
    "Recipe",
    "Scheme",
    "parse_scheme",
    "SchemeError",
    "RecipeError",
    "QuantizeError",
    "UnsupportedModuleError",
    "LowbitFormatError",
    "QATError",
    "calibration_batches",
]
