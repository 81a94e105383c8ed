"""Resolve what the CLI is pointed at: a zoo name, a lowbit directory, or a local HF directory."""

from __future__ import annotations

from pathlib import Path

from .zoo import ZOO, ZooError, ZooModel, load_model

__all__ = ["load_source", "SourceError"]


class SourceError(ValueError):
    """Neither a zoo model nor a readable model directory."""


def _hf_dir(path: Path) -> ZooModel:
    from .zoo import _offline

    _offline()
    import torch

    from ..checkpoint import Checkpoint, skeleton, tokenizer_of

    # the class whose tensor names the checkpoint holds; safetensors only (never a pickle .bin)
    cls = type(skeleton(Checkpoint(path)))
    model = cls.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True).eval()
    tok = tokenizer_of(path)  # (a warning when its files cannot be read)
    task = "causal-lm" if model.can_generate() else "encoder"
    model.lowbit_source = str(path.resolve())  # absolute: found again from any directory
    return ZooModel(path.name, model, tok, task, str(path))


def load_source(spec: str) -> ZooModel:
    """A zoo model by name, a lowbit model directory, or a local transformers model directory."""
    if spec in ZOO:
        return load_model(spec)
    path = Path(spec)
    if (path / "lowbit.json").is_file():
        from .. import io
        from .zoo import SKELETONS

        manifest = io.read_manifest(path)
        src = manifest["model"].get("source")
        skeleton = SKELETONS[src]() if manifest["model"].get("hf_auto_class") is None and src in SKELETONS else None
        model = io.load(path, model=skeleton)
        tok = None
        task = "classifier" if src == "digits-cnn" else ""
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
        if hasattr(model, "generation_config") or (path / "generation_config.json").is_file():
            task = "causal-lm" if type(model).__name__.endswith("ForCausalLM") else "encoder"
        return ZooModel(path.name, model, tok, task, src or str(path))
    if (path / "config.json").is_file():
        return _hf_dir(path)
    if not path.exists():
        raise SourceError(f"{spec!r}: no such file or directory, and not a zoo model ({', '.join(ZOO)})")
    raise SourceError(
        f"{spec!r} is not a zoo model ({', '.join(ZOO)}), a lowbit model directory, "
        "or a transformers model directory"
    )


__all__ += ["ZooError"]
