"""ONNX export, verified by ONNX Runtime: each quantized layer's operator reads lowbit's codes
back bit for bit (an identity matrix as input gives the dequantized weight), and whole graphs
compute lowbit's outputs."""

import copy
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.io.onnx import ONNXExportError, export_onnx, onnx_mapping
from lowbit.scheme import parse_scheme

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _session(path, optimize=True):
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _u8s8_saturates() -> bool:
    """ONNX Runtime's fused x86 int8 kernels on a CPU without VNNI multiply u8 x s8 pairs with
    VPMADDUBSW, whose int16 pair sums saturate (its quantization docs: use reduce_range or U8U8
    there); numbers from a fused session then say more about that kernel than about the graph."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_vnni" not in flags and "avx_vnni" not in flags


def _ref(model, *xs):
    kernels.use_kernel(model, "reference")
    with torch.no_grad():
        out = model(*xs)
    kernels.use_kernel(model, "auto")
    return out


@pytest.mark.parametrize("spec", ["w4g32", "w4g64-asym", "w4g128", "w4", "w4-asym", "w8", "w8-asym", "w8g64",
                                  "w2g32", "w2g64-asym", "w3g64", "w3g32-asym", "w4g48", "w4g96-asym", "w4-tensor"])
def test_matmul_nbits_reads_lowbits_weights_bit_for_bit(spec, tmp_path):
    """K = 200: the last group (and block) is short for every group size here."""
    torch.manual_seed(0)
    q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(200, 24)), spec, progress=False)
    rep = export_onnx(q, tmp_path / "l.onnx", example_inputs=torch.zeros(2, 200))
    assert [(e.target, e.mapping) for e in rep.entries] == [("MatMulNBits", "exact")]
    nodes = [n.op_type for n in onnx.load(str(tmp_path / "l.onnx")).graph.node]
    assert "MatMulNBits" in nodes and "MatMul" not in nodes  # never a float weight in the graph
    y = _session(tmp_path / "l.onnx").run(None, {"input": np.eye(200, dtype=np.float32)})[0]
    want = q[0].qw.dequantize(torch.float32).t() + q[0].bias.detach()
    assert np.array_equal(y, want.numpy())


def test_hqq_fractional_zero_points_are_exact(tmp_path):
    torch.manual_seed(0)
    q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(128, 16, bias=False)), "w4g64-asym", method="hqq",
                        progress=False)  # fmt: skip
    assert q[0].qw.zero.dtype == torch.float16
    export_onnx(q, tmp_path / "h.onnx", example_inputs=torch.zeros(2, 128))
    y = _session(tmp_path / "h.onnx").run(None, {"input": np.eye(128, dtype=np.float32)})[0]
    assert np.array_equal(y, q[0].qw.dequantize(torch.float32).t().numpy())


def test_dynamic_activations_keep_exact_weights_and_say_who_rounds_the_activations(tmp_path):
    torch.manual_seed(0)
    q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(128, 16)), "w8a8", progress=False)
    rep = export_onnx(q, tmp_path / "a.onnx", example_inputs=torch.zeros(2, 128))
    assert [(e.target, e.mapping) for e in rep.entries] == [("MatMulNBits", "weights exact")]
    node = next(n for n in onnx.load(str(tmp_path / "a.onnx")).graph.node if n.op_type == "MatMulNBits")
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4
    x = torch.randn(5, 128)
    y = _session(tmp_path / "a.onnx").run(None, {"input": x.numpy()})[0]
    ref = _ref(q, x).numpy()
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()  # two int8 roundings of the activations


@pytest.mark.parametrize("spec,why", [("nf4g64", "nf4"), ("fp8", "fp8"), ("w4g8", "power-of-two block")])
def test_layers_without_an_operator_are_requantized_or_refused(spec, why, tmp_path):
    torch.manual_seed(0)
    q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(128, 16)), spec, progress=False)
    assert why in onnx_mapping(q[0].qw, "linear")[1]
    out = tmp_path / "r.onnx"
    with pytest.raises(ONNXExportError, match=r"^these layers .*: 0 \(" + spec):
        export_onnx(q, out, exact=True, example_inputs=torch.zeros(2, 128))
    assert list(tmp_path.iterdir()) == []
    rep = export_onnx(q, out, example_inputs=torch.zeros(2, 128))
    (e,) = rep.entries
    assert (e.target, e.mapping) == ("MatMulNBits (int8)", "requantized") and 0 < e.rel_rms_error < 0.02
    rep = export_onnx(q, out, requantize=None, example_inputs=torch.zeros(2, 128), overwrite=True)
    assert [(e.target, e.mapping) for e in rep.entries] == [("float32", "dequantized")]
    y = _session(out).run(None, {"input": np.eye(128, dtype=np.float32)})[0]
    assert np.array_equal(y, (q[0].qw.dequantize(torch.float32).t() + q[0].bias.detach()).numpy())


def test_bad_input_is_one_clear_error(tmp_path):
    q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), "w4g32", progress=False)
    with pytest.raises(ONNXExportError, match="give example_inputs"):
        export_onnx(q, tmp_path / "x.onnx")
    with pytest.raises(ONNXExportError, match="no MatMulNBits form"):
        export_onnx(q, tmp_path / "x.onnx", requantize="nf4g64", example_inputs=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="accuracy_level"):
        export_onnx(q, tmp_path / "x.onnx", accuracy_level=7, example_inputs=torch.zeros(2, 64))
    with pytest.raises(FileExistsError, match="is a directory"):
        export_onnx(q, tmp_path, example_inputs=torch.zeros(2, 64))
    (tmp_path / "x.onnx").write_text("mine")
    with pytest.raises(FileExistsError, match="exists; pass overwrite"):
        export_onnx(q, tmp_path / "x.onnx", example_inputs=torch.zeros(2, 64))
    assert (tmp_path / "x.onnx").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


def _tiny_llama(tie=True, hidden=64):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("emb", ["w4g32", "w3g32", "w2g32-asym", "w8g32"])
def test_decoder_graph_computes_lowbits_logits_with_one_copy_of_a_tied_embedding(tmp_path, emb):
    m = _tiny_llama()
    rec = lowbit.Recipe(parse_scheme("w4g32")).add("*embed_tokens", emb).add("lm_head", emb)
    q = lowbit.quantize(m, rec, progress=False)
    rep = export_onnx(q, tmp_path / "m.onnx")
    assert rep.counts() == {"GatherBlockQuantized exact": 1, "MatMulNBits exact": 14,
                            "MatMulNBits (tied to the embedding) exact": 1}  # fmt: skip
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    width = 64 if emb == "w8g32" else 32  # 2- and 3-bit codes are stored 4-bit
    big = [i for i in g.initializer if i.data_type == onnx.TensorProto.UINT8 and list(i.dims) in ([256, width], [256, 2, width // 2])]
    assert len(big) == 1  # the embedding's codes are stored once, the head reads them
    s = _session(tmp_path / "m.onnx")
    for ids in (torch.tensor([[5, 9, 200, 3, 77]]), torch.randint(0, 256, (3, 17))):  # dynamic batch and length
        ref = _ref(q, ids).logits
        y = s.run(None, {"input_ids": ids.numpy()})[0]
        assert np.abs(y - ref.numpy()).max() <= 1e-4 * float(ref.abs().max())


def test_encoder_graph_takes_the_attention_mask(tmp_path):
    import transformers

    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)  # fmt: skip
    torch.manual_seed(0)
    q = lowbit.quantize(transformers.BertModel(cfg).eval(), "w4g32", progress=False)
    export_onnx(q, tmp_path / "e.onnx")
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ref = _ref(q, ids, mask).last_hidden_state
    y = _session(tmp_path / "e.onnx").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(y - ref.numpy()).max() <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("spec", ["w8a8-static", "w8a8-tensor-static", "w8a8-asym-static", "int8"])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_qdq_rounds_activations_as_lowbit_does(spec, layer, tmp_path):
    """Inputs well outside the calibrated range: lowbit saturates at -127, so must the graph."""
    torch.manual_seed(0)
    if layer == "conv":
        m, shape = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1, groups=2)), (4, 8, 10, 10)
    else:
        m, shape = torch.nn.Sequential(torch.nn.Linear(64, 32)), (4, 64)
    cal = [torch.randn(*shape) for _ in range(2)]
    q = lowbit.quantize(m, spec, calibration=cal if "static" in spec else None, progress=False)
    rep = export_onnx(q, tmp_path / "q.onnx", example_inputs=torch.zeros(2, *shape[1:]))
    target = "QDQ" if "static" in spec else ("DequantizeLinear" if layer == "conv" else "MatMulNBits")
    assert [(e.target, e.mapping) for e in rep.entries] == [(target, "exact")]
    x = torch.randn(*shape) * 3
    ref = _ref(q, x).numpy()
    for optimize in (False, True):  # as written, and with ONNX Runtime's fused integer kernels
        y = _session(tmp_path / "q.onnx", optimize).run(None, {"input": x.numpy()})[0]
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.slow
def test_mobilenet_static_w8a8_layers_exact_and_model_agrees(tmp_path):
    """Every tenth QDQ convolution, fed the input lowbit's own forward gives it, computes lowbit's
    output (to float32 summation order); ONNX Runtime fuses the ReLU6 convolutions to QLinearConv. Whole-model logits cannot match to 1e-4: an activation
    rounding flipped by summation order moves the next layer's input a step, and that compounds
    (lowbit's own int8 kernels differ from its reference as much). So the graph must be as close
    to lowbit as lowbit's kernels are, and as far from FP32 as lowbit is."""
    from lowbit.evaluate.classification import confident_agreement
    from lowbit.evaluate.images import photo_crops
    from lowbit.models.zoo import load_model

    fp = load_model("mobilenet-v2").model.eval()
    cal = photo_crops(32, split="calib")
    q = lowbit.quantize(copy.deepcopy(fp), "w8a8-static", calibration=[cal[:16], cal[16:]], progress=False)
    ev = photo_crops(96, split="eval")
    rep = export_onnx(q, tmp_path / "mb.onnx", example_inputs=ev[:1])
    assert rep.counts() == {"QDQ exact": 53}
    assert _ort_ops(tmp_path / "mb.onnx", tmp_path)["QLinearConv"] >= 35  # every conv before a ReLU6
    ref = _ref(q, ev)
    with torch.no_grad():
        f, fast = fp(ev), q(ev)  # lowbit's int8 kernels
    # without VNNI, the graph as the ONNX spec defines it (DequantizeLinear -> Conv -> QuantizeLinear,
    # float32 sums) rather than ORT's saturating fused kernel; the fusion itself is counted above
    fused = not _u8s8_saturates()
    y = torch.from_numpy(_session(tmp_path / "mb.onnx", optimize=fused).run(None, {"input": ev.numpy()})[0])
    ours, theirs = confident_agreement(f, ref), confident_agreement(f, y)
    # ONNX Runtime runs the convolutions as QLinearConv: its int32 requantization flips an
    # intermediate rounding where lowbit's float32 sum lands near a half step; a couple of the ~50
    # confident crops may change with it, the KLs barely
    n = ours["confident"]
    assert round(theirs["agreement"] * n) >= round(ours["agreement"] * n) - 2
    # no further from FP32 than lowbit (per-crop KL, paired): within 10% plus two standard errors,
    # as a flipped rounding early in the network moves a crop's KL either way
    def kl(logits):
        return (f.log_softmax(-1).exp() * (f.log_softmax(-1) - logits.float().log_softmax(-1))).sum(-1)

    d = kl(y) - kl(ref)
    assert float(d.mean()) <= 0.1 * float(kl(ref).mean()) + 2 * float(d.std()) / len(d) ** 0.5
    assert confident_agreement(ref, y)["mean_kl"] <= 1.5 * confident_agreement(ref, fast)["mean_kl"]
    from lowbit.nn import QuantConv2d

    inputs = {}
    convs = [(n, m) for n, m in q.named_modules() if isinstance(m, QuantConv2d)][::10]
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, a[0][:2].clone())) for n, m in convs]
    _ref(q, ev[:2])
    for h in hooks:
        h.remove()
    for n, m in convs:
        one = torch.nn.Sequential(m)
        export_onnx(one, tmp_path / "c.onnx", example_inputs=inputs[n], overwrite=True)
        want = _ref(one, inputs[n]).numpy()
        got = _session(tmp_path / "c.onnx", optimize=fused).run(None, {"input": inputs[n].numpy()})[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), n


@pytest.mark.slow
def test_smollm2_graph_computes_lowbits_logits(smollm2, tmp_path):
    q = lowbit.quantize(copy.deepcopy(smollm2.model), "w4g64", progress=False)
    rep = export_onnx(q, tmp_path / "s.onnx")
    assert rep.counts() == {"MatMulNBits exact": 210}
    ids = torch.tensor([list(range(300, 364))])
    ref = _ref(q, ids).logits
    y = _session(tmp_path / "s.onnx").run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(y - ref.numpy()).max() <= 1e-4 * float(ref.abs().max())


def test_cli_exports_onnx(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "d.onnx"
    assert main(["export", "digits-cnn", "--scheme", "int8", "--to", "onnx", "-o", str(out), "--quiet"]) == 0
    assert "exported digits-cnn to onnx" in capsys.readouterr().out
    x = torch.rand(3, 1, 8, 8)
    assert _session(out).run(None, {"input": x.numpy()})[0].shape == (3, 10)
    assert main(["export", "digits-cnn", "--scheme", "int8", "--to", "onnx", "-o", str(tmp_path / "e.onnx"),
                 "--input-shape", "1,x"]) == 2  # fmt: skip
    assert "--input-shape takes positive integers" in capsys.readouterr().err


def test_many_refusals_are_summarized_by_scheme_and_reason(tmp_path):
    q = lowbit.quantize(torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)]), "nf4g32", progress=False)
    with pytest.raises(ONNXExportError) as e:
        export_onnx(q, tmp_path / "x.onnx", exact=True, example_inputs=torch.zeros(2, 64))
    assert str(e.value).endswith("0, 1, 2 and 3 more (nf4g32: nf4: no ONNX Runtime CPU operator reads this format)")


def test_a_half_precision_model_is_refused_until_made_float32(tmp_path):
    """ONNX Runtime's CPU kernels lack bfloat16 versions of most operators: a bf16 graph would not
    load. The model is refused with the fix named; after model.float() (codes unchanged) it runs."""
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    q = lowbit.quantize(m.to(torch.bfloat16), "w4g32", progress=False)
    with pytest.raises(ONNXExportError, match=r"computes in bfloat16.*call model\.float\(\) first"):
        export_onnx(q, tmp_path / "h.onnx", example_inputs=torch.zeros(2, 64, dtype=torch.bfloat16))
    assert not list(tmp_path.iterdir())
    export_onnx(q.float(), tmp_path / "h.onnx", example_inputs=torch.zeros(2, 64))
    x = torch.randn(3, 64)
    y = _session(tmp_path / "h.onnx").run(None, {"input": x.numpy()})[0]
    ref = _ref(q, x).numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_trace_failures_name_the_cause_and_stale_tensor_files_go(tmp_path):
    q = lowbit.quantize(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), "int8", progress=False)
    with pytest.raises(ONNXExportError, match=r"could not trace Sequential: .*to have 1 channels, but got 3"):
        export_onnx(q, tmp_path / "c.onnx", example_inputs=torch.zeros(1, 3, 8, 8))
    (tmp_path / "c.onnx.data").write_bytes(b"x" * 1000)  # an earlier big export's tensors
    with pytest.raises(FileExistsError, match=r"c\.onnx\.data exists"):
        export_onnx(q, tmp_path / "c.onnx", example_inputs=torch.zeros(1, 1, 8, 8))
    rep = export_onnx(q, tmp_path / "c.onnx", example_inputs=torch.zeros(1, 1, 8, 8), overwrite=True)
    assert not (tmp_path / "c.onnx.data").exists() and rep.nbytes == (tmp_path / "c.onnx").stat().st_size


def test_embedding_bytes_are_counted_once_and_task_heads_export_logits(tmp_path):
    import transformers

    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128, num_labels=3)  # fmt: skip
    m = transformers.BertForSequenceClassification(cfg).eval()
    q = lowbit.quantize(m, lowbit.Recipe(parse_scheme("w4g32")).add("*word_embeddings", "w4g32"), progress=False)
    rep = export_onnx(q, tmp_path / "b.onnx")
    (emb,) = [e for e in rep.entries if e.target == "GatherBlockQuantized"]
    assert emb.nbytes == 128 * 64 // 2 + 128 * 2 * 4  # codes + float32 scales
    s = _session(tmp_path / "b.onnx")
    assert [o.name for o in s.get_outputs()] == ["logits"]
    ids = torch.randint(0, 128, (2, 7))
    y = s.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 7), dtype=np.int64)})[0]
    assert y.shape == (2, 3)


@pytest.mark.parametrize("emb", ["w8", "w4g128"])
def test_a_per_channel_embedding_on_a_row_no_128_block_divides_stays_quantized_and_tied(tmp_path, emb):
    """A 96-wide row: the block is the largest power of two that divides it (32), so the
    embedding is GatherBlockQuantized and the head shares it, not a float32 copy."""
    q = lowbit.quantize(_tiny_llama(hidden=96), lowbit.Recipe(parse_scheme("w4g32")).add("*embed_tokens", emb)
                        .add("lm_head", emb), progress=False)  # fmt: skip
    rep = export_onnx(q, tmp_path / "m.onnx", exact=True)
    assert rep.counts() == {"GatherBlockQuantized exact": 1, "MatMulNBits exact": 14,
                            "MatMulNBits (tied to the embedding) exact": 1}  # fmt: skip
    ids = torch.randint(0, 256, (2, 9))
    ref = _ref(q, ids).logits
    y = _session(tmp_path / "m.onnx").run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(y - ref.numpy()).max() <= 1e-4 * float(ref.abs().max())


def test_accuracy_level_4_is_weights_exact_and_level_1_is_refused_for_dynamic_activations(tmp_path):
    torch.manual_seed(0)
    q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(128, 16)), "w4g32", progress=False)
    rep = export_onnx(q, tmp_path / "a.onnx", accuracy_level=4, example_inputs=torch.zeros(2, 128))
    assert [(e.target, e.mapping) for e in rep.entries] == [("MatMulNBits", "weights exact")]
    q8 = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(128, 16)), "w8a8", progress=False)
    with pytest.raises(ONNXExportError, match="dynamically to int8, which MatMulNBits does at accuracy_level 4"):
        export_onnx(q8, tmp_path / "b.onnx", accuracy_level=1, example_inputs=torch.zeros(2, 128))


def test_a_graph_onnx_runtime_cannot_load_is_an_error_not_a_file(tmp_path):
    """An example input of the wrong size traces (the MatMulNBits stand-in does not check K) but
    gives a graph ONNX Runtime refuses: the export checks it with ONNX Runtime before renaming."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 8))
    q = lowbit.quantize(net, lowbit.Recipe(parse_scheme("w4g16")).add("0", "int8"), progress=False)
    export_onnx(q, tmp_path / "ok.onnx", example_inputs=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ONNXExportError, match="ONNX Runtime rejects the exported graph.*example|input shape"):
        export_onnx(q, tmp_path / "bad.onnx", example_inputs=torch.zeros(1, 1, 16, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx"]


def test_cli_refuses_bad_options_before_loading_anything(tmp_path, capsys):
    from lowbit.cli import main

    (tmp_path / "adir").mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "lowbit.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"mine")
    cases = [
        (["digits-cnn", "--to", "onnx", "-o", str(tmp_path / "adir"), "--force"], "adir is a directory; --to onnx writes a file (e.g. "),
        (["digits-cnn", "--to", "onnx", "-o", str(tmp_path / "adir")], "adir is a directory"),
        (["digits-cnn", "--to", "onnx", "-o", str(tmp_path / "new") + "/"], "new/ names a directory"),
        (["digits-cnn", "--to", "onnx", "-o", ""], "-o is empty"),
        ([str(src), "--to", "onnx", "-o", str(src / "model.safetensors"), "--force"], "is part of the source model"),
        ([str(src), "--to", "compressed-tensors", "-o", str(src), "--force"], "is part of the source model"),
        (["digits-cnn", "--to", "onnx", "--scheme", "w4g32", "--recipe", "r.json", "-o", "x.onnx"], "at most one of --scheme or --recipe"),
        (["digits-cnn", "--to", "onnx", "--threads", "-3", "-o", "x.onnx"], "--threads takes a positive number"),
        (["digits-cnn", "--to", "onnx", "--exact", "--requantize", "w8", "-o", "x.onnx"], "give one of them"),
        (["digits-cnn", "--to", "onnx", "--method", "gptq", "-o", "x.onnx"], "--method applies when the export quantizes"),
        (["digits-cnn", "--to", "onnx", "--requantize", "Q8_0", "-o", "x.onnx"], "--requantize for onnx takes a lowbit scheme"),
        (["digits-cnn", "--to", "gguf", "--float-type", "q4_0", "-o", "x.gguf"], "--float-type is one of F32, F16, BF16, Q8_0, got 'Q4_0'"),
        ([str(tmp_path / "nosuchdir"), "--to", "onnx", "-o", "x.onnx"], "no such file or directory, and not a zoo model"),
    ]  # fmt: skip
    for argv, msg in cases:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)
    assert (src / "model.safetensors").read_bytes() == b"mine"


def test_sigterm_during_an_export_leaves_nothing_and_keeps_the_earlier_output(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import lowbit.io.onnx as lo
    from lowbit.cli import main

    out = tmp_path / "d.onnx"
    out.write_bytes(b"earlier")
    real = lo._check_runs

    def killed(graph, user_shape):  # SIGTERM while the graph sits in its temporary directory
        real(graph, user_shape)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(lo, "_check_runs", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["export", "digits-cnn", "--scheme", "w8", "--to", "onnx", "-o", str(out), "--force", "-q"]) == 143
    assert "interrupted: nothing was written" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]
    assert signal.getsignal(signal.SIGTERM) is before  # lowbit's handler is put back


def _ort_ops(path, tmp_path) -> dict:
    """Operator counts of the graph ONNX Runtime runs after its optimizations."""
    import collections

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("spec", ["w8a8-static", "w8a8-asym-static"])
@pytest.mark.parametrize("act", ["relu", "relu6", "none", "hardtanh", "relu-maxpool", "leaky", "zero-channel",
                                 "tiny-channel"])  # fmt: skip
def test_static_conv_output_rounded_for_qlinearconv(spec, act, tmp_path):
    """A static conv whose output reaches the next layer's quantizer through operators that commute
    with rounding (max, min, data movement) gets that quantizer on its own output, so ONNX Runtime
    runs it as QLinearConv (int8 out), and the graph still computes lowbit's values (as written: to
    float32 summation order). LeakyReLU does not commute: left float. A channel of zero weights, or
    one whose bias would overflow ONNX Runtime's int32 bias steps, must not break the fused run."""
    torch.manual_seed(0)
    acts = {"relu": torch.nn.ReLU(), "relu6": torch.nn.ReLU6(), "hardtanh": torch.nn.Hardtanh(-0.3, 5.0),
            "relu-maxpool": torch.nn.Sequential(torch.nn.ReLU(), torch.nn.MaxPool2d(2)),
            "leaky": torch.nn.LeakyReLU(0.1)}  # fmt: skip
    m = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), acts.get(act, torch.nn.Identity()),
                            torch.nn.Conv2d(16, 8, 3, padding=1, groups=2))  # fmt: skip
    with torch.no_grad():
        if act == "zero-channel":
            m[0].weight[3] = 0
            m[0].bias[3] = 0.5
        if act == "tiny-channel":  # bias / (input scale x weight scale) beyond int32
            m[0].weight[3] *= 1e-7
            m[0].bias[3] = 0.5
    shape = (4, 8, 10, 10)
    cal = [torch.randn(*shape) * 4 for _ in range(2)]
    q = lowbit.quantize(m, spec, calibration=cal, progress=False)
    export_onnx(q, tmp_path / "q.onnx", example_inputs=torch.zeros(2, *shape[1:]))
    written = [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node]
    fused = act not in ("leaky", "tiny-channel")
    assert written.count("QuantizeLinear") == (3 if fused else 2)
    if fused:
        assert _ort_ops(tmp_path / "q.onnx", tmp_path)["QLinearConv"] >= 1
    if act in ("relu", "relu6"):  # the -127-step clamp after a ReLU is an identity, dropped
        assert written.count("Clip") == (1 if act == "relu" else 2)
    x = torch.randn(*shape) * 12  # well outside the calibrated range: saturation on both sides
    ref = _ref(q, x).numpy()
    # as written, and fused (ONNX Runtime requantizing the int32 sums itself): lowbit's values,
    # except where a sum lands within float32 error of a half step of the second layer's input
    # and rounds the other way (the outputs it reaches move by that one step's contribution). The
    # fused run only where ORT's int8 kernel does not saturate (_u8s8_saturates: no VNNI on x86)
    for optimize in (False,) if _u8s8_saturates() else (False, True):
        y = _session(tmp_path / "q.onnx", optimize).run(None, {"input": x.numpy()})[0]
        err = np.abs(y - ref) / np.abs(ref).max()
        assert err.max() <= 5e-3 and err.mean() <= 1e-4, (optimize, err.max(), err.mean())
