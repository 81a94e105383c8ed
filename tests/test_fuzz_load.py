"""Fuzzing lowbit.load: truncated files, flipped bytes, manifest fields of the wrong type or shape,
forged safetensors headers (huge declared sizes, wrong dtypes), tensors of the wrong dtype or
shape, NaN scales. Every outcome must be either a model identical to the saved one or one
LowbitFormatError: never another exception, a hang, or a memory blow-up.

Mutations "re-signed" also rewrite the checksums (the manifest's digest in the tensor file's
metadata, the tensor file's size and SHA-256 in the manifest), as a forger would: they test the
field-by-field validation behind the checksums. A re-signed file may still be a valid different
model (a method name changed); then it must load into a model that runs.

CI runs a fixed seed (derandomized); LOWBIT_FUZZ_EXAMPLES=20000 runs a longer pass.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.io import LowbitFormatError

from .conftest import Toy
from .forge import resign as _resign

EXAMPLES = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "400"))
OUTCOMES: collections.Counter = collections.Counter()  # (kind, outcome): LOWBIT_FUZZ_REPORT=1 prints it


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if os.environ.get("LOWBIT_FUZZ_REPORT"):
        print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())), "total", sum(OUTCOMES.values()))


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (2, 5), generator=g), torch.randn(2, 3, 6, 6, generator=g)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Toy().eval()
    recipe = (lowbit.Recipe(default=None).add("emb", "w4g8-asym").add("conv", "w8a8-static")
              .add("fc1", "int8").add("fc2", "nf4g8"))  # fmt: skip
    cal = [_inputs(), _inputs()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(model, recipe, calibration=cal)
    d = tmp_path_factory.mktemp("fuzz") / "orig"
    lowbit.save(model, d)
    ref = lowbit.load(d, model=Toy())
    with torch.no_grad():
        out = ref(*_inputs())
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    return d, out, state


def _identical(model, out, state) -> bool:
    sd = model.state_dict()
    if sd.keys() != state.keys() or not all(sd[k].dtype == state[k].dtype and torch.equal(sd[k], state[k]) for k in sd):
        return False
    with torch.no_grad():
        return torch.equal(model(*_inputs()), out)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["w4g8", "int8", "QuantLinear", "QuantConv2d", "folded", "fc1.qweight"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value, delete=False):
    for p in path[:-1]:
        obj = obj[p]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _mutate_json(data, d: Path) -> dict:
    manifest = json.loads((d / "lowbit.json").read_text())
    paths = [p for p, _ in _paths(manifest) if p]
    path = data.draw(st.sampled_from(paths), label="json path")
    if data.draw(st.booleans(), label="delete"):
        _set(manifest, path, None, delete=True)
    else:
        _set(manifest, path, data.draw(json_values, label="json value"))
    return manifest


def _mutate_header(data, raw: bytes) -> bytes:
    """Forge one field of the safetensors header: a shape, a dtype, an offset."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor")
    field = data.draw(st.sampled_from(["shape", "dtype", "data_offsets"]), label="field")
    if field == "shape":
        header[name]["shape"] = data.draw(st.lists(st.integers(-3, 2**62), max_size=4), label="shape")
    elif field == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F16", "F32", "BF16", "U8", "I8", "I64", "BOOL", "F8_E4M3", "X"]))
    else:
        header[name]["data_offsets"] = data.draw(st.lists(st.integers(-1, 2**62), min_size=2, max_size=2), label="offsets")
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + raw[8 + n :]


def _mutate_tensor(data, d: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    how = data.draw(st.sampled_from(["dtype", "shape", "drop", "extra", "nan", "scalar"]), label="how")
    t = tensors[name]
    if how == "dtype":
        tensors[name] = t.to(data.draw(st.sampled_from([torch.float16, torch.float32, torch.bfloat16, torch.uint8,
                                                        torch.int8, torch.int64, torch.bool])))  # fmt: skip
    elif how == "shape":
        flat = t.reshape(-1)
        tensors[name] = flat[: max(0, flat.numel() - data.draw(st.integers(0, 3)))].clone() if flat.numel() else flat.reshape(1, 0)
    elif how == "drop":
        del tensors[name]
    elif how == "extra":
        tensors[name + ".extra"] = torch.zeros(3)
    elif how == "nan" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.reshape(-1)[0] = float("nan")
        tensors[name] = t
    else:
        tensors[name] = torch.zeros(())
    save_file(tensors, str(d / "model.safetensors"), metadata=meta)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_load_survives_corrupt_files(saved, tmp_path_factory, data):
    src, out, state = saved
    d = tmp_path_factory.mktemp("case") / "m"
    shutil.copytree(src, d)
    kind = data.draw(st.sampled_from(["truncate", "flip", "json", "json-resigned", "header-resigned", "tensor-resigned"]))
    verify = data.draw(st.booleans(), label="verify")
    target = d / data.draw(st.sampled_from(["model.safetensors", "lowbit.json"]), label="file")
    raw = target.read_bytes()
    if kind == "truncate":
        target.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")])
    elif kind == "flip":
        if target.name == "model.safetensors" and not verify:  # unverified: only the header is checked
            hi = 8 + struct.unpack("<Q", raw[:8])[0]
        else:
            hi = len(raw)
        b = bytearray(raw)
        for pos in data.draw(st.lists(st.integers(0, hi - 1), min_size=1, max_size=4), label="positions"):
            b[pos] ^= data.draw(st.integers(1, 255), label="mask")
        target.write_bytes(bytes(b))
    elif kind == "json":
        (d / "lowbit.json").write_text(json.dumps(_mutate_json(data, d)))
    elif kind == "json-resigned":
        _resign(d, _mutate_json(data, d))
    elif kind == "header-resigned":
        _resign(d, tensor_bytes=_mutate_header(data, (d / "model.safetensors").read_bytes()))
    else:
        _mutate_tensor(data, d)
        _resign(d)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lowbit.load(d, model=Toy(), verify=verify)
    except LowbitFormatError:
        OUTCOMES[kind, "LowbitFormatError"] += 1
        return
    finally:
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 512 * 1024  # KiB: no blow-up
    OUTCOMES[kind, "loaded"] += 1
    if kind in ("truncate", "flip", "json"):
        assert _identical(model, out, state), f"{kind} loaded a different model"
    else:  # a forged but well-formed file: a valid model that runs
        with torch.no_grad():
            model(*_inputs())
