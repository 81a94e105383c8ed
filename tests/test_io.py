"""Native save/load: identical outputs, atomic saves, and one clear error per kind of bad file."""

import json
import warnings
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.io import LowbitFormatError, read_manifest
from lowbit.recipe import Recipe

from .conftest import Toy, tied_quantized_pair

GOLDEN = Path(__file__).parent / "golden" / "toy-v1"


def _quantized_toy() -> Toy:
    torch.manual_seed(0)
    m = Toy().eval()
    r = Recipe.from_scheme("w4g8-asym").add("emb", "w8g8").add("conv", "int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(m, r)


def test_round_trip_gives_identical_outputs(tmp_path, toy_inputs):
    m = _quantized_toy()
    with torch.no_grad():
        ref = m(*toy_inputs)
    lowbit.save(m, tmp_path / "out")
    back = lowbit.load(tmp_path / "out", model=Toy())
    with torch.no_grad():
        assert torch.equal(back(*toy_inputs), ref)
    assert back.lowbit_layers["fc1"].scheme == "w4g8-asym"
    assert back.lowbit_layers["conv1d"].status == "unsupported"
    assert back.fc1.kernel == m.fc1.kernel
    manifest = read_manifest(tmp_path / "out")
    assert manifest["format_version"] == 2
    assert manifest["modules"]["fc1"] == {"type": "QuantLinear", "scheme": "w4g8-asym", "method": "rtn",
                                          "shape": [72, 40], "orig_dtype": "float32"}  # fmt: skip


def test_tensor_file_holds_packed_codes_scales_zeros(tmp_path):
    from safetensors.torch import load_file

    m = _quantized_toy()
    lowbit.save(m, tmp_path / "out")
    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert t["fc1.qweight"].dtype == torch.uint8 and t["fc1.qweight"].shape == (72, 20)
    assert t["fc1.scales"].dtype == torch.float16 and t["fc1.scales"].shape == (72, 5)
    assert t["fc1.zeros"].shape == (72, 3)  # 5 packed 4-bit zero points per row
    assert "fc1.weight" not in t and t["norm.weight"].dtype == torch.float32
    assert (tmp_path / "out" / "model.safetensors").stat().st_size - sum(
        v.numel() * v.element_size() for v in t.values()
    ) < 4096  # only the safetensors header beyond the tensors


def test_hf_model_rebuilds_from_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    lowbit.quantize(m, "w4g32")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        ref = m(ids).logits
    lowbit.save(m, tmp_path / "llama")
    back = lowbit.load(tmp_path / "llama")
    assert type(back).__name__ == "LlamaForCausalLM"
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tie restored, stored once
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)


def test_overwrite_replaces_old_output(tmp_path, toy_inputs):
    m = _quantized_toy()
    lowbit.save(m, tmp_path / "out")
    m2 = _quantized_toy()
    with torch.no_grad():
        m2.fc1.bias.add_(1.0)
    lowbit.save(m2, tmp_path / "out")
    back = lowbit.load(tmp_path / "out", model=Toy())
    assert torch.equal(back.fc1.bias, m2.fc1.bias)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old directories left


def test_interrupted_save_leaves_old_output_intact(tmp_path, monkeypatch, toy_inputs):
    m = _quantized_toy()
    lowbit.save(m, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr("lowbit.io.shards.sha256", boom)
    with pytest.raises(KeyboardInterrupt):
        lowbit.save(_quantized_toy(), tmp_path / "out")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    lowbit.load(tmp_path / "out", model=Toy())


def test_an_unwritable_destination_is_named_not_its_temporary(monkeypatch, tmp_path):
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)  # (root writes anywhere real)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'out'}: Permission denied") as e:
        lowbit.save(_quantized_toy(), tmp_path / "out")
    assert ".tmp-" not in str(e.value)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LowbitFormatError, match="not a lowbit model"):
        lowbit.save(_quantized_toy(), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.fixture
def saved(tmp_path):
    lowbit.save(_quantized_toy(), tmp_path / "out")
    return tmp_path / "out"


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(LowbitFormatError, match="truncated"):
        lowbit.load(saved, model=Toy())


def test_corrupted_bytes_fail_the_checksum(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LowbitFormatError, match="SHA-256"):
        lowbit.load(saved, model=Toy())


def test_garbage_tensor_file(saved):
    f = saved / "model.safetensors"
    size = f.stat().st_size
    f.write_bytes(b"\xff" * size)
    with pytest.raises(LowbitFormatError):
        lowbit.load(saved, model=Toy(), verify=False)


def test_unknown_format_version(saved):
    mf = saved / "lowbit.json"
    d = json.loads(mf.read_text())
    d["format_version"] = 99
    mf.write_text(json.dumps(d))
    with pytest.raises(LowbitFormatError, match="format_version 99"):
        lowbit.load(saved, model=Toy())


def test_not_a_lowbit_directory(tmp_path):
    with pytest.raises(LowbitFormatError, match="no lowbit.json"):
        lowbit.load(tmp_path, model=Toy())
    with pytest.raises(LowbitFormatError, match="not a directory"):
        lowbit.load(tmp_path / "missing", model=Toy())
    (tmp_path / "lowbit.json").write_text("{not json")
    with pytest.raises(LowbitFormatError, match="not valid JSON"):
        lowbit.load(tmp_path, model=Toy())
    (tmp_path / "lowbit.json").write_text('{"format": "something-else"}')
    with pytest.raises(LowbitFormatError, match="not a lowbit manifest"):
        lowbit.load(tmp_path, model=Toy())


def test_generic_model_needs_a_skeleton_and_the_right_one(saved):
    with pytest.raises(LowbitFormatError, match="pass its float skeleton"):
        lowbit.load(saved)

    class Other(Toy):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(40, 16)

    with pytest.raises(LowbitFormatError, match="wrong skeleton"):
        lowbit.load(saved, model=Other())


def test_golden_v1_file_keeps_loading(toy_inputs):
    """A file written by the first format version (tests/golden/make_golden.py) must load forever."""
    from safetensors.torch import load_file

    m = lowbit.load(GOLDEN, model=Toy())
    expected = load_file(str(GOLDEN.parent / "toy-v1-expected.safetensors"))
    with torch.no_grad():
        out = m(expected["idx"], expected["img"])
    assert torch.allclose(out, expected["out"], atol=1e-5)


def test_files_hold_the_row_layout_whatever_the_kernel(tmp_path, toy_inputs):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = lowbit.quantize(Toy().eval(), "w4g32-asym")
    if m.fc1.layout != "tiled":
        pytest.skip("no VNNI kernel here: modules keep the row layout")
    with torch.no_grad():
        ref = m(*toy_inputs)
    lowbit.save(m, tmp_path / "out")
    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert t["fc1.qweight"].shape == (72, 20) and t["fc1.scales"].shape == (72, 2)
    back = lowbit.load(tmp_path / "out", model=Toy())
    with torch.no_grad():
        assert torch.equal(back(*toy_inputs), ref)
    # load_state_dict into a module running the tiled layout goes back to rows first
    m.load_state_dict({k: v for k, v in t.items()}, strict=False)
    with torch.no_grad():
        m(*toy_inputs)
    assert m.fc1.layout == "tiled"


def test_bf16_model_round_trip_records_its_dtype(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    lowbit.quantize(m, "w4g32")
    with torch.no_grad():
        y = m(x)
    assert y.dtype == torch.bfloat16
    lowbit.save(m, tmp_path / "bf")
    assert read_manifest(tmp_path / "bf")["modules"]["0"]["orig_dtype"] == "bfloat16"
    skeleton = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(torch.bfloat16)
    back = lowbit.load(tmp_path / "bf", model=skeleton)
    with torch.no_grad():
        assert torch.equal(back(x), y)


@pytest.fixture
def sharded(tmp_path):
    m = _quantized_toy()
    lowbit.save(m, tmp_path / "out", max_shard_bytes=300)
    return m, tmp_path / "out"


def test_sharded_save_round_trips_and_bounds_each_shard(sharded, toy_inputs):
    m, d = sharded
    manifest = read_manifest(d)
    shards = manifest["shards"]
    assert len(shards) >= 3 and [s["file"] for s in shards] == sorted(p.name for p in d.glob("model-*.safetensors"))
    assert shards[0]["file"] == f"model-00001-of-{len(shards):05d}.safetensors"
    from safetensors import safe_open

    for s in shards:
        with safe_open(str(d / s["file"]), framework="pt") as f:
            sizes = [f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys()]
        assert len(sizes) == s["tensors"] and (s["bytes"] <= 300 or len(sizes) == 1)
    assert set(manifest["weight_map"]) == set(m.state_dict()) - set(manifest["aliases"])
    back = lowbit.load(d, model=Toy())
    with torch.no_grad():
        assert torch.equal(back(*toy_inputs), m(*toy_inputs))
    # the same model in one shard holds the same tensors
    lowbit.save(m, d.parent / "one")
    assert [s["file"] for s in read_manifest(d.parent / "one")["shards"]] == ["model.safetensors"]


def test_sharded_bad_files_name_the_shard(sharded):
    _, d = sharded
    shards = read_manifest(d)["shards"]
    second = d / shards[1]["file"]
    raw = second.read_bytes()
    second.write_bytes(raw[:-3])
    with pytest.raises(LowbitFormatError, match=f"{shards[1]['file']} is .* truncated"):
        lowbit.load(d, model=Toy())
    second.unlink()
    with pytest.raises(LowbitFormatError, match=f"lacks its tensor file {shards[1]['file']}"):
        lowbit.load(d, model=Toy())
    second.write_bytes(raw)
    mf = d / "lowbit.json"
    good = mf.read_text()
    man = json.loads(good)
    man["weight_map"]["fc1.ghost"] = shards[0]["file"]  # the index points at a tensor no shard holds
    mf.write_text(json.dumps(man))
    with pytest.raises(LowbitFormatError, match="weight_map disagrees with the shards about 'fc1.ghost'"):
        lowbit.load(d, model=Toy())
    man = json.loads(good)
    man["shards"][0]["file"] = "../elsewhere.safetensors"  # never a path outside the directory
    mf.write_text(json.dumps(man))
    with pytest.raises(LowbitFormatError, match="bad shard record"):
        lowbit.load(d, model=Toy())
    man = json.loads(good)
    name = next(iter(man["modules"]))
    man["modules"][name]["method"] = "gptq"  # an edited module entry no longer matches its shard
    mf.write_text(json.dumps(man))
    with pytest.raises(LowbitFormatError, match="modified after saving"):
        lowbit.load(d, model=Toy())
    mf.write_text(good)
    lowbit.load(d, model=Toy())


def test_load_state_dict_keeps_a_tied_quantized_pair_one_tensor():
    """A tied embedding and head on the CPU kernel's tiled layout come back to the stored rows once,
    together, and choose their kernels together at the first call: one tensor throughout."""
    m = tied_quantized_pair()
    x = torch.randint(0, 64, (2, 5))
    want = m[1](m[0](x))
    m.load_state_dict(m.state_dict())
    assert m[0].qweight is m[1].qweight
    torch.testing.assert_close(m[1](m[0](x)), want)
    assert m[0].qweight is m[1].qweight and m[0].layout == m[1].layout
