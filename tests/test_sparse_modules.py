"""Pruned layers end to end: the pruning methods through lowbit.quantize, modules that run the dense
codes and store only the kept ones, byte-exact sizes, save/load (format version 3), inspect, and
one clear error per kind of bad input with the model unchanged."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.algorithms.pruning import PruningError
from lowbit.driver import QuantizeError
from lowbit.io import LowbitFormatError
from lowbit.nn import QuantModule
from lowbit.sparse import SparseWeight, unpack_mask

from .conftest import Toy
from .forge import resign


def _mlp(k: int = 128) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(k, 192), nn.GELU(), nn.Linear(192, 64)).eval()


def _correlated(k: int = 128, n: int = 8, seed: int = 1) -> list[torch.Tensor]:
    """Inputs with a few strong and correlated features, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    gain = torch.ones(k)
    gain[:: 16] = 8.0
    return [(torch.randn(64, k, generator=g) @ mix) * gain for _ in range(n)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("scheme,pattern", [("w4g64", {"nm": "2:4"}), ("w4g64-asym", {"sparsity": 0.5}),
                                            ("int8", {"sparsity": 0.7}), ("w3g32", {"nm": "1:4"}),
                                            ("nf4g64", {"sparsity": 0.5})])  # fmt: skip
def test_pruned_layers_run_their_stored_weight_and_count_it_exactly(tmp_path, method, scheme, pattern):
    if method == "sparsegpt" and scheme == "nf4g64":
        pytest.skip("nf4 with sparsegpt is covered by the algorithm tests")
    m, x = _mlp(), _correlated()
    q = lowbit.quantize(copy.deepcopy(m), scheme, method=method, calibration=x, **pattern)
    for layer in (q[0], q[2]):
        assert isinstance(layer, QuantModule) and layer.mask is not None
        mask = unpack_mask(layer.mask, layer.in_features)
        w = layer.qw.dequantize()
        assert not bool(w[~mask].any())  # removed weights are exactly zero in what runs
        counts = mask.sum(1)
        assert bool((counts == counts[0]).all())
        if "nm" in pattern:
            n, mm = map(int, pattern["nm"].split(":"))
            assert bool((mask.reshape(mask.shape[0], -1, mm).sum(-1) == n).all())
        else:
            assert abs(layer.sparsity - pattern["sparsity"]) <= 8 / 64 / 2 + 1e-9  # a group keeps a multiple of 8
        with torch.no_grad():
            xin = torch.randn(5, layer.in_features)
            assert torch.allclose(layer(xin), xin @ w.t() + layer.bias, atol=1e-4, rtol=1e-4)
    # size_of counts what the file stores: mask + kept codes + scales (+ zero points)
    out = lowbit.save(q, tmp_path / "q")
    stored = load_file(str(out / "model.safetensors"))
    assert lowbit.size_of(q).total_bytes == sum(t.numel() * t.element_size() for t in stored.values())
    assert stored["0.mask"].shape == (192, 16) and stored["0.mask"].dtype == torch.uint8
    dense = lowbit.quantize(copy.deepcopy(m), scheme)
    assert lowbit.size_of(q).quantized_bytes < lowbit.size_of(dense).quantized_bytes
    assert json.loads((out / "lowbit.json").read_text())["format_version"] == 3
    back = lowbit.load(out, model=_mlp())
    with torch.no_grad():
        assert torch.equal(back(x[0]), q(x[0]))
    assert back[0].sparsity == q[0].sparsity and back[0].method == method


def test_sparsegpt_and_wanda_beat_magnitude_on_the_layer_output():
    """On inputs with strong features, using the data must pay (SparseGPT's and Wanda's papers)."""
    m, x = _mlp(), _correlated()
    ref = torch.cat([m[0](b) for b in x])
    err = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        q = lowbit.quantize(copy.deepcopy(m), "w8", method=method, calibration=x, nm="2:4")
        with torch.no_grad():
            out = torch.cat([q[0](b) for b in x])
        err[method] = float((out - ref.detach()).norm() / ref.detach().norm())
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_kernels_agree_with_the_reference_on_a_pruned_layer(isa):
    m, x = _mlp(), _correlated()
    q = lowbit.quantize(copy.deepcopy(m), "w4g64", method="magnitude", nm="2:4")
    ref = copy.deepcopy(q)
    lowbit.kernels.use_kernel(ref, "reference")
    with torch.no_grad():
        assert q[0].kernel != "reference"
        assert torch.allclose(q(x[0]), ref(x[0]), atol=1e-3, rtol=1e-3)


def test_dense_files_stay_version_2_and_inspect_shows_the_pruning(tmp_path, capsys):
    from lowbit.cli import main

    m = _mlp()
    lowbit.save(lowbit.quantize(copy.deepcopy(m), "w4g64"), tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "lowbit.json").read_text())["format_version"] == 2
    r = lowbit.Recipe.from_scheme("w4g64")
    q = lowbit.quantize(copy.deepcopy(m), r, method="magnitude", sparsity=0.5)
    assert "sparsity=0.5" in repr(q[0])
    sizes = {s.name: s for s in lowbit.size_of(q).layers}
    assert sizes["0"].sparsity == 0.5 and sizes["0"].bits_per_weight == 1 + 2 + 16 / 64
    out_dir = str(tmp_path / "digits")
    assert main(["quantize", "digits-cnn", "--scheme", "w4g16", "--method", "magnitude", "--sparsity", "0.5",
                 "-o", out_dir, "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["inspect", out_dir]) == 0
    out = capsys.readouterr().out
    assert "w4g16 (50% pruned)" in out and "format_version 3" in out and "fc1" in out


def test_embeddings_and_convolutions_prune_too(tmp_path):
    torch.manual_seed(0)
    model = Toy().eval()
    r = lowbit.Recipe(default=None).add("emb", "w8").add("conv", "int8").add("fc1", "w4g16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(copy.deepcopy(model), r, method="magnitude", sparsity=0.5)
    assert q.emb.sparsity == 0.5 and q.fc1.sparsity == 0.5 and q.conv.sparsity > 0.4
    idx, img = torch.randint(0, 50, (2, 5)), torch.randn(2, 3, 6, 6)
    lowbit.save(q, tmp_path / "toy")
    back = lowbit.load(tmp_path / "toy", model=Toy())
    with torch.no_grad():
        assert torch.equal(back(idx, img), q(idx, img))


# ---- bad input: one clear error each, nothing changed -------------------------------------------
@pytest.mark.parametrize("opts,match", [
    ({"sparsity": 1.0}, "sparsity=1.0"), ({"sparsity": -0.1}, "sparsity=-0.1"), ({"nm": "4:2"}, "N:M pattern"),
    ({"nm": "2:3"}, "divisible by 3"), ({}, "one of sparsity"), ({"sparsity": 0.5, "nm": "2:4"}, "one of sparsity"),
])  # fmt: skip
def test_bad_pruning_requests_leave_the_model_unchanged(opts, match):
    m = _mlp()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises((ValueError, PruningError), match=match):
        lowbit.quantize(m, "w8", method="magnitude", **opts)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert isinstance(m[0], nn.Linear)


def test_nm_must_leave_whole_groups_of_8_and_quantized_layers_are_refused():
    with pytest.raises(PruningError, match="multiple of 8"):
        lowbit.quantize(_mlp(), "w4g32", method="magnitude", nm="1:8")  # 4 of 32: not a lowbit group
    with pytest.raises(PruningError, match="rounds to none removed"):
        lowbit.quantize(_mlp(), "w4g16", method="magnitude", sparsity=0.2)  # 8 of 16 would be 0.5: no silent no-op
    q = lowbit.quantize(_mlp(), "w4g64")
    with pytest.raises(QuantizeError, match="already quantized"):
        lowbit.quantize(q, "w4g64", method="magnitude", sparsity=0.5)


def test_fractional_zero_points_cannot_hold_a_pruned_weight():
    from lowbit.algorithms import hqq
    from lowbit.scheme import parse_scheme

    w = torch.randn(16, 64)
    qw = hqq.quantize_weight(w, parse_scheme("w4g64-asym"))
    mask = torch.ones(16, 64, dtype=torch.bool)
    mask[:, ::2] = False
    with pytest.raises(PruningError, match="exactly 0"):
        SparseWeight.from_qweight(qw, mask).to_qweight()


def test_streaming_refuses_pruning(tmp_path):
    from lowbit.checkpoint import quantize_checkpoint

    with pytest.raises(QuantizeError, match="prunes"):
        quantize_checkpoint(tmp_path / "nowhere", "w4g64", tmp_path / "out", method="sparsegpt", nm="2:4")


@pytest.fixture()
def saved_sparse(tmp_path):
    q = lowbit.quantize(_mlp(), "w4g64-asym", method="magnitude", nm="2:4")
    return lowbit.save(q, tmp_path / "s")


def _edit(d, fn_tensors=None, fn_manifest=None):
    t = load_file(str(d / "model.safetensors"))
    mf = json.loads((d / "lowbit.json").read_text())
    if fn_tensors:
        fn_tensors(t)
    if fn_manifest:
        fn_manifest(mf)
    meta = {"lowbit_modules_sha256": "-"}
    save_file(t, str(d / "model.safetensors"), metadata=meta)
    resign(d, mf)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.__setitem__("0.mask", t["0.mask"][:, :-1].contiguous()), "mask"),
    (lambda t: t.__setitem__("0.mask", t["0.mask"] | 0xFF), "same number|qweight"),
    (lambda t: t.__setitem__("0.qweight", t["0.qweight"][:, :-1].contiguous()), "qweight"),
    (lambda t: t.pop("0.mask"), "mask"),
])  # fmt: skip
def test_damaged_sparse_files_fail_clearly(saved_sparse, edit, match):
    _edit(saved_sparse, fn_tensors=edit)
    with pytest.raises(LowbitFormatError, match=match):
        lowbit.load(saved_sparse, model=_mlp())


def test_unknown_sparse_storage_is_refused(saved_sparse):
    _edit(saved_sparse, fn_manifest=lambda mf: mf["modules"]["0"].__setitem__("sparse", "csr"))
    with pytest.raises(LowbitFormatError, match="unknown sparse storage 'csr'"):
        lowbit.load(saved_sparse, model=_mlp())


# ---- low-rank corrections ------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", [("rtn", {}), ("gptq", {}), ("sparsegpt", {"nm": "2:4"})])
def test_a_low_rank_correction_cuts_the_output_error_and_is_stored_exactly(tmp_path, method, opts):
    m, x = _mlp(), _correlated()
    ref = torch.cat([m(b) for b in x]).detach()

    def err(q):
        with torch.no_grad():
            return float((torch.cat([q(b) for b in x]) - ref).norm() / ref.norm())

    plain = lowbit.quantize(copy.deepcopy(m), "w3g64", method=method, calibration=x, **opts)
    q = lowbit.quantize(copy.deepcopy(m), "w3g64", method=method, calibration=x, correction_rank=16, **opts)
    assert q[0].rank == 16 and q[2].rank == 16
    assert err(q) < 0.85 * err(plain)
    extra = sum(16 * (layer.in_features + layer.out_features) * 2 for layer in (q[0], q[2]))
    assert lowbit.size_of(q).quantized_bytes == lowbit.size_of(plain).quantized_bytes + extra
    with torch.no_grad():  # the module computes with deq(Q) + A @ B
        w = q[0].dequantized()
        assert torch.allclose(q[0](x[0]), x[0] @ w.t() + q[0].bias, atol=1e-3, rtol=1e-3)
    out = lowbit.save(q, tmp_path / "c")
    stored = load_file(str(out / "model.safetensors"))
    assert stored["0.lowrank_a"].shape == (192, 16) and stored["0.lowrank_b"].dtype == torch.float16
    assert lowbit.size_of(q).total_bytes == sum(t.numel() * t.element_size() for t in stored.values())
    back = lowbit.load(out, model=_mlp())
    with torch.no_grad():
        assert torch.equal(back(x[0]), q(x[0]))


def test_calibrated_methods_weight_the_correction_by_the_inputs_data_free_ones_do_not():
    """The correction is EoRA's (the error's SVD whitened by the inputs' Hessian) for a calibrated
    method, the plain SVD for a data-free one; and the weighted one fits the inputs better."""
    from lowbit.algorithms.lowrank import low_rank

    m, x = _mlp(), _correlated()
    xs = torch.cat(x)
    h = xs.t() @ xs
    w = m[0].weight.detach()
    for method in ("gptq", "rtn"):
        q = lowbit.quantize(copy.deepcopy(m), "w3g64", method=method, calibration=x, correction_rank=8)
        err = w - q[0].qw.dequantize()
        a, b = low_rank(err, h if method == "gptq" else None, rank=8)
        got = q[0].lowrank_a.float() @ q[0].lowrank_b.float()
        assert torch.allclose(got, a @ b, atol=2e-3, rtol=2e-2), method
        other = low_rank(err, None if method == "gptq" else h, rank=8)
        fit = [float(((err - ab) @ xs.t()).norm()) for ab in (a @ b, other[0] @ other[1])]
        assert (fit[0] < fit[1]) == (method == "gptq"), (method, fit)


@pytest.mark.parametrize("rank,match", [(0, "positive integer"), (True, "positive integer"), (2.5, "positive integer"),
                                        (64, "not below the smaller side")])  # fmt: skip
def test_bad_correction_ranks_leave_the_model_unchanged(rank, match):
    m = _mlp()
    with pytest.raises(QuantizeError, match=match):
        lowbit.quantize(m, "w4g64", correction_rank=rank)
    assert isinstance(m[0], nn.Linear) and isinstance(m[2], nn.Linear)


def test_exports_refuse_corrections_and_damaged_ones_fail_to_load(tmp_path):
    q = lowbit.quantize(_mlp(), "w4g64", correction_rank=4)
    with pytest.raises(ValueError, match="cannot hold low-rank corrections"):
        lowbit.export(q, "gguf", tmp_path / "x.gguf")
    out = lowbit.save(q, tmp_path / "c")
    _edit(out, fn_tensors=lambda t: t["0.lowrank_a"].__setitem__((0, 0), float("nan")))
    with pytest.raises(LowbitFormatError, match="NaN"):
        lowbit.load(out, model=_mlp())
    out = lowbit.save(q, tmp_path / "d")
    _edit(out, fn_manifest=lambda mf: mf["modules"]["0"].__setitem__("rank", 5))
    with pytest.raises(LowbitFormatError, match="lowrank_a"):
        lowbit.load(out, model=_mlp())


# ---- QAT from a pruned post-training result ------------------------------------------------------
def test_qat_restarts_from_a_pruned_ptq_model_and_keeps_its_mask(digits):
    from lowbit.qat import QATError, QATLayer, fit

    zoo, data = digits
    fp = zoo.model
    cal = [data["x_train"][i : i + 64] for i in range(0, 256, 64)]
    q = lowbit.quantize(copy.deepcopy(fp), "w3g64", method="sparsegpt", calibration=cal, sparsity=0.75)
    with torch.no_grad():
        ptq_out = q(data["x_test"][:64])
    masks = {n: m.mask.clone() for n, m in q.named_modules() if isinstance(m, QuantModule)}
    lowbit.prepare_qat(q)
    assert all(isinstance(q.get_submodule(n), QATLayer) for n in masks)
    with torch.no_grad():  # training starts exactly where post-training quantization ended
        assert torch.allclose(q(data["x_test"][:64]), ptq_out, atol=1e-4, rtol=1e-4)
    losses = fit(q, [data["x_train"][i : i + 64] for i in range(0, 640, 64)], steps=40, teacher=fp, lr=1e-3,
                 step_lr=1e-3)  # fmt: skip
    assert sum(losses[-5:]) < sum(losses[:5])
    lowbit.convert(q)
    for n, mask in masks.items():
        mod = q.get_submodule(n)
        assert torch.equal(mod.mask, mask) and mod.method == "qat"  # the same pattern, only kept weights stored
        w = mod.qw.dequantize().reshape(mod.qw.rows, -1)
        assert not bool(w[~unpack_mask(mask, w.shape[1])].any())
    assert q.lowbit_layers["fc1"].method == "sparsegpt+qat"
    with pytest.raises(QATError, match="has none"):
        lowbit.prepare_qat(copy.deepcopy(fp))


def test_qat_trains_a_low_rank_correction_and_converts_it_back():
    from lowbit.qat import QATLayer, fit

    fp = _mlp()
    xs = _correlated()
    q = lowbit.quantize(copy.deepcopy(fp), "w2g64", method="magnitude", sparsity=0.5, correction_rank=4)
    with torch.no_grad():
        ptq_out = q(xs[0])
        before = float((q(xs[0]) - fp(xs[0])).pow(2).mean())
    start = {n: (m.lowrank_a.clone(), m.lowrank_b.clone()) for n, m in q.named_modules() if isinstance(m, QuantModule)}
    lowbit.prepare_qat(q)
    assert isinstance(q[0], QATLayer) and q[0].lowrank_a.shape == (192, 4) and q[0].lowrank_a.requires_grad
    with torch.no_grad():  # the correction is part of the forward pass from the start
        assert torch.allclose(q(xs[0]), ptq_out, atol=1e-3, rtol=1e-3)
    fit(q, xs, steps=60, teacher=fp, lr=1e-3, step_lr=1e-3, loss_fn=None)
    lowbit.convert(q)
    for n, (a, _b) in start.items():
        mod = q.get_submodule(n)
        assert mod.rank == 4 and mod.lowrank_a.dtype == torch.float16 and not torch.equal(mod.lowrank_a, a)
        assert mod.sparsity == 0.5
    with torch.no_grad():
        after = float((q(xs[0]) - fp(xs[0])).pow(2).mean())
    assert after < before
