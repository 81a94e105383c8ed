"""Test helper: forge a saved lowbit model's checksums, as someone editing its files would."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from lowbit.io.safetensors_io import _manifest_digest

__all__ = ["resign"]


def resign(d: Path, manifest: dict | None = None, tensor_bytes: bytes | None = None) -> None:
    """Rewrite the checksums as a forger would: digest of the manifest into the tensor file's
    header metadata, the tensor file's size and SHA-256 into the manifest."""
    mf = d / "lowbit.json"
    if manifest is None:
        manifest = json.loads(mf.read_text())
    raw = tensor_bytes if tensor_bytes is not None else (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        header = json.loads(raw[8 : 8 + n])
        if isinstance(manifest, dict):
            header.setdefault("__metadata__", {})["manifest_sha256"] = _manifest_digest(manifest)
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        raw = struct.pack("<Q", len(hb)) + hb + raw[8 + n :]
    except (ValueError, TypeError, AttributeError):
        pass  # a header that is no longer JSON stays as it is
    (d / "model.safetensors").write_bytes(raw)
    if isinstance(manifest, dict) and isinstance(manifest.get("tensors"), dict):
        manifest["tensors"]["bytes"] = len(raw)
        manifest["tensors"]["sha256"] = hashlib.sha256(raw).hexdigest()
    mf.write_text(json.dumps(manifest))
