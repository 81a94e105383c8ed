"""Mixed precision: per-layer sensitivity on a real model, and the knapsack checked against brute force."""

import copy
import itertools
import math
import random

import pytest
import torch
from torch import nn

import lowbit
from lowbit.evaluate.classification import accuracy
from lowbit.mixed import MixedPrecisionError, Sensitivity, allocate, hessian_traces, parse_max_loss, sensitivity


def _random_table(n_layers, cands, seed):
    rng = random.Random(seed)
    params = {f"l{i}": rng.choice([100, 250, 1000, 4096]) for i in range(n_layers)}
    nbytes, loss = {}, {}
    for n, p in params.items():
        bits = sorted(rng.uniform(2, 9) for _ in cands)  # wider candidates: more bytes, less loss
        losses = sorted((rng.uniform(0, 1) ** 3 for _ in cands), reverse=True)
        nbytes[n] = {c: int(math.ceil(p * b / 8)) for c, b in zip(cands, bits)}
        loss[n] = {c: v for c, v in zip(cands, losses)}
    return Sensitivity(list(cands), params, nbytes, loss)


def _brute(sens, budget=None, max_loss=None):
    best = None
    for pick in itertools.product(sens.candidates, repeat=len(sens.layers)):
        size = sum(sens.nbytes[n][c] for n, c in zip(sens.layers, pick))
        loss = sum(sens.loss[n][c] for n, c in zip(sens.layers, pick))
        key = (loss, size) if max_loss is None else (size, loss)
        if (budget is not None and size <= budget) or (max_loss is not None and loss <= max_loss):
            best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_against_brute_force(seed):
    cands = ["w2g32", "w4g32", "int8"]
    sens = _random_table(6, cands, seed)
    total = sum(sens.params.values())
    lo = sum(min(d.values()) for d in sens.nbytes.values())
    hi = sum(max(d.values()) for d in sens.nbytes.values())
    for frac in (0.1, 0.5, 0.9):
        budget = int(lo + frac * (hi - lo))
        a = allocate(sens, max_bytes=budget)
        want_loss, _ = _brute(sens, budget=budget)
        assert a.nbytes <= budget  # exact bytes, whatever the grid
        assert a.loss == pytest.approx(want_loss, abs=1e-9)  # the optimum
        assert a.lower_bound <= want_loss + 1e-12 and a.gap == pytest.approx(0, abs=1e-9)
        assert a.bpw == pytest.approx(8 * a.nbytes / total)
        assert all(str(a.recipe().resolve(n)[0]) == a.choice[n] for n in sens.layers)
    limit = 0.5 * sum(max(d.values()) for d in sens.loss.values())
    a = allocate(sens, max_loss=limit)
    want_size, _ = _brute(sens, max_loss=limit)
    assert a.loss <= limit and a.nbytes == want_size and a.gap == 0


def test_a_coarse_grid_stays_within_budget_and_states_its_gap():
    sens = _random_table(8, ["w2g32", "w4g32", "int8"], seed=11)
    budget = int(sum(sum(d.values()) / 3 for d in sens.nbytes.values()))
    fine = allocate(sens, max_bytes=budget)
    coarse = allocate(sens, max_bytes=budget, grid=20)
    assert coarse.nbytes <= budget
    assert coarse.lower_bound <= fine.loss <= coarse.loss  # the gap brackets the true optimum
    assert coarse.gap >= 0


def test_budgets_that_cannot_be_met_and_bad_requests():
    sens = _random_table(3, ["w2g32", "int8"], seed=3)
    smallest = sum(min(d.values()) for d in sens.nbytes.values())
    with pytest.raises(MixedPrecisionError, match=f"smallest reachable .* is {smallest:,} bytes"):
        allocate(sens, max_bytes=smallest - 1)
    with pytest.raises(MixedPrecisionError, match="smallest reachable"):
        allocate(sens, target_bpw=1.0)
    with pytest.raises(MixedPrecisionError, match="least reachable"):
        allocate(sens, max_loss=1e-9)
    with pytest.raises(MixedPrecisionError, match="exactly one budget"):
        allocate(sens, target_bpw=4, max_loss="1%")
    with pytest.raises(MixedPrecisionError, match="not measured: w4g32"):
        allocate(sens, target_bpw=4, candidates=["w4g32"])
    assert parse_max_loss("1%") == pytest.approx(math.log(1.01))
    with pytest.raises(MixedPrecisionError, match="percentage"):
        parse_max_loss("one percent")


def test_sensitivity_on_digits_finds_the_costly_layers_and_its_recipe_runs(digits, tmp_path):
    zoo, data = digits
    model = zoo.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = data["x_test"]
    sens = sensitivity(model, ["w2g16", "w4g16", "int8", "skip"], [x[:128]])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert sens.layers == [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for n in sens.layers:  # fewer bits cost more on every layer of a real network
        d = sens.loss[n]
        assert d["w2g16"] > d["w4g16"] > d["int8"] >= 0 and d["skip"] == 0
        assert sens.nbytes[n]["w2g16"] < sens.nbytes[n]["w4g16"] < sens.nbytes[n]["int8"] < sens.nbytes[n]["skip"]
    sens.save(tmp_path / "s.json")
    again = Sensitivity.load(tmp_path / "s.json")
    assert again.loss == sens.loss and again.nbytes == sens.nbytes
    # a budget between uniform 2-bit and uniform 4-bit: the allocation beats uniform w2g16 held
    # to the same size on real labels
    size2 = sum(sens.nbytes[n]["w2g16"] for n in sens.layers)
    size4 = sum(sens.nbytes[n]["w4g16"] for n in sens.layers)
    a = allocate(sens, max_bytes=(size2 + size4) // 2, candidates=["w2g16", "w4g16"])
    q = lowbit.quantize(copy.deepcopy(model), a.recipe())
    assert sum(lay.bytes for lay in lowbit.size_of(q).layers if lay.name in a.choice) == a.nbytes
    uniform = lowbit.quantize(copy.deepcopy(model), "w2g16")
    y = data["y_test"]
    assert accuracy(q, x, y) > accuracy(uniform, x, y)
    with pytest.raises(MixedPrecisionError, match="logits.*sentence embeddings.*returned dict"):
        sensitivity(torch.nn.Sequential(torch.nn.Linear(4, 4), _Dict()), ["int8"], [torch.randn(2, 4)])


def test_sensitivity_around_an_operating_point(digits):
    zoo, data = digits
    x = data["x_test"][:128]
    sens = sensitivity(zoo.model, ["w2g16", "w4g16", "int8"], [x], base="w4g16")
    base_loss = sens.info["base_loss"]
    assert base_loss > 0 and sens.info["base"] == "w4g16"
    for n in sens.layers:  # relative to the all-w4g16 model: narrower costs more
        d = sens.loss[n]
        assert d["w4g16"] == 0 and d["w2g16"] > 0 and d["int8"] >= -base_loss
    assert sum(sens.loss[n]["int8"] for n in sens.layers) < 0  # and wider less
    size4 = sum(sens.nbytes[n]["w4g16"] for n in sens.layers)
    a = allocate(sens, max_bytes=size4, candidates=["w4g16"])  # the operating point itself
    assert a.loss == pytest.approx(base_loss) and a.lower_bound == pytest.approx(base_loss)
    b = allocate(sens, max_bytes=size4)  # any mix at the same bytes predicts no worse
    assert b.loss <= a.loss + 1e-12 and b.nbytes <= size4
    with pytest.raises(MixedPrecisionError, match="must be one of the candidates"):
        sensitivity(zoo.model, ["w2g16", "int8"], [x], base="w4g16")


@pytest.mark.parametrize("base", [None, "w4g32"])
def test_blocks_before_the_measured_layer_are_replayed_with_the_same_costs(base, monkeypatch):
    """A decoder's earlier blocks are recorded once and replayed: the costs equal a full forward
    pass per measurement, while the first block runs for far fewer measurements."""
    import transformers

    from lowbit import mixed

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    batches = [torch.randint(0, 96, (2, 24)) for _ in range(3)]
    calls = []
    orig = type(model.model.layers[0]).forward

    def counting(self, *a, **k):  # every decoder block's real forward pass
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(type(model.model.layers[0]), "forward", counting)
    fast = sensitivity(model, ["w4g32", "w2g32"], batches, base=base)
    fast_calls = len(calls)
    monkeypatch.setattr(mixed._PrefixReplay, "record", classmethod(lambda cls, m, b, found: cls()))
    calls.clear()
    full = sensitivity(model, ["w4g32", "w2g32"], batches, base=base)
    # 7 layers in each of 3 blocks: a measurement of a layer in block k skips blocks 0..k-1 on each
    # of 3 batches (0 + 1 + 2 blocks); recording costs one pass (3 batches x 3 blocks; its first
    # batch is the check's whole run), the chain check one batch (3 blocks), the check replayed (1)
    measured = 1 if base else 2  # candidates measured per layer (the base costs 0 unmeasured)
    assert len(calls) - fast_calls == 7 * (0 + 1 + 2) * 3 * measured - 3 * 3 - 3 - 1, (fast_calls, len(calls))
    for n in full.layers:
        for c in full.candidates:
            assert fast.loss[n][c] == pytest.approx(full.loss[n][c], rel=1e-4, abs=1e-9), (n, c)
    assert any(full.loss[n]["w2g32"] > 0 for n in full.layers)


class _Block(nn.Module):
    """A residual block; ``inplace``: adds into its input (``x += f(x)``); returns ``(x, extra)`` when
    ``extra`` (a tensor the model reads besides the hidden state)."""

    def __init__(self, inplace: bool = False, extra: bool = False) -> None:
        super().__init__()
        self.fc, self.inplace, self.extra, self.kind = nn.Linear(16, 16), inplace, extra, "dense"

    def forward(self, x, bias=None):
        y = torch.tanh(self.fc(x) + (0 if bias is None else bias))
        if self.inplace:
            x += y
        else:
            x = x + y
        return (x, y.mean(-1, keepdim=True)) if self.extra else x


class _Stack(nn.Module):
    """Blocks whose outputs reach the head other than through the next block alone: ``skip`` sums
    every block's output into the head; ``extra`` feeds each block's second output to the next;
    ``attribute``: the forward reads an attribute of each block (``kind``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.layers = nn.ModuleList(_Block(inplace=mode == "inplace", extra=mode == "extra") for _ in range(3))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x, skip, bias = x.clone(), 0, None
        for layer in self.layers:
            if self.mode == "attribute" and layer.kind != "dense":
                raise AssertionError("a block without its attributes")
            out = layer(x, bias=bias)
            x, bias = out if self.mode == "extra" else (out, None)
            skip = skip + x
        return self.head(skip if self.mode == "skip" else x)


@pytest.mark.parametrize("mode", ["skip", "inplace", "extra", "attribute"])
def test_the_replay_gives_the_same_costs_whatever_reads_or_changes_the_block_outputs(mode, monkeypatch):
    from lowbit import mixed

    torch.manual_seed(0)
    model = _Stack(mode).eval()
    batches = [torch.randn(8, 16) for _ in range(2)]
    from lowbit.calibrate import find_blocks

    work = copy.deepcopy(model)
    assert mixed._PrefixReplay.record(work, batches, find_blocks(work, outermost=True)).blocks is not None  # engaged
    fast = sensitivity(model, ["w2g16", "w4g16"], batches)
    monkeypatch.setattr(mixed._PrefixReplay, "record", classmethod(lambda cls, m, b, found: cls()))
    full = sensitivity(model, ["w2g16", "w4g16"], batches)
    for n in full.layers:
        for c in full.candidates:
            assert fast.loss[n][c] == pytest.approx(full.loss[n][c], rel=1e-5, abs=1e-12), (mode, n, c)


@pytest.mark.parametrize("micro", [None, 8 * 5])  # the batch whole, or in micro-batches of 8 rows
def test_hessian_traces_match_the_exact_hessian_of_the_kl(monkeypatch, micro):
    from lowbit import mixed

    if micro is not None:
        monkeypatch.setattr(mixed, "_MICRO_ELEMENTS", micro)
        assert len(mixed._micro_batches(torch.zeros(64, 5))) == 8
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(64, 5)
    with torch.no_grad():
        ref = torch.log_softmax(net(x), -1)

    def exact(i: int) -> float:  # trace of d2/dW2 of the mean KL(p_now || p_W) at W = the weights now
        w0 = net[i].weight.detach().clone()

        def kl(w):
            saved = net[i].weight
            del net[i].weight
            net[i].weight = w
            try:
                logq = torch.log_softmax(net(x), -1)
            finally:
                net[i].weight = saved
            return (ref.exp() * (ref - logq)).sum(-1).mean()

        h = torch.autograd.functional.hessian(kl, w0)
        return float(h.reshape(w0.numel(), w0.numel()).trace())

    got = hessian_traces(net, [x], {"0": net[0], "2": net[2]}, draws=2000)
    for i in (0, 2):
        assert got[str(i)] == pytest.approx(exact(i), rel=0.08), (i, got, exact(i))
    assert all(p.requires_grad for p in net.parameters())  # left as it was


def test_hessian_micro_batches_split_sequences_one_at_a_time():
    from lowbit.mixed import _micro_batches

    ids = torch.arange(12).reshape(3, 4)
    mask = torch.ones(3, 4, dtype=torch.long)
    parts = _micro_batches({"input_ids": ids, "attention_mask": mask, "use_cache": False, "pos": torch.arange(4)})
    assert len(parts) == 3
    for i, part in enumerate(parts):
        assert torch.equal(part["input_ids"], ids[i : i + 1]) and torch.equal(part["attention_mask"], mask[i : i + 1])
        assert part["use_cache"] is False and torch.equal(part["pos"], torch.arange(4))  # no batch dimension: kept
    assert [torch.equal(a, ids[i : i + 1]) for i, a in enumerate(_micro_batches(ids))] == [True] * 3
    assert [len(t[0]) for t in _micro_batches((ids, mask))] == [1, 1, 1]
    images = torch.zeros(40, 3, 224, 224)  # 150,528 elements a row: 6 rows per micro-batch
    assert [len(b) for b in _micro_batches(images)] == [6] * 6 + [4]
    small = torch.zeros(64, 1, 8, 8)
    assert _micro_batches(small)[0] is small and len(_micro_batches(small)) == 1
    assert _micro_batches(ids[:1])[0] is not None and len(_micro_batches(ids[:1])) == 1


def test_hessian_cost_predicts_the_measured_kl_on_digits(digits):
    from scipy.stats import spearmanr

    zoo, data = digits
    x = data["x_test"][:128]
    cands = ["w2g16", "w4g16", "int8", "skip"]
    measured = sensitivity(zoo.model, cands, [x])
    predicted = sensitivity(zoo.model, cands, [x], cost="hessian", draws=16)
    assert predicted.info["cost"] == "hessian" and predicted.nbytes == measured.nbytes
    pairs = [(measured.loss[n][c], predicted.loss[n][c]) for n in measured.layers for c in cands if c != "skip"]
    assert spearmanr(*zip(*pairs)).statistic > 0.85, pairs  # the same ranking, near enough
    ratios = [p / m for m, p in pairs]
    assert 0.1 < min(ratios) and max(ratios) < 10, ratios  # and the same scale (nats)
    with pytest.raises(MixedPrecisionError, match="cost must be"):
        sensitivity(zoo.model, cands, [x], cost="fisher")
    with pytest.raises(MixedPrecisionError, match="measure base= with 'kl'"):
        sensitivity(zoo.model, cands, [x], cost="hessian", base="w4g16")


def test_static_candidates_calibrate_from_a_one_shot_iterator():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = [torch.randn(32, 8) for _ in range(2)]
    cands = ["w8a8-static", "w4a8-static"]
    a = sensitivity(net, cands, [x[0]], calibration=x)
    b = sensitivity(net, cands, [x[0]], calibration=iter(x))  # each candidate quantizes with it
    assert a.loss == b.loss


class _Dict(torch.nn.Module):
    def forward(self, x):
        return {"h": x}
