"""GGUF export (lowbit.io.gguf): llama.cpp's own block formulas read back lowbit's weights bit for
bit where the mapping is exact, and llama.cpp runs the file with logits close to lowbit's."""

import copy

import numpy as np
import pytest
import torch

import lowbit
from lowbit.io.gguf import GGUFExportError, dequantized_tensors, encode_gguf_weight, export_gguf, gguf_mapping
from lowbit.qweight import QWeight
from lowbit.scheme import parse_scheme

gguf = pytest.importorskip("gguf")


def _qw(spec: str, n: int = 48, k: int = 256, seed: int = 0, outliers: bool = True) -> QWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if outliers:
        w[::7, ::13] *= 9  # groups whose largest value is positive (code 0) and negative
    return QWeight.from_float(w, parse_scheme(spec))


@pytest.mark.parametrize("spec,gtype", [("w4g32", "Q4_0"), ("w4g64", "Q4_0"), ("w4g128", "Q4_0"), ("w4", "Q4_0"),
                                        ("w4-tensor", "Q4_0"), ("w3g64", "Q4_0"), ("w2g32", "Q4_0"),
                                        ("int8", "Q8_0"), ("w8g32", "Q8_0")])  # fmt: skip
def test_exact_mappings_read_back_bit_for_bit_by_ggufs_dequantizer(spec, gtype):
    qw = _qw(spec)
    assert gguf_mapping(qw) == (gtype, "")
    data, _ = encode_gguf_weight(qw, gtype)
    t = gguf.GGMLQuantizationType[gtype]
    assert data.shape == (qw.rows, qw.cols // 32 * gguf.GGML_QUANT_SIZES[t][1])
    back = torch.from_numpy(gguf.dequantize(data, t).astype(np.float32)).reshape(qw.rows, qw.cols)
    assert torch.equal(back, qw.dequantize(torch.float32))


def test_int8_codes_at_minus_128_are_kept():
    """lowbit's int8 quantizer stays in -127..127, but a stored code 0 (q - 128 = -128, e.g. from
    a file another tool wrote) is a valid Q8_0 value and must come through."""
    from lowbit.primitives import QParams

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (16, 64), generator=g, dtype=torch.uint8)
    codes[:, 0] = 0
    scale = (torch.rand(16, 1, generator=g) * 0.01 + 1e-3).half()
    qw = QWeight.from_codes((16, 64), parse_scheme("int8"), codes, QParams(scale.float(), None))
    data, _ = encode_gguf_weight(qw, "Q8_0")
    back = gguf.dequantize(data, gguf.GGMLQuantizationType.Q8_0).reshape(qw.rows, qw.cols)
    assert np.array_equal(back, qw.dequantize(torch.float32).numpy()) and float(back[:, 0].min()) < 0


@pytest.mark.parametrize("spec", ["w4g64-asym", "w3g64-asym", "w2g32-asym", "w4g32-asym"])
def test_asymmetric_q4_1_is_off_by_at_most_half_a_float16_ulp_of_the_offset(spec):
    qw = _qw(spec)
    data, info = encode_gguf_weight(qw, "Q4_1")
    back = torch.from_numpy(gguf.dequantize(data, gguf.GGMLQuantizationType.Q4_1).astype(np.float32))
    ref = qw.dequantize(torch.float32)
    err = (back.reshape(ref.shape) - ref).abs()
    # bound per block: half an ulp of |s * z| in float16 (2^-11 relative), plus float32 rounding of d*q+m
    s = qw.scales().repeat_interleave(qw.scheme.group_size, dim=1)[:, : qw.cols]
    z = qw.zero_points().repeat_interleave(qw.scheme.group_size, dim=1)[:, : qw.cols]
    bound = (s * z).abs() * 2.0**-11 + ref.abs() * 2.0**-23 + 1e-12
    assert bool((err <= bound).all())
    assert float(err.max()) <= info["max_abs_error"] * (1 + 1e-6) + float(ref.abs().max()) * 2.0**-23
    assert 0.0 < info["exact_blocks"] <= 1.0


@pytest.mark.parametrize("spec,why", [("w4g16", "group size 16"), ("w8g64-asym", "asymmetric int8"),
                                      ("nf4g64", "nf4"), ("fp8", "fp8")])  # fmt: skip
def test_weights_without_an_exact_type_say_why(spec, why):
    gtype, reason = gguf_mapping(_qw(spec))
    assert gtype is None and why in reason


def test_an_input_width_that_is_not_whole_blocks_has_no_exact_type():
    assert "not a multiple of 32" in gguf_mapping(_qw("w4g64", k=200))[1]


# ---- SmolLM2 ------------------------------------------------------------------------------------
def _recipe(base: str, embed: str | None = None, one_layer: str | None = None):
    r = lowbit.Recipe(parse_scheme(base))
    if embed:  # the embedding and the head it is tied to, in one scheme: they stay one tensor
        r = r.add("*embed_tokens", embed).add("lm_head", embed)
    if one_layer:
        r = r.add("model.layers.3.mlp.down_proj", one_layer)
    return r


@pytest.fixture(scope="module")
def q4(smollm2):
    return lowbit.quantize(copy.deepcopy(smollm2.model), _recipe("w4g64", embed="w8g32"))


def _lowbit_weights(model) -> dict[str, torch.Tensor]:
    from lowbit.nn import QuantModule

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantModule):
            out[name] = mod.qw.dequantize(torch.float32).reshape(mod.weight_shape[0], -1)
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            out[name] = mod.weight.detach().float()
    return out


@pytest.mark.slow
def test_smollm2_export_reads_back_exactly_and_keeps_the_tokenizer(q4, smollm2, tmp_path):
    path = tmp_path / "m.gguf"
    rep = export_gguf(q4, path)
    assert rep.nbytes == path.stat().st_size
    assert {t.mapping for t in rep.entries} == {"exact", "float"}
    assert {t.target for t in rep.entries if t.mapping == "exact"} == {"Q4_0", "Q8_0"}
    cfg = q4.config
    got = dequantized_tensors(path, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert "output.weight" not in got  # tied: llama.cpp uses token_embd
    ref = _lowbit_weights(q4)
    assert torch.equal(got["token_embd.weight"], ref["model.embed_tokens"])
    for i in (0, 17, 29):
        for ours, theirs in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                             ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                             ("mlp.down_proj", "ffn_down")):  # fmt: skip
            assert torch.equal(got[f"blk.{i}.{theirs}.weight"], ref[f"model.layers.{i}.{ours}"]), (i, ours)
    r = gguf.GGUFReader(str(path))
    src = gguf.GGUFReader(str(rep.tokenizer_from))
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.eos_token_id"):
        assert r.fields[key].contents() == src.fields[key].contents()
    assert len(r.fields["tokenizer.ggml.tokens"].data) == cfg.vocab_size


@pytest.mark.slow
def test_transformers_reads_the_export_as_lowbits_model(q4, smollm2, tmp_path):
    """transformers' GGUF loader (gguf.dequantize, q/k un-permuted) rebuilds lowbit's weights: its
    logits equal lowbit's reference forward."""
    import transformers

    from lowbit import kernels

    path = tmp_path / "m.gguf"
    export_gguf(q4, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([list(range(200, 264))])
    with torch.no_grad():
        kernels.use_kernel(q4, "reference")
        ref = q4(input_ids=ids).logits
        kernels.use_kernel(q4, "auto")
        theirs = hf(input_ids=ids).logits
    assert float((theirs - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.slow
def test_layers_without_an_exact_type_are_requantized_with_the_error_reported_or_refused(smollm2, tmp_path):
    m = lowbit.quantize(copy.deepcopy(smollm2.model), _recipe("w4g64", one_layer="w4g16"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"earlier file")
    with pytest.raises(GGUFExportError, match=r"model\.layers\.3\.mlp\.down_proj \(w4g16: group size 16"):
        export_gguf(m, path, exact=True, overwrite=True)
    assert path.read_bytes() == b"earlier file"  # nothing written
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gguf(m, path)
    assert path.read_bytes() == b"earlier file"
    rep = export_gguf(m, path, requantize="Q8_0", overwrite=True)
    req = [t for t in rep.entries if t.mapping == "requantized"]
    assert [t.source for t in req] == ["model.layers.3.mlp.down_proj"] and req[0].target == "Q8_0"
    assert 0 < req[0].rel_rms_error < 0.01  # Q8_0 of a 4-bit weight: about 1/256 of its range
    rep4 = export_gguf(m, path, requantize="Q4_0", overwrite=True)
    assert [t for t in rep4.entries if t.mapping == "requantized"][0].rel_rms_error > req[0].rel_rms_error


def test_other_architectures_and_bad_options_are_one_clear_error(toy, tmp_path):
    with pytest.raises(GGUFExportError, match="Llama-family decoders .* this model is Toy"):
        export_gguf(lowbit.quantize(toy, "w4g32"), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match=r"requantize \(CLI --requantize\) must be one of"):
        export_gguf(toy, tmp_path / "x.gguf", requantize="Q4_K")
    assert not any(tmp_path.iterdir())


def test_a_bad_tokenizer_gguf_is_named_and_nothing_is_created(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    m = lowbit.quantize(transformers.LlamaForCausalLM(cfg).eval(), "w4g32")
    out = tmp_path / "new" / "dir" / "x.gguf"
    with pytest.raises(GGUFExportError, match=r"tokenizer GGUF .*missing\.gguf: no such file"):
        export_gguf(m, out, tokenizer_gguf=tmp_path / "missing.gguf")
    (tmp_path / "notes.gguf").write_text("not a gguf at all")
    with pytest.raises(GGUFExportError, match=r"notes\.gguf is not a readable GGUF file"):
        export_gguf(m, out, tokenizer_gguf=tmp_path / "notes.gguf")
    assert not (tmp_path / "new").exists()  # no directories left behind either


# ---- llama.cpp runs it ----------------------------------------------------------------------------
def _softmax_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over positions, from logits (float64)."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.slow
def test_llama_cpp_runs_the_export_close_to_lowbit(q4, smollm2, tmp_path):
    """llama.cpp (8-bit activations inside its dot products) on the same token ids: the KL between
    its logits and lowbit's is at most 10% of the KL that lowbit's quantization causes."""
    import llama_cpp  # `make setup` builds it: a verification that cannot be skipped silently
    path = tmp_path / "m.gguf"
    export_gguf(q4, path)
    from lowbit.evaluate.domains import available_domains, domain_token_ids

    domain = "handbook" if "handbook" in available_domains() else available_domains()[0]
    ids = domain_token_ids(smollm2.tokenizer, domain, "eval", max_tokens=128).reshape(1, -1)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)  # fmt: skip
    llm.eval(ids[0].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[: ids.shape[1]], dtype=np.float32))
    with torch.no_grad():
        ours = q4(input_ids=ids).logits[0]
        fp32 = smollm2.model(input_ids=ids).logits[0]
    kl_export = _softmax_kl(ours, theirs)
    kl_quant = _softmax_kl(fp32, ours)
    assert kl_export <= 0.1 * kl_quant, (kl_export, kl_quant)
    assert float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()) >= 0.95


@pytest.mark.slow
def test_cli_exports_a_saved_model_and_a_zoo_model_quantized_first(q4, smollm2, tmp_path, capsys):
    from lowbit.cli import main

    lowbit.save(q4, tmp_path / "q4", tokenizer=smollm2.tokenizer, source="smollm2-135m")
    assert main(["export", str(tmp_path / "q4"), "--to", "gguf", "-o", str(tmp_path / "a.gguf")]) == 0
    out = capsys.readouterr().out
    assert "exported" in out and "Q4_0 exact" in out and "Q8_0 exact" in out
    assert main(["export", str(tmp_path / "q4"), "--to", "gguf", "-o", str(tmp_path / "a.gguf")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    cfg = q4.config
    assert dequantized_tensors(tmp_path / "a.gguf", cfg.num_attention_heads, cfg.num_key_value_heads).keys() >= {
        "token_embd.weight", "blk.29.ffn_down.weight"}
    assert main(["export", "smollm2-135m", "--scheme", "w4g64-asym", "--to", "gguf", "-o", str(tmp_path / "b.gguf"),
                 "--quiet"]) == 0  # fmt: skip
    assert "Q4_1" in capsys.readouterr().out
    assert main(["export", "smollm2-135m", "--scheme", "w4g16", "--to", "gguf", "--exact", "-o",
                 str(tmp_path / "c.gguf"), "--quiet"]) == 2  # fmt: skip
    assert "no exact GGUF type" in capsys.readouterr().err and not (tmp_path / "c.gguf").exists()


def test_a_q4_1_offset_beyond_float16_has_no_exact_type():
    g = torch.Generator().manual_seed(5)
    qw = QWeight.from_float(torch.randn(8, 64, generator=g) * 3e4 - 4e4, parse_scheme("w4g64-asym"))
    assert qw.scale.dtype == torch.float16  # the scales fit; s * z does not
    assert gguf_mapping(qw) == (None, "its Q4_1 offset -s*z overflows float16")


@pytest.mark.parametrize("spec,gtype", [("fp16", "F16"), ("bf16", "BF16")])
def test_half_precision_weights_are_written_as_stored(spec, gtype):
    qw = _qw(spec, k=200)  # no block constraint on the width
    assert gguf_mapping(qw) == (gtype, "")
    data, _ = encode_gguf_weight(qw, gtype)
    back = np.asarray(gguf.dequantize(data, gguf.GGMLQuantizationType[gtype]), dtype=np.float32).reshape(qw.rows, qw.cols)
    assert np.array_equal(back, qw.dequantize(torch.float32).numpy())


def test_half_precision_layers_reach_the_file_exactly(tmp_path):
    import transformers

    from lowbit.models.zoo import smollm2_gguf_path

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    rec = lowbit.Recipe(parse_scheme("w4g32")).add("model.layers.1.self_attn.q_proj", "bf16").add("model.layers.2.mlp.up_proj", "fp16")
    m = lowbit.quantize(transformers.LlamaForCausalLM(cfg).eval(), rec)
    rep = export_gguf(m, tmp_path / "h.gguf", exact=True, tokenizer_gguf=smollm2_gguf_path())
    got = {t.source: (t.target, t.mapping) for t in rep.entries}
    assert got["model.layers.1.self_attn.q_proj"] == ("BF16", "exact")
    assert got["model.layers.2.mlp.up_proj"] == ("F16", "exact")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "h.gguf")).tensors}
    up = tensors["blk.2.ffn_up.weight"]
    qw = m.model.layers[2].mlp.up_proj.qw
    back = np.asarray(gguf.dequantize(up.data, up.tensor_type), dtype=np.float32).reshape(qw.shape)
    assert np.array_equal(back, qw.dequantize(torch.float32).numpy())
    assert tensors["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16


# ---- llama.cpp's own quantizer (llama_quantize=) ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    """A Llama with rows of 256 (K-quants' super-block) and SmolLM2's vocabulary (its tokenizer)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tok_gguf():
    from lowbit.models.zoo import smollm2_gguf_path

    return smollm2_gguf_path()


def test_importance_matrix_is_the_mean_square_of_each_input_column(tiny_llama):
    from lowbit.io.gguf import importance_matrix

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 49152, (2, 16), generator=g), torch.randint(0, 49152, (1, 24), generator=g)]
    seen = []
    h = tiny_llama.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 512)))
    imp = importance_matrix(tiny_llama, batches)
    h.remove()
    x = torch.cat(seen).double()
    assert x.shape[0] == 2 * 16 + 24
    assert torch.allclose(imp["model.layers.1.mlp.down_proj"].double(), x.square().mean(0), rtol=1e-5)
    assert set(imp) == {n for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)}


def test_llama_quantize_writes_llama_cpps_k_quant_mix_and_reports_each_error(tiny_llama, tmp_path):
    import llama_cpp  # built by `make setup`: the runtime check is not skipped silently

    rep = export_gguf(tiny_llama, tmp_path / "k.gguf", llama_quantize="Q4_K_M", tokenizer_gguf=_tok_gguf())
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors}
    assert {e.name: e.target for e in rep.entries} == {n: t.tensor_type.name for n, t in tensors.items()}
    kinds = {e.target for e in rep.entries}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds  # Q4_K_M: Q4_K, with Q6_K for half the ffn_down / attn_v
    ref = dict(tiny_llama.named_parameters())
    down = tensors["blk.0.ffn_down.weight"]
    back = np.asarray(gguf.dequantize(down.data, down.tensor_type), dtype=np.float32).reshape(256, 512)
    entry = next(e for e in rep.entries if e.name == "blk.0.ffn_down.weight")
    w = ref["model.layers.0.mlp.down_proj.weight"].detach().numpy()
    assert entry.source == "model.layers.0.mlp.down_proj.weight" and entry.mapping == "requantized"
    assert entry.rel_rms_error == pytest.approx(float(np.sqrt(((back - w) ** 2).mean() / (w**2).mean())), rel=1e-6)
    assert all(0 < e.rel_rms_error < 0.2 for e in rep.entries if e.target != "F32")
    assert rep.nbytes == (tmp_path / "k.gguf").stat().st_size and not list(tmp_path.glob(".*"))  # no temporaries
    llm = llama_cpp.Llama(model_path=str(tmp_path / "k.gguf"), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ids = list(range(100, 132))
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        ours = tiny_llama(input_ids=torch.tensor([ids])).logits[0]
    assert float(torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1]) > 0.95


def test_an_importance_matrix_steers_llama_cpps_rounding(tiny_llama, tmp_path):
    """Columns given a large importance come out of llama.cpp's quantizer with less error than
    without it: the matrix reaches the quantizer."""
    from lowbit.io.gguf import importance_matrix

    imp = importance_matrix(tiny_llama, [torch.arange(64).reshape(1, 64)])
    imp["model.layers.0.self_attn.o_proj"] = torch.ones(256)
    imp["model.layers.0.self_attn.o_proj"][:16] = 1e4
    errs = []
    for i, importance in enumerate((None, imp)):
        export_gguf(tiny_llama, tmp_path / f"{i}.gguf", llama_quantize="Q4_K_S", importance=importance,
                    tokenizer_gguf=_tok_gguf())  # fmt: skip
        t = next(t for t in gguf.GGUFReader(str(tmp_path / f"{i}.gguf")).tensors if t.name == "blk.0.attn_output.weight")
        back = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(256, 256)
        w = tiny_llama.model.layers[0].self_attn.o_proj.weight.detach().numpy()
        errs.append(float(((back - w)[:, :16] ** 2).mean()))
    assert errs[1] < 0.9 * errs[0], errs  # deterministic: equal errors would mean the matrix was ignored


def test_llama_quantize_refusals_are_one_clear_error_and_leave_nothing(tiny_llama, tmp_path):
    path = tmp_path / "x.gguf"
    with pytest.raises(GGUFExportError, match="requires an imatrix"):
        export_gguf(tiny_llama, path, llama_quantize="IQ2_XS", tokenizer_gguf=_tok_gguf())
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="llama.cpp file type"):
        export_gguf(tiny_llama, path, llama_quantize="Q4_K_X", tokenizer_gguf=_tok_gguf())
    with pytest.raises(ValueError, match="applies with llama_quantize"):
        export_gguf(tiny_llama, path, importance={}, tokenizer_gguf=_tok_gguf())
    with pytest.raises(GGUFExportError, match="NaN"):
        export_gguf(tiny_llama, path, llama_quantize="Q4_K_M", tokenizer_gguf=_tok_gguf(),
                    importance={"model.layers.0.mlp.up_proj": torch.full((256,), float("nan"))})  # fmt: skip
    q = lowbit.quantize(copy.deepcopy(tiny_llama), "w4g32")
    with pytest.raises(GGUFExportError, match="quantized by lowbit"):
        export_gguf(q, path, llama_quantize="Q4_K_M", tokenizer_gguf=_tok_gguf())
    assert not list(tmp_path.iterdir())


def test_cli_llama_quantize(tiny_llama, tmp_path, capsys):
    from lowbit.cli import main

    tiny_llama.save_pretrained(tmp_path / "src")
    out = str(tmp_path / "k.gguf")
    # GGUF type names as llama.cpp spells them, in any case
    assert main(["export", str(tmp_path / "src"), "--to", "gguf", "--llama-quantize", "q4_k_m", "--no-imatrix",
                 "--tokenizer-gguf", str(_tok_gguf()), "-o", out]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "12 Q4_K requantized" in text and "-> Q4_K by llama.cpp, added error" in text
    assert main(["export", str(tmp_path / "src"), "--to", "gguf", "--llama-quantize", "Q4_K_M", "--scheme", "w4g32",
                 "-o", str(tmp_path / "b.gguf")]) == 2  # fmt: skip
    assert "drop --scheme" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "src"), "--to", "onnx", "--llama-quantize", "Q4_K_M", "-o", str(tmp_path / "b.onnx")]) == 2
    assert main(["export", str(tmp_path / "src"), "--to", "gguf", "--no-imatrix", "-o", str(tmp_path / "b.gguf")]) == 2
    assert "applies with --llama-quantize" in capsys.readouterr().err
    assert not (tmp_path / "b.gguf").exists()


# ---- what a float16 block scale, Q4_1's offset and NaN cannot hold ---------------------------------
def test_a_layer_float16_scales_cannot_hold_goes_out_f32_not_zeroed(tiny_llama, tmp_path):
    """Weights so small that lowbit keeps float32 scales underflow Q8_0's float16 block scale
    (requantized, the layer would be zeros): the layer is written F32 (lowbit's exact values),
    saying why. The file type names what most quantized weights are (Q4_0), and general.name is
    the source's name, not a path."""
    m = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(1e-7)
    lowbit.quantize(m, "w4g32")
    qw = m.model.layers[1].mlp.down_proj.qw
    assert qw.scale.dtype == torch.float32
    m.lowbit_source = str(tmp_path / "some" / "model-dir")
    rep = export_gguf(m, tmp_path / "m.gguf", tokenizer_gguf=_tok_gguf())
    (e,) = [e for e in rep.entries if e.source == "model.layers.1.mlp.down_proj"]
    assert (e.target, e.mapping) == ("F32", "exact") and "float16 scales cannot hold" in e.why
    back = dequantized_tensors(tmp_path / "m.gguf", 4, 2)["blk.1.ffn_down.weight"]
    assert torch.equal(back, qw.dequantize(torch.float32))
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert fields["general.name"].contents() == "model-dir"
    # a weight of ordinary size is requantized as asked, with no fallback
    rep = export_gguf(lowbit.quantize(copy.deepcopy(tiny_llama), "nf4g64"), tmp_path / "n.gguf", tokenizer_gguf=_tok_gguf())
    assert {(e.target, e.mapping, e.why.count("F32")) for e in rep.entries if e.scheme != "-"} == {("Q8_0", "requantized", 0)}


def test_exact_refuses_q4_1_layers_whose_zero_point_rounds(tiny_llama, tmp_path):
    q = lowbit.quantize(copy.deepcopy(tiny_llama), "w4g32-asym")
    with pytest.raises(GGUFExportError, match=r"Q4_1 holds the offset -s\*z in float16"):
        export_gguf(q, tmp_path / "a.gguf", exact=True, tokenizer_gguf=_tok_gguf())
    assert not (tmp_path / "a.gguf").exists()
    rep = export_gguf(q, tmp_path / "a.gguf", tokenizer_gguf=_tok_gguf())
    assert {e.mapping for e in rep.entries if e.scheme != "-"} == {"zero point rounded"}


def test_nan_in_an_unquantized_tensor_is_refused(tiny_llama, tmp_path):
    from lowbit.primitives import NonFiniteError

    q = lowbit.quantize(copy.deepcopy(tiny_llama), "w4g32")
    with torch.no_grad():
        q.model.norm.weight[7] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model\.norm\.weight holds 1 NaN or Inf"):
        export_gguf(q, tmp_path / "x.gguf", tokenizer_gguf=_tok_gguf())
    assert list(tmp_path.iterdir()) == []


def test_a_killed_exports_temporary_file_is_removed_by_the_next(tiny_llama, tmp_path):
    stale = tmp_path / ".m.gguf.tmp-999999999"  # no such process
    stale.write_bytes(b"half a model")
    live = tmp_path / f".m.gguf.tmp-{__import__('os').getppid()}"  # a running process's: kept
    live.write_bytes(b"being written")
    export_gguf(tiny_llama, tmp_path / "m.gguf", tokenizer_gguf=_tok_gguf())
    assert not stale.exists() and live.exists()


def test_nan_scales_and_special_files_are_refused(tiny_llama, tmp_path):
    import os

    from lowbit.primitives import NonFiniteError

    q = lowbit.quantize(copy.deepcopy(tiny_llama), "w4g32")
    os.mkfifo(tmp_path / "pipe")  # like /dev/null: never replaced by a regular file, even with overwrite
    with pytest.raises(FileExistsError, match="not a regular file"):
        export_gguf(q, tmp_path / "pipe", overwrite=True, tokenizer_gguf=_tok_gguf())
    with torch.no_grad():
        q.model.layers[1].mlp.up_proj.qw.scale[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj scales holds 1 NaN"):
        export_gguf(q, tmp_path / "x.gguf", tokenizer_gguf=_tok_gguf())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
