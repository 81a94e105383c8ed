"""compressed-tensors export: the library's own unpacking reads lowbit's codes back exactly, and
transformers loads the directory (CPU) and computes lowbit's logits."""

import copy
import json

import pytest
import torch

import lowbit
from lowbit.io.compressed_tensors import CTExportError, ct_mapping, export_compressed_tensors
from lowbit.qweight import QWeight
from lowbit.scheme import parse_scheme

ct = pytest.importorskip("compressed_tensors")


def _qw(spec: str, n: int = 40, k: int = 256, seed: int = 0) -> QWeight:
    g = torch.Generator().manual_seed(seed)
    return QWeight.from_float(torch.randn(n, k, generator=g) * 0.05, parse_scheme(spec))


@pytest.mark.parametrize("spec", ["w4g64", "w4g32-asym", "w4", "w4-asym", "w8", "w8g64-asym", "w2g32", "w2g64-asym"])
def test_pack_quantized_is_lowbits_bytes_and_the_library_unpacks_lowbits_codes(spec):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from lowbit.io.compressed_tensors import _tensors

    qw = _qw(spec)
    assert ct_mapping(qw) == ("pack-quantized", "")
    t = _tensors("l", qw, "pack-quantized")
    b = qw.scheme.bits
    codes = unpack_from_int32(t["l.weight_packed"], b, torch.Size([qw.rows, qw.cols]))  # signed
    assert torch.equal(codes.to(torch.int32) + (1 << (b - 1)), qw.codes().to(torch.int32))
    if qw.zero is not None:
        zp = unpack_from_int32(t["l.weight_zero_point"], b, torch.Size([qw.rows, qw.n_groups]), packed_dim=0)
        assert torch.equal(zp.to(torch.int32) + (1 << (b - 1)), qw.zero_points().to(torch.int32))
    else:
        assert "l.weight_zero_point" not in t
    assert t["l.weight_scale"].dtype == torch.float32 and torch.equal(t["l.weight_scale"], qw.scales())


@pytest.mark.parametrize("spec,why", [("w3g64", "3-bit"), ("nf4g64", "nf4"), ("w4-tensor", "one per tensor"),
                                      ("w8a8-static", "static"), ("w8a8g64", "grouped")])  # fmt: skip
def test_schemes_without_a_format_say_why(spec, why):
    assert why in ct_mapping(_qw(spec))[1]


def test_groups_that_do_not_divide_the_row_have_no_format():
    assert "does not divide the row" in ct_mapping(_qw("w4g64", k=200))[1]


@pytest.fixture(scope="module")
def models(smollm2):
    base = smollm2.model
    return {
        "w4g64-asym": lowbit.quantize(copy.deepcopy(base), "w4g64-asym"),
        "mixed": lowbit.quantize(copy.deepcopy(base), lowbit.Recipe(parse_scheme("w4g32")).add("*mlp.down_proj", "w8")),
    }


def _ref_logits(model, ids):
    from lowbit import kernels

    with torch.no_grad():
        kernels.use_kernel(model, "reference")
        out = model(input_ids=ids).logits
        kernels.use_kernel(model, "auto")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["w4g64-asym", "mixed"])
def test_transformers_loads_the_export_and_computes_lowbits_logits(models, smollm2, which, tmp_path):
    import transformers

    m = models[which]
    rep = export_compressed_tensors(m, tmp_path / "ct", tokenizer=smollm2.tokenizer)
    assert {(r.target, r.mapping) for r in rep.entries} == {("pack-quantized", "exact")}
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    ct.quantization.QuantizationConfig.model_validate(qc)
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert len(qc["config_groups"]) == (1 if which == "w4g64-asym" else 2)
    # transformers 5.x with compressed-tensors 0.20 builds asymmetric layers' zero points unpacked on
    # the meta device and refuses the packed ones (llm-compressor#1618): those load dequantized
    opts = {}
    if which.endswith("asym"):
        opts["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32, **opts)
    ids = torch.tensor([list(range(300, 364))])
    ref = _ref_logits(m, ids)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    assert float((theirs - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.slow
def test_requantized_or_refused_and_nothing_overwritten(smollm2, tmp_path):
    m = lowbit.quantize(copy.deepcopy(smollm2.model), lowbit.Recipe(parse_scheme("w4g64")).add("model.layers.2.mlp.up_proj", "w3g64"))
    out = tmp_path / "ct"
    with pytest.raises(CTExportError, match=r"model\.layers\.2\.mlp\.up_proj \(w3g64: 3-bit"):
        export_compressed_tensors(m, out, exact=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    rep = export_compressed_tensors(m, out, requantize="w8")
    req = [r for r in rep.entries if r.mapping == "requantized"]
    assert [r.name for r in req] == ["model.layers.2.mlp.up_proj"] and 0 < req[0].rel_rms_error < 0.02
    with pytest.raises(FileExistsError):
        export_compressed_tensors(m, out)


@pytest.mark.slow
def test_cli_exports_compressed_tensors_and_rejects_options_of_other_formats(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "ct"
    assert main(["export", "smollm2-135m", "--scheme", "w4g128", "--to", "compressed-tensors", "-o", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert "pack-quantized exact" in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert main(["export", "smollm2-135m", "--scheme", "w4g128", "--to", "compressed-tensors", "-o", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export", "smollm2-135m", "--to", "compressed-tensors", "--float-type", "F16", "-o",
                 str(tmp_path / "x")]) == 2  # fmt: skip
    assert "apply to --to gguf" in capsys.readouterr().err


def test_overwrite_replaces_only_an_earlier_export(toy, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("mine")
    q = lowbit.quantize(toy, "w4g32")
    with pytest.raises(FileExistsError, match="not a compressed-tensors export; not replacing it"):
        export_compressed_tensors(q, precious, overwrite=True)
    with pytest.raises(FileExistsError, match="is a file"):
        export_compressed_tensors(q, precious / "thesis.txt", overwrite=True)
    assert (precious / "thesis.txt").read_text() == "mine" and len(list(precious.iterdir())) == 1


def test_tie_is_decided_from_the_weights_not_the_config(tmp_path):
    """A config that still says tied over a head that no longer shares the embedding's weights
    (untied after loading) is exported untied: the head is stored and the config says so."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach() * 1.5)  # untied, config unchanged
    lowbit.quantize(m, "w4g32")
    assert m.config.tie_word_embeddings  # float head and embedding: the driver left the config alone
    export_compressed_tensors(m, tmp_path / "ct")
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["tie_word_embeddings"] is False
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    assert torch.equal(hf.lm_head.weight, m.lm_head.weight)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    ref = _ref_logits(m, ids)
    with torch.no_grad():
        assert float((hf(input_ids=ids).logits - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_half_precision_layers_are_dense_and_ignored(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    rec = lowbit.Recipe(parse_scheme("w4g32")).add("model.layers.0.mlp.up_proj", "bf16")
    lowbit.quantize(m, rec)
    rep = export_compressed_tensors(m, tmp_path / "ct", exact=True)
    assert {(e.source, e.target, e.mapping) for e in rep.entries if e.target == "dense"} == {
        ("model.layers.0.mlp.up_proj", "dense", "exact")}
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.up_proj" in qc["ignore"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    assert torch.equal(hf.model.layers[0].mlp.up_proj.weight, m.model.layers[0].mlp.up_proj.qw.dequantize(torch.float32))
    with pytest.raises(CTExportError, match=r"up_proj \(bf16: dense float16 rounds"):
        export_compressed_tensors(m, tmp_path / "ct16", exact=True, dtype="float16")


def test_w8a8_is_int_quantized_with_its_weights_exact_and_activations_left_to_the_runtime(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    m = lowbit.quantize(transformers.LlamaForCausalLM(cfg).eval(), "w8a8")
    rep = export_compressed_tensors(m, tmp_path / "ct")
    assert rep.counts() == {"int-quantized weights exact": 7}
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "ct" / "model.safetensors"))
    qw = m.model.layers[0].mlp.up_proj.qw
    w = t["model.layers.0.mlp.up_proj.weight"].float() * t["model.layers.0.mlp.up_proj.weight_scale"]
    assert torch.equal(w, qw.dequantize(torch.float32))


def _small_llama(seed=0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_float32_scales_in_a_half_precision_export_are_reported_with_their_error_or_refused(tmp_path):
    """A layer of tiny weights keeps float32 scales (float16 would lose them). A bfloat16 export
    holds their range: the layer is "scales rounded" with the error measured against lowbit's
    weights (its scales stored bfloat16), exact=True refuses it. In float16 they underflow to 0:
    refused outright. A float32 export stays exact."""
    from safetensors.torch import load_file

    m = _small_llama()
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.mul_(1e-7)
    lowbit.quantize(m, "w4g32")
    qw = m.model.layers[0].mlp.down_proj.qw
    assert qw.scale.dtype == torch.float32
    assert export_compressed_tensors(m, tmp_path / "f32").counts() == {"pack-quantized exact": 7}
    rep = export_compressed_tensors(m, tmp_path / "bf16", dtype="bfloat16")
    (e,) = [e for e in rep.entries if e.mapping != "exact"]
    assert (e.source, e.mapping) == ("model.layers.0.mlp.down_proj", "scales rounded") and "bfloat16" in e.why
    t = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    s = t["model.layers.0.mlp.down_proj.weight_scale"]
    assert s.dtype == torch.bfloat16
    w = (qw.codes().float() - 8) * s.float().repeat_interleave(32, dim=1)
    ref = qw.dequantize(torch.float32)
    err = float((w - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    assert err > 1e-4 and abs(e.rel_rms_error - err) <= 1e-6 + 1e-3 * err
    with pytest.raises(CTExportError, match=r"down_proj \(w4g32: its float32 scales are rounded to bfloat16"):
        export_compressed_tensors(m, tmp_path / "x", dtype="bfloat16", exact=True)
    with pytest.raises(CTExportError, match=r"down_proj \(w4g32: its float32 scales do not fit float16 \(\d+ of"):
        export_compressed_tensors(m, tmp_path / "y", dtype="float16")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_overwrite_keeps_files_an_export_does_not_write(tmp_path):
    q = lowbit.quantize(_small_llama(), "w4g32")
    out = tmp_path / "ct"
    export_compressed_tensors(q, out)
    (out / "my_eval_results.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="also holds my_eval_results.txt"):
        export_compressed_tensors(q, out, overwrite=True)
    assert (out / "my_eval_results.txt").read_text() == "mine"
    (out / "my_eval_results.txt").unlink()
    export_compressed_tensors(q, out, overwrite=True)  # an export alone is replaced


def test_asymmetric_note_only_when_an_asymmetric_layer_is_written(tmp_path):
    m = _small_llama()
    sym = export_compressed_tensors(lowbit.quantize(copy.deepcopy(m), "w4g32"), tmp_path / "a")
    assert not any("asymmetric" in n for n in sym.notes)
    asym = export_compressed_tensors(lowbit.quantize(copy.deepcopy(m), "w4g32-asym"), tmp_path / "b")
    assert any("dequantize=True" in n for n in asym.notes)
    # HQQ's fractional zero points are requantized to symmetric w8: nothing asymmetric is written
    hqq = export_compressed_tensors(lowbit.quantize(copy.deepcopy(m), "w4g32-asym", method="hqq"), tmp_path / "c")
    assert {e.target for e in hqq.entries} == {"pack-quantized int8"} and not any("asymmetric" in n for n in hqq.notes)


def test_static_activations_are_said_to_go_out_weight_only(tmp_path):
    m = _small_llama()
    ids = [torch.randint(0, 64, (1, 8))]
    q = lowbit.quantize(m, "w8a8-static", calibration=ids)
    rep = export_compressed_tensors(q, tmp_path / "ct")
    assert {e.mapping for e in rep.entries} == {"weights exact"}  # the same int8 codes and scales
    assert all("weight-only" in e.why for e in rep.entries)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert all(g["input_activations"] is None for g in cfg["config_groups"].values())


def test_the_sources_tokenizer_is_written_unless_told_otherwise(smollm2, tmp_path):
    m = _small_llama()
    m.lowbit_source = "smollm2-135m"  # as the zoo's loader marks it: its tokenizer is the zoo's
    q = lowbit.quantize(m, "w4g32")
    rep = export_compressed_tensors(q, tmp_path / "ct")
    assert (tmp_path / "ct" / "tokenizer.json").is_file() and not rep.notes
    rep = export_compressed_tensors(q, tmp_path / "none", tokenizer=False)
    assert not (tmp_path / "none" / "tokenizer.json").exists()
    m2 = lowbit.quantize(_small_llama(), "w4g32")  # no source known: said in the notes
    rep = export_compressed_tensors(m2, tmp_path / "unknown")
    assert any("no tokenizer written" in n for n in rep.notes)


def test_nan_in_an_unquantized_tensor_is_refused(tmp_path):
    from lowbit.primitives import NonFiniteError

    q = lowbit.quantize(_small_llama(), "w4g32")
    with torch.no_grad():
        q.model.embed_tokens.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="embed_tokens.weight holds 1 NaN"):
        export_compressed_tensors(q, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_nan_scales_fifos_and_a_killed_runs_directory(tmp_path):
    import os

    from lowbit.primitives import NonFiniteError

    q = lowbit.quantize(_small_llama(), "w4g32")
    (tmp_path / ".ct.tmp-999999999-abc").mkdir()  # a killed export's (no such process)
    (tmp_path / ".ct.tmp-999999999-abc" / "model.safetensors").write_bytes(b"half")
    export_compressed_tensors(q, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(FileExistsError, match="is a file"):
        export_compressed_tensors(q, tmp_path / "pipe", overwrite=True)
    with torch.no_grad():
        q.model.layers[0].mlp.up_proj.qw.scale[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"up_proj scales holds 1 NaN"):
        export_compressed_tensors(q, tmp_path / "nan")
