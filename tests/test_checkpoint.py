"""Streaming quantization of transformers checkpoints (lowbit.checkpoint): the same bytes as the
in-memory path, source dtypes kept, bounded memory, and one clear error per bad checkpoint."""

import filecmp
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.checkpoint import CheckpointError, quantize_checkpoint
from lowbit.io import LowbitFormatError, read_manifest

transformers = pytest.importorskip("transformers")


def _llama(layers: int = 3, hidden: int = 64, inter: int = 128, tie: bool = True, seed: int = 0, vocab: int = 256):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   tie_word_embeddings=tie, max_position_embeddings=128)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _checkpoint(d: Path, dtype=torch.float32, shard="60KB", **kw) -> Path:
    _llama(**kw).to(dtype).save_pretrained(d, max_shard_size=shard)
    return d


def _in_memory(src: Path, spec, out: Path, method="rtn", max_shard_bytes=None, **options) -> Path:
    ref = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    ref.lowbit_source = str(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(ref, spec, method=method, **options)
    return lowbit.save(ref, out, **({} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}))


@pytest.mark.parametrize("method,scheme", [("rtn", "w4g32-asym"), ("hqq", "w4g32-asym"), ("rtn", "int8"),
                                           ("rtn", "w3g32"), ("rtn", "nf4g32"), ("rtn", "fp8"), ("hqq", "w2g16-asym")])
def test_streamed_output_is_byte_identical_to_in_memory(tmp_path, monkeypatch, method, scheme):
    import lowbit.checkpoint

    monkeypatch.setattr(lowbit.checkpoint, "CHUNK_BYTES", 5000)  # every layer in blocks of a few rows
    if method == "rtn":  # and read from the shards a block of rows at a time, as an LM head too large to read whole
        monkeypatch.setattr(lowbit.checkpoint, "READ_AHEAD_BYTES", 0)
    src = _checkpoint(tmp_path / "src")
    assert len(list(src.glob("model-*.safetensors"))) > 3  # a sharded source with an index
    a = quantize_checkpoint(src, scheme, tmp_path / "stream", method=method, max_shard_bytes=50_000)
    b = _in_memory(src, scheme, tmp_path / "mem", method=method, max_shard_bytes=50_000)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len([f for f in files if f.startswith("model-")]) >= 2
    for f in files:
        assert filecmp.cmp(a / f, b / f, shallow=False), f
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(lowbit.load(a)(x).logits, lowbit.load(b)(x).logits)


_CAL = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _head_recipe(head: str, embedding: str | None = None):
    r = lowbit.Recipe(lowbit.parse_scheme("w4g32")).add("lm_head", head)
    return r.add("model.embed_tokens", embedding) if embedding else r


@pytest.mark.parametrize("method,spec,options,tie", [
    ("gptq", "w4g32", {}, True), ("awq", "w4g32-asym", {}, False), ("awq+gptq", "w3g32", {"sequential": True}, True),
    ("smoothquant", "w8a8-static", {}, False), ("rtn", "w8a8-static", {}, True),
    ("gptq", _head_recipe("w8g32", "w8g32"), {}, True), ("gptq", _head_recipe("w8g32"), {}, False),
    ("awq", _head_recipe("w4g32"), {}, True),
])  # fmt: skip
def test_streamed_calibration_is_byte_identical_to_in_memory(tmp_path, monkeypatch, method, spec, options, tie):
    """Every calibrated path streamed block by block gives the in-memory bytes, including layers
    after the blocks (a quantized head, tied to the embedding or not) calibrated on replayed outputs;
    with a zero activation budget (gptq, awq) the activations live in memory-mapped files."""
    from lowbit.checkpoint import BlockStream

    spilled = []
    real = BlockStream.spill
    monkeypatch.setattr(BlockStream, "spill", lambda self, t: spilled.append(t.nbytes) or real(self, t))
    src = _checkpoint(tmp_path / "src", tie=tie)
    budget = 0 if method in ("gptq", "awq") else None
    a = quantize_checkpoint(src, spec, tmp_path / "stream", method=method, calibration=_CAL, max_shard_bytes=50_000,
                            bias_correction=False, activation_budget=budget, **options)  # fmt: skip
    assert (len(spilled) > 0) == (budget == 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "stream"]  # no activation file left
    b = _in_memory(src, spec, tmp_path / "mem", method=method, calibration=_CAL, bias_correction=False,
                   max_shard_bytes=50_000, **options)  # fmt: skip
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert filecmp.cmp(a / f, b / f, shallow=False), f
    layers = read_manifest(a)["layers"]
    assert sum(r["status"] == "quantized" for r in layers.values()) >= 21
    assert {r["method"] for r in layers.values() if r["status"] == "quantized"} <= {method, "rtn"}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("rules", [{"model.embed_tokens": "int8"}, {"lm_head": "w8g32"},
                                   {"model.embed_tokens": "int8", "lm_head": "w8g32"}])  # fmt: skip
def test_a_tied_head_streams_whichever_side_is_quantized(tmp_path, method, rules):
    """The head tied to the embedding, stored once: quantizing either side (or both) reads the
    shared weight under its stored name, and the side left float is written as a float tensor of
    its own (the alias to a quantized tensor would point at nothing)."""
    src = _checkpoint(tmp_path / "src", tie=True)
    spec = lowbit.Recipe(lowbit.parse_scheme("w4g32"))
    for pattern, scheme in rules.items():
        spec.add(pattern, scheme)
    opts = {"calibration": _CAL} if method == "gptq" else {}
    a = quantize_checkpoint(src, spec, tmp_path / "stream", method=method, max_shard_bytes=50_000, **opts)
    b = _in_memory(src, spec, tmp_path / "mem", method=method, max_shard_bytes=50_000, **opts)
    for f in sorted(p.name for p in a.iterdir()):
        assert filecmp.cmp(a / f, b / f, shallow=False), f
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(lowbit.load(a)(x).logits, lowbit.load(b)(x).logits)


def test_streamed_calibration_of_a_bf16_encoder(tmp_path):
    """An encoder (BERT: blocks under encoder.layer, embeddings with their own LayerNorm) from a bf16
    checkpoint: unfolded norms stay bf16, folded ones float32; the result runs close to in-memory."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(cfg).eval().to(torch.bfloat16).save_pretrained(tmp_path / "src")
    cal = [torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    out = quantize_checkpoint(tmp_path / "src", "w4g32", tmp_path / "q", method="awq", calibration=cal)
    m = read_manifest(out)
    assert len(m["modules"]) == 13 and {e["orig_dtype"] for e in m["modules"].values()} == {"bfloat16"}
    assert m["modules"]["pooler.dense"]["method"] == "awq"  # after the blocks: calibrated on their replayed outputs
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["embeddings.word_embeddings.weight"] == "BF16"
    assert dtypes["encoder.layer.0.output.LayerNorm.weight"] == "BF16"  # (no linear reads it in the block)
    ref = transformers.BertModel.from_pretrained(tmp_path / "src", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(ref, "w4g32", method="awq", calibration=cal)
    x = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        a, b = lowbit.load(out)(x), ref(x)
    for k in ("last_hidden_state", "pooler_output"):
        assert torch.nn.functional.cosine_similarity(a[k].flatten(), b[k].flatten(), dim=0) > 0.999, k


def test_streamed_calibration_refuses_what_it_cannot_do(tmp_path):
    from lowbit.calibrate import CalibrationError

    src = _checkpoint(tmp_path / "src")
    with pytest.raises(CalibrationError, match="needs calibration data"):
        quantize_checkpoint(src, "w4g32", tmp_path / "q", method="gptq")
    with pytest.raises(lowbit.driver.QuantizeError, match="bias correction"):
        quantize_checkpoint(src, "w8a8-static", tmp_path / "q", calibration=_CAL, bias_correction=True)
    with pytest.raises(lowbit.driver.QuantizeError, match="--ray does not take static activation schemes"):
        quantize_checkpoint(src, "w8a8-static", tmp_path / "q", calibration=_CAL, ray_address="local",
                            bias_correction=False)  # fmt: skip
    assert not (tmp_path / "q").exists()


def test_bf16_source_keeps_bf16_for_what_is_not_quantized(tmp_path):
    src = _checkpoint(tmp_path / "src", dtype=torch.bfloat16, tie=False)
    out = quantize_checkpoint(src, "w4g32", tmp_path / "q")
    m = read_manifest(out)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert m["modules"]["model.layers.0.mlp.up_proj"]["orig_dtype"] == "bfloat16"
    assert len(m["modules"]) == 3 * 7
    # the quantized tensors equal the in-memory path's (which reads the bf16 weights as float32)
    mem = _in_memory(src, "w4g32", tmp_path / "mem")
    from safetensors.torch import load_file

    sa, sb = load_file(str(out / "model.safetensors")), load_file(str(mem / "model.safetensors"))
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k
    model = lowbit.load(out)
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)
    # loaded, the float embedding and head keep their bf16 storage (no float32 copy) and compute
    # exactly what the in-memory float32 model does; size_of counts them as stored
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = lowbit.load(mem)
    assert ref.lm_head.weight.dtype == torch.float32
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    assert lowbit.size_of(ref).total_bytes - lowbit.size_of(model).total_bytes == 2 * 256 * 64 * 2
    assert type(model.lm_head).__name__ == "HalfStoredLinear"
    lowbit.quantize(model, lowbit.Recipe(default=None).add("lm_head", "int8"))  # still a layer lowbit quantizes
    assert type(model.lm_head).__name__ == "QuantLinear" and model.lm_head.orig_dtype == "bfloat16"


def test_bad_checkpoints_fail_clearly_and_leave_the_old_output(tmp_path):
    src = _checkpoint(tmp_path / "src")
    out = quantize_checkpoint(src, "w4g32", tmp_path / "q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shards = sorted(src.glob("model-*.safetensors"))
    raw = shards[1].read_bytes()
    shards[1].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=f"shard {shards[1].name} .* truncated"):
        quantize_checkpoint(src, "w4g32", out)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[1].name} .* missing"):
        quantize_checkpoint(src, "w4g32", out)
    shards[1].write_bytes(raw)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    good = json.dumps(index)
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = shards[0].name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost"):
        quantize_checkpoint(src, "w4g32", out)
    (src / "model.safetensors.index.json").write_text(good)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the config no longer matches the tensors
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight' is F32 \(128, 64\); .* shape \(96, 64\)"):
        quantize_checkpoint(src, "w4g32", out)
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]  # no temporary directories left
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle files, which lowbit never loads"):
        quantize_checkpoint(tmp_path / "pickled", "w4g32", tmp_path / "q2")


def test_an_interrupted_run_keeps_the_old_output_and_reruns_cleanly(tmp_path, monkeypatch):
    src = _checkpoint(tmp_path / "src")
    out = quantize_checkpoint(src, "w4g32", tmp_path / "q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from lowbit.algorithms import rtn

    calls = {"n": 0}
    real = rtn.quantize_weight

    def fails_later(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(rtn, "quantize_weight", fails_later)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, "w8g32", out, max_shard_bytes=20_000)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]
    quantize_checkpoint(src, "w8g32", out)
    assert read_manifest(out)["modules"]["model.layers.2.self_attn.o_proj"]["scheme"] == "w8g32"


def test_a_full_disk_is_one_clear_error_and_keeps_the_old_output(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    src = _checkpoint(tmp_path / "src")
    out = quantize_checkpoint(src, "w4g32", tmp_path / "q", max_shard_bytes=50_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = safetensors.torch.save_file, []

    def full(tensors, path, metadata=None):  # the disk fills up while the third shard is written
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=r"writing shard 3 .* failed after .* MB of shards: .*No space left") as e:
        quantize_checkpoint(src, "w8g32", tmp_path / "q", max_shard_bytes=50_000)
    assert e.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]  # no temporary directory left behind


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_really_full_tmpfs(tmp_path):
    """The same on a real filesystem that runs out of space (a 1 MiB tmpfs)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (no privilege in this container)")
    try:
        src = _checkpoint(tmp_path / "src", layers=4, hidden=128, inter=256)
        out = quantize_checkpoint(src, "w2g32", mnt / "q", max_shard_bytes=100_000)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(OSError, match="failed after") as e:
            quantize_checkpoint(src, "w8g32", mnt / "q", max_shard_bytes=100_000)
        assert e.value.errno in (28, 122)  # ENOSPC (or EDQUOT)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert [p.name for p in mnt.iterdir()] == ["q"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_nan_weights_are_refused(tmp_path):
    m = _llama()
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    m.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj"):
        quantize_checkpoint(tmp_path / "src", "w4g32", tmp_path / "q")
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj"):
        quantize_checkpoint(tmp_path / "src", "w4g32", tmp_path / "q", method="gptq", calibration=_CAL)
    assert not (tmp_path / "q").exists()
    m = _llama()
    with torch.no_grad():  # a tensor that is copied, not quantized
        m.model.layers[2].post_attention_layernorm.weight[7] = float("inf")
    m.save_pretrained(tmp_path / "src2")
    for method in ("rtn", "awq"):
        with pytest.raises(ValueError, match=r"model.layers.2.post_attention_layernorm.weight' has 1 NaN/Inf"):
            quantize_checkpoint(tmp_path / "src2", "w4g32", tmp_path / "q", method=method,
                                calibration=_CAL if method == "awq" else None)  # fmt: skip
    assert not (tmp_path / "q").exists()
    with pytest.raises(LowbitFormatError, match="not a lowbit model"):
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "x.txt").write_text("keep")
        quantize_checkpoint(tmp_path / "src", "w4g32", tmp_path / "foreign")


_PEAK = """
import sys, json, torch
from lowbit import memory
from lowbit.checkpoint import Checkpoint, quantize_checkpoint, skeleton

skeleton(Checkpoint(sys.argv[1]))  # imports and a first skeleton: not what is measured
cal = [torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
opts = {"calibration": cal, "clip": "minmax"} if sys.argv[3] == "gptq" else {}
# a whole run on a 1-layer checkpoint first: the libraries' lazy set-up (LAPACK workspaces, thread
# pools; tens of MiB, varying from run to run) is not what is measured
quantize_checkpoint(sys.argv[4], "w4g64", sys.argv[2] + "-warm", max_shard_bytes=4 << 20, method=sys.argv[3], **opts)
memory.trim()
memory.reset_peak_rss()
start = memory.peak_rss_mib()
quantize_checkpoint(sys.argv[1], "w4g64", sys.argv[2], max_shard_bytes=4 << 20, method=sys.argv[3], **opts)
print(json.dumps(memory.peak_rss_mib() - start))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.parametrize("method", ["rtn"])  # (calibrated methods keep glibc's defaults: memory.release_large_frees)
def test_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path, method):
    growth = {}
    warm = _checkpoint(tmp_path / "L1", layers=1, hidden=512, inter=2048, shard="20MB")
    for n in (2, 8):
        src = _checkpoint(tmp_path / f"L{n}", layers=n, hidden=512, inter=2048, shard="20MB")
        p = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(tmp_path / f"q{n}"), method, str(warm)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
        growth[n] = float(p.stdout.strip().splitlines()[-1])
    layer_mib = (4 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 2048) * 4 / 2**20  # one block's float32 weights
    # six more blocks (~100 MiB of float32 weights) add at most one block (allocator and page-cache
    # noise on a busy 2-core CI machine reached ~0.6 of a block); holding the model would add six.
    # The whole run's growth stays within a few blocks (the in-memory path grows by the whole model)
    assert growth[8] <= growth[2] + layer_mib, (growth, layer_mib)
    # GPTQ also holds the largest Hessian (down_proj's 2048 x 2048 float32) with its damped copy,
    # Cholesky factors and inverse, and the calibration activations
    hessian_mib = 2048 * 2048 * 4 / 2**20
    assert growth[8] <= 4 * layer_mib + (0 if method == "rtn" else 6 * hessian_mib), (growth, layer_mib)


def test_cli_streams_a_checkpoint_directory(tmp_path):
    src = _checkpoint(tmp_path / "src", dtype=torch.bfloat16)
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(src), "--scheme", "w4g32", "-o", str(tmp_path / "q"),
           "--shard-size", "40KB", "-q"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "streamed layer by layer" in p.stdout and "21 layers quantized" in p.stdout
    m = read_manifest(tmp_path / "q")
    assert len(m["shards"]) >= 2 and all(s["bytes"] <= 40_000 or s["tensors"] == 1 for s in m["shards"])
    lowbit.load(tmp_path / "q")
    p = subprocess.run(cmd[:-5] + ["--no-stream", "-o", str(tmp_path / "mem"), "-q"], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == 0 and "streamed" not in p.stdout, p.stderr[-2000:]
    p = subprocess.run(cmd[:-5] + ["--shard-size", "lots", "-o", str(tmp_path / "x")], capture_output=True, text=True)
    assert p.returncode == 2 and "not a size" in p.stderr


def test_eval_compares_a_streamed_model_with_its_checkpoint(tmp_path, monkeypatch, capsys):
    from lowbit import cli, memory

    src = _checkpoint(tmp_path / "src", dtype=torch.bfloat16)
    out = quantize_checkpoint(src, "w4g32", tmp_path / "q")
    source = read_manifest(out)["model"]["source"]
    assert cli._default_baseline(source) == str(src)  # the float model it came from, loaded as a baseline
    monkeypatch.setattr(memory, "available_bytes", lambda: 100_000)  # too large to hold in float32: said so
    assert cli._default_baseline(source) is None and "no float32 baseline" in capsys.readouterr().err
    assert cli._default_baseline(str(tmp_path / "gone")) is None


_LOAD_PEAK = """
import sys, json, torch, warnings
import lowbit
from lowbit import memory
warnings.simplefilter("ignore")

lowbit.load(sys.argv[2])  # imports, transformers' model code: not what is measured
memory.trim()
memory.reset_peak_rss()
start = memory.rss_mib()
m = lowbit.load(sys.argv[1])
with torch.no_grad():
    m(torch.randint(0, 256, (1, 8)))
print(json.dumps(memory.peak_rss_mib() - start))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_holds_about_the_file(tmp_path, dtype):
    # (bf16: the unquantized embedding and LM head, a quarter of the file, stay bf16 when loaded)
    src = _checkpoint(tmp_path / "src", dtype, layers=8, hidden=512, inter=2048, shard="20MB", tie=False, vocab=16384)
    small = quantize_checkpoint(_checkpoint(tmp_path / "small", layers=1), "w8g64", tmp_path / "small-q")
    out = quantize_checkpoint(src, "w8g64", tmp_path / "q", max_shard_bytes=8 << 20)
    file_mib = sum(s["bytes"] for s in read_manifest(out)["shards"]) / 2**20
    float_mib = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**20
    p = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(out), str(small)], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    growth = float(p.stdout.strip().splitlines()[-1])
    # the file once, plus a layer's worth of conversion temporaries: never a float skeleton
    assert growth <= 1.25 * file_mib + 16, (growth, file_mib, float_mib)


@pytest.mark.parametrize("spec,tie", [("w4g32", False), ("w3g32-asym", False), ("int8", False),
                                      ("w4g32+head", True), ("w4g32+head", False)])
def test_estimate_gives_the_exact_output_size_from_headers_alone(tmp_path, spec, tie):
    from safetensors import safe_open

    from lowbit.estimate import estimate_checkpoint

    src = _checkpoint(tmp_path / "src", dtype=torch.bfloat16, tie=tie)
    if spec.endswith("+head"):  # the LM head quantized too (tied: stored under the embedding's name)
        spec = lowbit.Recipe.from_scheme("w4g32").add("lm_head", "int8")
    est = estimate_checkpoint(src, spec)
    out = quantize_checkpoint(src, spec, tmp_path / "q")
    data = 0
    for s in read_manifest(out)["shards"]:
        with safe_open(str(out / s["file"]), framework="pt") as f:
            data += sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
    assert est.output_bytes == data and est.quantized_layers == len(read_manifest(out)["modules"])
    assert est.quantized_layers == 21 + isinstance(spec, lowbit.Recipe)
    assert est.source_bytes == sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert est.largest_layer.endswith(("gate_proj", "up_proj", "down_proj", "lm_head"))
    assert 0 < est.load_peak and est.output_bytes < est.quantize_peak
    if isinstance(spec, lowbit.Recipe):
        spec.save(tmp_path / "recipe.json")
    how = ["--recipe", str(tmp_path / "recipe.json")] if isinstance(spec, lowbit.Recipe) else ["--scheme", spec]
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "estimate", "--model", str(src), *how],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0 and "peak memory, streamed quantization" in p.stdout, p.stderr[-1000:]


def test_estimate_models_the_calibrated_block_phase(tmp_path):
    """Calibrated methods add one block's float32 work, its activations for every window and its
    statistics: more for GPTQ (K x K Hessians) than for round-to-nearest, growing with the
    calibration tokens; bad methods are refused."""
    from lowbit.estimate import estimate_checkpoint

    src = _checkpoint(tmp_path / "src", dtype=torch.bfloat16, vocab=64)
    rtn = estimate_checkpoint(src, "w4g32", max_shard_bytes=1 << 20)
    small = estimate_checkpoint(src, "w4g32", max_shard_bytes=1 << 20, method="gptq", nsamples=4, seqlen=32)
    big = estimate_checkpoint(src, "w4g32", max_shard_bytes=1 << 20, method="gptq", nsamples=64, seqlen=128)
    assert rtn.quantize_peak < small.quantize_peak < big.quantize_peak
    assert big.output_bytes == rtn.output_bytes and big.calibration == "64 x 128" and rtn.calibration == ""
    hidden = 64  # the tiny Llama's width: 64 windows x 128 tokens of inputs and outputs, float32
    assert big.quantize_peak - small.quantize_peak >= 2 * 4 * hidden * (64 * 128 - 4 * 32)
    with pytest.raises(ValueError):
        estimate_checkpoint(src, "w4g32", method="nope")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_workers_give_the_same_bytes_as_one_process(tmp_path, ray_cluster):
    src = _checkpoint(tmp_path / "src", dtype=torch.bfloat16)
    one = quantize_checkpoint(src, "w4g32-asym", tmp_path / "one", method="rtn", max_shard_bytes=30_000)
    outs = [quantize_checkpoint(src, "w4g32-asym", tmp_path / f"ray{n}", method="rtn", max_shard_bytes=30_000,
                                ray_address="local", ray_workers=n) for n in (1, 2)]  # fmt: skip
    files = sorted(p.name for p in one.iterdir())
    assert len([f for f in files if f.startswith("model-")]) >= 2
    for out in outs:
        assert sorted(p.name for p in out.iterdir()) == files
        for f in files:
            same = filecmp.cmp(one / f, out / f, shallow=False)
            assert same or f == "lowbit.json", f
        assert read_manifest(out)["modules"] == read_manifest(one)["modules"]
    # a layer's error on a worker reaches the caller as that error, naming the layer
    m = _llama()
    with torch.no_grad():
        m.model.layers[2].self_attn.v_proj.weight[0, 0] = float("inf")
    m.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="model.layers.2.self_attn.v_proj"):
        quantize_checkpoint(tmp_path / "bad", "w4g32", tmp_path / "q", ray_address="local")
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("gptq", {}), ("awq", {}), ("awq+gptq", {"sequential": True})])
def test_ray_workers_split_the_calibration_set(tmp_path, ray_cluster, method, options):
    """Calibrated methods on Ray: each worker holds part of the calibration batches and sends back
    its sums; the output equals one process's up to float summation order (Hessians, AWQ's mean
    magnitudes): codes may differ only where summation order tips a rounding, by one step, in a
    tiny fraction of weights; AWQ's folded scales (in the norms) to float rounding."""
    from safetensors.torch import load_file

    src = _checkpoint(tmp_path / "src", tie=False)
    cal = [torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    one = quantize_checkpoint(src, "w4g32", tmp_path / "one", method=method, calibration=cal, **options)
    ref = load_file(str(one / "model.safetensors"))
    for n in (1, 2):
        out = quantize_checkpoint(src, "w4g32", tmp_path / f"ray{n}", method=method, calibration=cal,
                                  ray_address="auto", ray_workers=n, **options)  # fmt: skip
        got = load_file(str(out / "model.safetensors"))
        assert sorted(got) == sorted(ref) and read_manifest(out)["modules"] == read_manifest(one)["modules"]
        changed = total = 0
        for k, v in ref.items():
            if k.endswith(".qweight"):
                a, b = (lowbit.packing.unpack(t, 4, 2 * v.shape[1]) for t in (v, got[k]))
                changed += int((a != b).sum())
                total += a.numel()
                assert int((a.int() - b.int()).abs().max()) <= 1, k
            elif not k.endswith(".scales"):  # norms (AWQ's folded scales), embeddings, biases
                assert torch.allclose(v, got[k], rtol=1e-4, atol=0), k
        assert changed <= 0.002 * total, (n, changed, total)
        x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            la, lb = lowbit.load(one)(x).logits, lowbit.load(out)(x).logits
        assert float((la - lb).norm() / la.norm()) < 0.01


def test_a_ray_address_that_does_not_answer_is_one_clear_error(tmp_path):
    pytest.importorskip("ray")
    from lowbit.distributed import RayError

    src = _checkpoint(tmp_path / "src", layers=1)
    with pytest.raises(RayError, match="does not answer"):
        quantize_checkpoint(src, "w4g32", tmp_path / "q", ray_address="127.0.0.1:9")
    with pytest.raises(RayError, match="HOST:PORT"):
        quantize_checkpoint(src, "w4g32", tmp_path / "q", ray_address="localhost")
    assert not (tmp_path / "q").exists()
    # the CLI: one line and exit status 2, like every other bad input
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", str(src), "--scheme", "w4g32", "-q",
                        "--ray", "127.0.0.1:9", "-o", str(tmp_path / "q")], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and "does not answer" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_an_output_path_that_is_a_symlink_is_written_through(tmp_path):
    """The directory the link names gets the new model (the old one stays whole until then); the
    link stays a link."""
    src = _checkpoint(tmp_path / "src", layers=1)
    old = quantize_checkpoint(src, "w8", tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    out = quantize_checkpoint(src, "w4g32", link)
    assert link.is_symlink() and out == (tmp_path / "real").resolve() == old.resolve()
    assert read_manifest(link)["layers"]["model.layers.0.mlp.down_proj"]["scheme"] == "w4g32"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_a_killed_run_leaves_nothing_that_outlives_the_next_run(tmp_path):
    """SIGKILL skips every cleanup: the next run removes the dead process's temporary directory."""
    src = _checkpoint(tmp_path / "src")
    code = ("import os, signal, lowbit.io.shards as s\n"
            "real = s.ShardWriter._flush\n"
            "def die(self):\n"
            "    real(self); os.kill(os.getpid(), signal.SIGKILL)\n"
            "s.ShardWriter._flush = die\n"
            f"from lowbit.checkpoint import quantize_checkpoint\nquantize_checkpoint({str(src)!r}, 'w4g32', "
            f"{str(tmp_path / 'q')!r}, max_shard_bytes=20_000)\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")]
    assert len(stale) == 1 and not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="max_shard_bytes must be positive"):
        quantize_checkpoint(src, "w4g32", tmp_path / "q", max_shard_bytes=0)
    quantize_checkpoint(src, "w4g32", tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(LowbitFormatError, match="is a file"):
        quantize_checkpoint(src, "w4g32", tmp_path / "file" / "q")


def test_the_model_class_comes_from_the_stored_tensors(tmp_path):
    """GPT-2's class is GPT2LMHeadModel (not a ...ForCausalLM name); a config without
    ``architectures`` gets the class whose names the checkpoint holds (head or base model)."""
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    out = quantize_checkpoint(tmp_path / "gpt2", "w4g32", tmp_path / "q")
    assert read_manifest(out)["model"]["class"] == "GPT2LMHeadModel"
    ids = torch.randint(0, 256, (1, 12))
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    got = lowbit.load(out)
    assert got(ids).logits.shape == ref(ids).logits.shape == (1, 12, 256)
    for name, arch in (("causal", "LlamaForCausalLM"), ("base", "LlamaModel")):
        m = _llama(tie=False) if name == "causal" else _llama(tie=False).model
        m.save_pretrained(tmp_path / name)
        c = json.loads((tmp_path / name / "config.json").read_text())
        del c["architectures"]
        (tmp_path / name / "config.json").write_text(json.dumps(c))
        out = quantize_checkpoint(tmp_path / name, "w4g32", tmp_path / f"q{name}")
        assert read_manifest(out)["model"]["class"] == arch


def test_stored_tensors_the_model_does_not_use_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _checkpoint(tmp_path / "src", shard="10MB")
    t = load_file(src / "model.safetensors")
    t["model.layers.0.mlp.extra_adapter.weight"] = torch.ones(4, 4)
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 stored tensor\(s\) are not part of LlamaForCausalLM .*extra_adapter"):
        quantize_checkpoint(src, "w4g32", tmp_path / "q")


def test_an_hf_directory_with_only_pickle_weights_is_refused_in_memory_too(tmp_path):
    from lowbit.models.source import load_source

    d = tmp_path / "pickled"
    _checkpoint(d, shard="10MB")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")  # (a name, not a pickle: never opened)
    with pytest.raises(CheckpointError, match="pickle files, which lowbit never loads"):
        load_source(str(d))
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", str(d), "--scheme", "w4g32", "--no-stream",
                        "-o", str(tmp_path / "q")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0 and "pickle files, which lowbit never loads" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_memory_mapped_load_computes_the_same_and_never_writes_the_file(tmp_path):
    src = _checkpoint(tmp_path / "src", dtype=torch.bfloat16, tie=False)
    out = quantize_checkpoint(src, "w4g32", tmp_path / "q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    a, b = lowbit.load(out), lowbit.load(out, mmap=True)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
        b.lm_head.weight.mul_(2)  # copy-on-write: the model's pages, not the file's
        b.model.embed_tokens.weight.zero_()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert torch.equal(lowbit.load(out, mmap=True).lm_head.weight, a.lm_head.weight)


def test_a_shard_is_written_while_the_next_fills_and_at_most_one_is_in_flight(tmp_path, monkeypatch):
    import threading

    import safetensors.torch

    from lowbit.io.shards import ShardWriter, read_tensors

    real, gate, calls = safetensors.torch.save_file, threading.Event(), []

    def held(tensors, path, metadata=None):  # the first shard's write waits until the test lets it go
        calls.append(path)
        if len(calls) == 1:
            assert gate.wait(30)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", held)
    t = {f"t{i}": torch.full((256,), float(i)) for i in range(3)}  # 1 KiB each: one per shard
    w = ShardWriter(tmp_path, max_bytes=1500)
    w.add("t0", t["t0"])
    w.add("t1", t["t1"])  # shard 1 goes to the writer thread, which holds it; this call returns
    assert calls == [] or len(calls) == 1
    third = threading.Thread(target=w.add, args=("t2", t["t2"]))  # shard 2 must wait for shard 1
    third.start()
    third.join(0.5)
    assert third.is_alive(), "a second shard was handed over while the first was still being written"
    gate.set()
    third.join(30)
    shards, weight_map = w.close()
    assert [s["tensors"] for s in shards] == [1, 1, 1] and len(calls) == 3
    got = {}
    for s in shards:
        got.update(read_tensors(tmp_path / s["file"]))
    assert all(torch.equal(got[k], v) for k, v in t.items()) and set(weight_map) == set(t)


def test_an_abort_does_not_wait_for_the_shard_in_flight_and_leaves_nothing(tmp_path, monkeypatch):
    import threading

    import safetensors.torch

    from lowbit.io.writer import ModelWriter

    real, gate, started = safetensors.torch.save_file, threading.Event(), threading.Event()

    def held(tensors, path, metadata=None):
        started.set()
        assert gate.wait(30)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", held)
    out = tmp_path / "out"

    def run():
        try:
            with ModelWriter(out, max_shard_bytes=1500) as w:
                w.add_tensor("a", torch.ones(256))
                w.add_tensor("b", torch.ones(256))  # shard 1 goes to the writer thread, which blocks
                assert started.wait(30)
                raise KeyboardInterrupt  # (a Ctrl-C while shard 1 is being written)
        except KeyboardInterrupt:
            pass

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the abort waited for the blocked shard write"
    assert list(tmp_path.iterdir()) == []  # the temporary directory went at once
    gate.set()  # the write ends (into a removed directory); nothing reappears
    for _ in range(100):
        if not any(th.name.startswith("lowbit-shard") for th in threading.enumerate()):
            break
        threading.Event().wait(0.05)
    assert list(tmp_path.iterdir()) == []
