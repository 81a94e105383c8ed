"""Test helper: forge a saved lowbit model's checksums, as someone editing its files would."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from lowbit.io.safetensors_io import _manifest_digest
from lowbit.io.shards import module_of, modules_digest

__all__ = ["resign"]


def resign(d: Path, manifest: dict | None = None, tensor_bytes: bytes | None = None) -> None:
    """Rewrite the checksums as a forger would: digest of the manifest (version 1) or of its module
    entries (version 2) into the tensor file's header metadata, the tensor file's size and SHA-256
    into the manifest (one-shard models: ``model.safetensors``)."""
    mf = d / "lowbit.json"
    if manifest is None:
        manifest = json.loads(mf.read_text())
    raw = tensor_bytes if tensor_bytes is not None else (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        header = json.loads(raw[8 : 8 + n])
        if isinstance(manifest, dict) and manifest.get("format_version") == 1:
            header.setdefault("__metadata__", {})["manifest_sha256"] = _manifest_digest(manifest)
        elif isinstance(manifest, dict) and isinstance(manifest.get("modules"), dict):
            mods = manifest["modules"]
            held = {m: mods[m] for m in (module_of(n, mods) for n in header if n != "__metadata__") if m is not None}
            header.setdefault("__metadata__", {})["lowbit_modules_sha256"] = modules_digest(held)
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        raw = struct.pack("<Q", len(hb)) + hb + raw[8 + n :]
    except (ValueError, TypeError, AttributeError):
        pass  # a header that is no longer JSON stays as it is
    (d / "model.safetensors").write_bytes(raw)
    if isinstance(manifest, dict) and isinstance(manifest.get("tensors"), dict):
        manifest["tensors"]["bytes"] = len(raw)
        manifest["tensors"]["sha256"] = hashlib.sha256(raw).hexdigest()
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    for sh in shards if isinstance(shards, list) else []:
        if isinstance(sh, dict) and sh.get("file") == "model.safetensors":
            sh["bytes"] = len(raw)
            sh["sha256"] = hashlib.sha256(raw).hexdigest()
            names = _names(raw)
            if names is not None and isinstance(manifest.get("weight_map"), dict):  # the index follows the file
                manifest["weight_map"] = dict.fromkeys(names, "model.safetensors")
                sh["tensors"] = len(names)
    mf.write_text(json.dumps(manifest))


def _names(raw: bytes) -> list[str] | None:
    """Tensor names in a safetensors header, or None when it is not readable JSON."""
    try:
        n = struct.unpack("<Q", raw[:8])[0]
        return [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]
    except (ValueError, TypeError, AttributeError, struct.error):
        return None
