"""Mixed precision: measure each layer's sensitivity, then choose a scheme per layer under a budget.

Sensitivity (:func:`sensitivity`): for every eligible layer ``l`` and candidate scheme ``c``, the
layer alone is quantized with ``c`` (through :func:`lowbit.quantize`, so static activation scales
are calibrated exactly as they will be), the model runs on the sensitivity batches, and the cost
is the mean KL divergence ``KL(p_fp32 || p_quantized)`` of the output distributions (softmax over
the last dimension of the logits; per token for language models, padding excluded; per image for
classifiers). For a language model, KL equals the expected rise of the cross-entropy when the text
follows the model, so ``exp(sum KL)`` approximates the perplexity ratio. A sentence encoder (an
output with ``last_hidden_state`` and no logits) is compared by the cosine distance ``1 - cos``
of its mean-pooled embedding per sentence (``metric="cosine"``; like the KL it is second order in
a small output error, so per-layer costs add in the same approximation). ``"skip"`` (keep the
layer in float) costs 0. Work happens on a copy; the caller's model is not changed.

With ``cost="hessian"`` the KL is predicted instead of measured (HAWQ-V2, Dong et al. 2020):
``d[l, c] = 1/2 * tr(H_l) / n_l * ||Q_c(W_l) - W_l||^2``, the second-order term of the KL's Taylor
series in layer ``l``'s weights (its gradient is zero at FP32) with the layer's Hessian block
replaced by its mean eigenvalue. At the FP32 weights the Hessian of ``KL(p_fp32 || p_theta)`` *is*
the Fisher information of the model's own predictions, so the trace is estimated without second
derivatives: draw outputs ``y`` from the model, and ``tr(H_l) = E ||grad_l sum_t log p(y_t)||^2 / N``
over the ``N`` positions (cross terms vanish in expectation) -- one backward pass per draw, for every
layer at once, instead of one forward pass per layer and candidate. It sees weight error only
(not static activations' rounding) and assumes an isotropic Hessian, so it ranks layers more
coarsely than the measured KL; it is the fast option for large models.

With ``base=`` the measurement is made around an operating point instead: every layer starts
quantized with the base candidate and one layer at a time changes; the cost is the change of the
KL. Per-layer costs interact: on SmolLM2 at 4.25 bits per weight, the allocation from costs
measured around FP32 predicted less KL than uniform w4g64 and measured worse perplexity with RTN,
while the allocation from costs measured around the all-w4g64 model beat it (BENCHMARKS.md).

Allocation (:func:`allocate`): with costs ``d[l, c]`` taken as additive, choose one candidate per
layer to minimise ``sum d`` subject to ``sum bytes <= budget`` (``target_bpw`` or ``max_bytes``),
or to minimise ``sum bytes`` subject to ``sum d <= max_loss``: a multiple-choice knapsack, solved
by dynamic programming over a grid of ``grid`` size cells. Each option's size is rounded *up* to
whole cells for the solution (so the budget holds in exact bytes) and *down* for a second pass
whose optimum bounds the exact problem's from below; the difference is reported as the optimality
gap (0 when the grid is fine enough to be exact). Sizes are the stored weight bytes (codes, scales,
zero points) of the quantized layers; biases and layers outside the search are the same in every
assignment and are left out of the budget.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import write_text_atomic
from .recipe import SKIP, Recipe, format_choice, parse_choice

__all__ = [
    "Sensitivity", "Allocation", "MixedPrecisionError", "sensitivity", "allocate", "parse_max_loss", "hessian_traces",
    "searchable_layers", "output_kl", "mean_pool",
]  # fmt: skip


class MixedPrecisionError(ValueError):
    """A sensitivity or allocation request that cannot be served (no layers, an unreachable budget)."""


@dataclass
class Sensitivity:
    """Per-layer costs: ``loss[layer][cand]`` (mean KL, nats) and ``nbytes[layer][cand]``."""

    candidates: list[str]
    params: dict[str, int]  # layer -> weight elements
    nbytes: dict[str, dict[str, int]]
    loss: dict[str, dict[str, float]]
    metric: str = "kl"
    info: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.params)

    def table(self) -> str:
        """Markdown: one row per layer, KL and bits per weight for each candidate."""
        head = "| layer | params | " + " | ".join(f"{c} KL | {c} bpw" for c in self.candidates) + " |"
        sep = "|---|---:|" + "---:|---:|" * len(self.candidates)
        rows = [head, sep]
        for n in self.layers:
            cells = []
            for c in self.candidates:
                cells += [f"{self.loss[n][c]:.3g}", f"{8 * self.nbytes[n][c] / self.params[n]:.2f}"]
            rows.append(f"| {n} | {self.params[n]:,} | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"format": "lowbit-sensitivity", "version": 1, "metric": self.metric, "candidates": self.candidates,
                "params": self.params, "nbytes": self.nbytes, "loss": self.loss, "info": self.info}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        if not isinstance(d, dict) or d.get("format") != "lowbit-sensitivity" or d.get("version") != 1:
            raise MixedPrecisionError("not a lowbit sensitivity table (format lowbit-sensitivity, version 1)")
        return cls(list(d["candidates"]), dict(d["params"]), dict(d["nbytes"]), dict(d["loss"]), d["metric"], d.get("info", {}))

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivity:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MixedPrecisionError(f"{path}: not a lowbit sensitivity table ({e})") from None


def _is_encoder(out) -> bool:
    """Whether a model output is a sentence encoder's: ``last_hidden_state`` and no logits."""
    return getattr(out, "logits", None) is None and isinstance(getattr(out, "last_hidden_state", None), torch.Tensor)


def mean_pool(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token states ``(B, T, H)`` averaged over the real tokens of ``mask (B, T)`` (all when
    None): the sentence embedding of Reimers & Gurevych 2019, ``(B, H)``, float32."""
    h = h.float()
    if mask is None:
        return h.mean(1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _embedding(out, batch) -> torch.Tensor | None:
    """A sentence encoder's mean-pooled ``(B, H)`` embedding over real tokens; None for other outputs."""
    if not _is_encoder(out):
        return None
    return mean_pool(out.last_hidden_state, batch.get("attention_mask") if isinstance(batch, dict) else None)


def _reference(out, batch) -> torch.Tensor:
    """What an output is compared by: log-probabilities (models with logits) or the normalised
    mean-pooled embedding (sentence encoders)."""
    e = _embedding(out, batch)
    if e is not None:
        return torch.nn.functional.normalize(e.double(), dim=-1)
    return torch.log_softmax(_logits(out).float(), dim=-1)


def _distance_sum(ref: torch.Tensor, out, batch) -> tuple[float, float]:
    """Summed distance of ``out`` from the reference and the count it is a mean over: the KL per
    position (padding excluded), or ``1 - cos`` of the pooled embedding per sentence.

    ``1 - cos`` is taken as ``||a - b||^2 / 2`` of the unit vectors, in float64: the form
    ``1 - a.b`` cancels, and in float32 a small distance (an int8 layer's, ~1e-7) rounds to 0 or
    below on some ISAs, which would make that layer look free."""
    e = _embedding(out, batch)
    if e is not None:
        d = torch.nn.functional.normalize(e.double(), dim=-1) - ref
        dist = 0.5 * (d * d).sum(-1)
        return float(dist.sum()), float(dist.numel())
    logits = _logits(out)
    return _kl_sum(ref, logits, _mask(batch, logits))


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise MixedPrecisionError(
        "sensitivity compares output distributions (logits) or sentence embeddings (last_hidden_state); "
        f"the model returned {type(out).__name__}"
    )


def _mask(batch, logits: torch.Tensor) -> torch.Tensor | None:
    """``(B, T)`` float mask of real tokens when the batch carries an attention mask."""
    if isinstance(batch, dict) and "attention_mask" in batch and logits.dim() == 3:
        return batch["attention_mask"].to(logits.dtype)
    return None


def _kl_sum(ref_logp: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
    """Sum over positions of ``KL(ref || q)`` and the number of positions."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logq)).sum(-1)  # (...,) per position
    if mask is not None:
        return float((kl * mask).sum()), float(mask.sum())
    return float(kl.sum()), float(kl.numel())


def _candidate(c: str) -> str:
    """A candidate's canonical name: ``"skip"``, or the scheme with its options as it prints
    (:func:`lowbit.recipe.parse_choice`: ``"w4g64"``, ``"w4g64+50%+r8"``)."""
    return format_choice(*parse_choice(c))


def searchable_layers(model: nn.Module) -> list[str]:
    """The layers :func:`sensitivity` measures by default: every Linear/Conv2d lowbit can swap,
    except embeddings and the LM head."""
    from . import driver, swappable

    heads = driver._head_and_embedding_names(model)
    blocked = swappable.blocked(model)  # reached other than as a called child: never swapped
    return [n for n, m in model.named_modules()
            if n and n not in heads and n not in blocked and driver._kind(m) in ("linear", "conv2d")]  # fmt: skip


def output_kl(reference: nn.Module, model: nn.Module, batches: Iterable) -> float:
    """Mean ``KL(p_reference || p_model)`` (nats per position; padding excluded) of the two
    models' output distributions over ``batches``; for sentence encoders the mean cosine distance
    ``1 - cos`` of their mean-pooled embeddings (per sentence)."""
    from . import calibrate

    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            ref = _reference(calibrate._call(reference, b), b)
            s, c = _distance_sum(ref, calibrate._call(model, b), b)
            total, count = total + s, count + c
    return total / count


def _clone_tree(x):
    """A copy of a block's output (tensors cloned, tuples/lists/dicts rebuilt), so that in-place
    changes by later modules reach neither the recording nor the next replay."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone_tree(v) for v in x)
    if isinstance(x, dict):
        return type(x)({k: _clone_tree(v) for k, v in x.items()})
    return x


class _Recorded(nn.Module):
    """A block's stand-in: returns the block's recorded outputs, one per call, in order (copies,
    whole structure); any other attribute is the original block's (models read e.g. a layer's
    attention type in their forward)."""

    def __init__(self, block: nn.Module, outputs: list) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: parameters are not duplicated
        self.outputs, self.calls = outputs, 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return _clone_tree(out)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class _PrefixReplay:
    """The blocks before a measured layer's block give the same outputs in every measurement (only
    that layer changes), so they are recorded once, at the operating point, and replayed: each
    measurement runs the model from the layer's own block on. Saves about half the forward work on
    a transformer (the blocks are most of it); memory: each block's output per batch but the last
    (``blocks x tokens x hidden`` floats). Used only where it is exact: the blocks must form a chain
    (each called once per batch, in order), and the model's output on the first batch with every
    block but the last replayed must equal its output run whole; otherwise (a mixture of experts,
    blocks called twice, outputs read in ways a replay cannot give) the model runs whole, as it
    does for a layer outside the blocks."""

    def __init__(self, prefix: str = "", blocks: nn.ModuleList | None = None, outputs: list | None = None) -> None:
        self.prefix, self.blocks, self.outputs = prefix, blocks, outputs or []

    @classmethod
    def record(cls, model: nn.Module, batches: list, found: tuple[str, nn.ModuleList] | None) -> _PrefixReplay:
        """``found``: the model's blocks (:func:`lowbit.calibrate.find_blocks`, asked of the float
        model: blocks of quantized modules hold no ``nn.Linear``), recorded as the model is now."""
        from . import calibrate

        if found is None or not batches or len(found[1]) < 2 or not calibrate._sequential(model, found[1], batches[0]):
            return cls()
        prefix, blocks = found
        last = len(blocks) - 1  # its outputs are never replayed
        outputs: list[list] = [[] for _ in range(last)]
        handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: outputs[i].append(_clone_tree(o)))
                   for i in range(last)]  # fmt: skip
        try:
            whole = [calibrate._call(model, b) for b in batches[:1]]  # the first batch's output, run whole
            for b in batches[1:]:
                calibrate._call(model, b)
        finally:
            for h in handles:
                h.remove()
        if any(len(o) != len(batches) for o in outputs):  # a block called more or less than once per batch
            return cls()
        replay = cls(prefix, blocks, outputs)
        try:
            with replay.replaying(last):
                replayed = calibrate._call(model, batches[0])
        except Exception:  # noqa: BLE001 - a model the replay cannot stand in for: run it whole
            return cls()
        return replay if _same_output(whole[0], replayed) else cls()

    def _block(self, name: str) -> int:
        if self.blocks is None or not name.startswith(self.prefix + "."):
            return 0
        head = name[len(self.prefix) + 1 :].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.blocks) else 0

    @contextlib.contextmanager
    def replaying(self, k: int):
        """While open, blocks ``0..k-1`` return their recorded outputs, one call per batch, in order."""
        old = [self.blocks[j] for j in range(k)]
        try:
            for j in range(k):
                self.blocks[j] = _Recorded(old[j], self.outputs[j])
            yield
        finally:
            for j, m in enumerate(old):
                self.blocks[j] = m

    def before(self, name: str):
        """:meth:`replaying` the blocks before ``name``'s block (none for a layer outside them)."""
        return self.replaying(self._block(name))


def _same_output(a, b) -> bool:
    ta = [x for x in _leaves(a) if isinstance(x, torch.Tensor)]
    tb = [x for x in _leaves(b) if isinstance(x, torch.Tensor)]
    return len(ta) == len(tb) > 0 and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def _leaves(x):
    if isinstance(x, dict):  # transformers' ModelOutput is an OrderedDict
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def sensitivity(
    model: nn.Module,
    candidates: Sequence[str],
    batches: Iterable,
    *,
    calibration: Iterable | None = None,
    method: str = "rtn",
    observer: str = "minmax",
    layers: Sequence[str] | None = None,
    base: str | None = None,
    cost: str = "kl",
    draws: int = 4,
    seed: int = 0,
    progress: bool = False,
    **options,
) -> Sensitivity:
    """Measure every layer's cost under every candidate scheme (see the module docstring).

    Args:
        model: a float model that returns logits (a tensor, or an output with ``.logits``).
        candidates: choices (:func:`lowbit.recipe.parse_choice`): schemes, optionally pruned
            (``"w4g64+50%"``, with a pruning ``method``) or corrected (``"w3g64+r8"``), and
            ``"skip"`` (float, cost 0). A correction applies to linear layers wider than its
            rank; elsewhere its cost is ``inf`` (never allocated).
        batches: model inputs on which the output distributions are compared.
        calibration: data for methods and static schemes that need it (passed to quantize).
        layers: the layers to measure (default: every Linear/Conv2d except embeddings and the
            LM head, which :func:`lowbit.quantize` also leaves alone by default).
        base: measure around an operating point instead of around FP32: every layer starts
            quantized with ``base`` (one of the candidates) and each measurement changes one
            layer to another candidate; the cost is the change of the KL (negative for a wider
            candidate), measured where the allocation will land (``info["base_loss"]`` holds the
            KL of the all-``base`` model, which the costs are relative to).
        cost: ``"kl"`` (measured: one forward pass per layer and candidate) or ``"hessian"``
            (predicted from Hessian traces, see the module docstring; not with ``base``).
        draws: ``"hessian"``: sampled outputs per batch for the trace estimate.
        seed: ``"hessian"``: the sampling seed.
    """
    from . import calibrate, driver, swappable
    from .fold import batchnorm_pairs, fold_batchnorm

    cands = [_candidate(c) for c in candidates]
    if len(set(cands)) != len(cands) or not cands:
        raise MixedPrecisionError(f"candidates must be distinct and non-empty, got {list(candidates)}")
    if base is not None:
        base = _candidate(base)
        if base not in cands:
            raise MixedPrecisionError(f"the base {base} must be one of the candidates ({', '.join(cands)})")
    if cost not in ("kl", "hessian"):
        raise MixedPrecisionError(f"cost must be 'kl' or 'hessian', got {cost!r}")
    if cost == "hessian" and base is not None:
        raise MixedPrecisionError("cost='hessian' predicts the KL around FP32 (its Hessian); measure base= with 'kl'")
    if draws < 1:
        raise MixedPrecisionError(f"draws must be >= 1, got {draws}")
    batches = calibrate.as_batches(batches, "sensitivity")
    if calibration is not None:  # every candidate's quantize reads it: read an iterator once
        calibration = calibrate.as_batches(calibration, "sensitivity's calibration")
    from .nn import quantized_summary

    done = quantized_summary(model)
    if done:
        raise MixedPrecisionError(f"the model is already quantized ({done}): measure sensitivity on the float model")
    work = copy.deepcopy(model).eval()
    if batchnorm_pairs(work):  # quantize() would fold them; do it once, up front, on the copy
        fold_batchnorm(work)
    mods = dict(work.named_modules())
    blocked = swappable.blocked(work)  # reached other than as a called child: never swapped
    if layers is None:
        layers = searchable_layers(work)
    else:
        bad = [n for n in layers if n not in mods or n in blocked or driver._kind(mods[n]) not in ("linear", "conv2d")]
        if bad:
            raise MixedPrecisionError(
                f"not Linear/Conv2d layers lowbit can swap in this model: {', '.join(bad[:5])} "
                f"({blocked.get(bad[0], 'see lowbit.swappable')})"
            )
    if not layers:
        raise MixedPrecisionError("the model has no Linear or Conv2d layers to measure")
    with torch.no_grad():
        outs = [calibrate._call(work, b) for b in batches]
        refs = [_reference(o, b) for o, b in zip(outs, batches)]
        metric = "cosine" if _is_encoder(outs[0]) else "kl"
        del outs
    if metric == "cosine" and cost == "hessian":
        raise MixedPrecisionError("cost='hessian' predicts a KL from output distributions; a sentence encoder has "
                                  "none: measure with cost='kl' (its cosine distance)")  # fmt: skip

    def measured() -> float:
        total = count = 0.0
        for b, ref in zip(batches, refs):
            s, c = _distance_sum(ref, calibrate._call(work, b), b)
            total, count = total + s, count + c
        return total / count

    from .algorithms import get_algorithm

    if get_algorithm(method).smooth is not None:
        raise MixedPrecisionError(
            f"method {method!r} moves scales between layers, so one layer cannot be measured alone; "
            "measure with rtn, hqq or gptq, then quantize the chosen recipe with any method"
        )
    # Each candidate quantizes a copy once; each layer's quantized module is then swapped alone
    # into the float model. (A single-layer quantize per measurement would calibrate the whole
    # model every time; the modules are the same: a layer's inputs are observed in the float
    # model outside blocks, and after the earlier blocks inside them, as quantize does.)
    quantized: dict[str, dict[str, nn.Module]] = {}
    recipe_all = lambda c, names: Recipe(default=None).add("re:(" + "|".join(map(re.escape, names)) + ")", c)  # noqa: E731

    def applies(rank: int | None, n: str) -> bool:  # a correction only for a linear layer wider than its rank
        return rank is None or (driver._kind(mods[n]) == "linear" and rank < min(mods[n].weight.shape))

    for c in cands:  # a correction no layer can take is a mistake, not a choice to skip silently
        rank = None if c == SKIP else parse_choice(c)[1].get("rank")
        if rank is not None and not any(applies(rank, n) for n in layers):
            sides = [min(mods[n].weight.shape) for n in layers if driver._kind(mods[n]) == "linear"]
            raise MixedPrecisionError(
                f"candidate {c}: rank {rank} is not below the smaller side of any Linear layer searched"
                + (f" (the largest rank any takes is {max(sides) - 1})" if sides else " (none is a Linear layer)"))
    for c in cands:
        if c == SKIP:
            continue
        rank = parse_choice(c)[1].get("rank")
        names = [n for n in layers if applies(rank, n)]
        if base == c and len(names) < len(layers):
            raise MixedPrecisionError(f"the base {c} must apply to every layer; not to {next(n for n in layers if n not in names)}")
        if not names:
            continue
        q = driver.quantize(copy.deepcopy(work), recipe_all(c, names), method=method, calibration=calibration,
                            observer=observer, fold_bn=False, progress=progress, **options)  # fmt: skip
        quantized[c] = {n: q.get_submodule(n) for n in names}
    params = {n: mods[n].weight.numel() for n in layers}
    # a candidate that does not apply to a layer costs infinitely much (the float size as bytes)
    nbytes = {n: {c: quantized[c][n].nbytes if n in quantized.get(c, {}) else params[n] * mods[n].weight.element_size()
                  for c in cands} for n in layers}  # fmt: skip
    info = {"method": method, "observer": observer, "batches": len(batches), "base": base, "cost": cost}
    if cost == "hessian":
        traces = hessian_traces(work, batches, {n: mods[n] for n in layers}, draws=draws, seed=seed)
        loss = {}
        for n in layers:
            w = mods[n].weight.detach().float()
            loss[n] = {c: 0.0 if c == SKIP else math.inf if n not in quantized.get(c, {}) else
                       0.5 * traces[n] / w.numel() * float((quantized[c][n].dequantized().reshape(w.shape) - w).pow(2).sum())
                       for c in cands}  # fmt: skip
        return Sensitivity(cands, params, nbytes, loss, "kl", {**info, "base_loss": 0.0, "draws": draws, "traces": traces})
    blocks = calibrate.find_blocks(work, outermost=True)  # while every layer is float
    at = {n: mods[n] if base in (None, SKIP) else quantized[base][n] for n in layers}  # the operating point
    for n in layers:
        driver._set_module(work, n, at[n])
    with torch.no_grad():
        base_loss = 0.0 if base in (None, SKIP) else measured()
    it = layers
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(layers, desc="sensitivity", unit="layer")
    loss = {}
    with torch.no_grad():
        replay = _PrefixReplay.record(work, batches, blocks)
        for name in it:
            loss[name] = {}
            with replay.before(name):
                for c in cands:
                    if c == base or (base is None and c == SKIP):
                        loss[name][c] = 0.0
                        continue
                    if c != SKIP and name not in quantized.get(c, {}):
                        loss[name][c] = math.inf
                        continue
                    driver._set_module(work, name, mods[name] if c == SKIP else quantized[c][name])
                    try:
                        value = measured() - base_loss
                    finally:
                        driver._set_module(work, name, at[name])  # back to the operating point
                    # around FP32 a KL is >= 0 (float noise can make a tiny one negative)
                    loss[name][c] = max(0.0, value) if base is None else value
    return Sensitivity(cands, params, nbytes, loss, metric, {**info, "base_loss": base_loss})


_MICRO_ELEMENTS = 1 << 20  # float input elements per micro-batch in hessian_traces


def _micro_batches(batch) -> list:
    """``batch`` as micro-batches along its first dimension (:func:`hessian_traces`): one row at a
    time for token ids (an integer tensor, or a dict with ``input_ids``), else as many rows as
    hold ``_MICRO_ELEMENTS`` input elements. Tensors in a dict or tuple are split when their first
    dimension is the batch's; anything else is passed to every micro-batch. A batch without a
    batch dimension (a scalar, an empty tensor) is returned whole."""
    tensors = (list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, (tuple, list))
               else [batch])  # fmt: skip
    main = batch.get("input_ids") if isinstance(batch, dict) else None
    main = main if isinstance(main, torch.Tensor) else next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if main is None or main.dim() == 0 or main.shape[0] <= 1:
        return [batch]
    n = main.shape[0]
    per_row = max(1, main[0].numel())
    step = 1 if not main.is_floating_point() else max(1, _MICRO_ELEMENTS // per_row)
    if step >= n:
        return [batch]

    def cut(t, i):
        return t[i : i + step] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t

    if isinstance(batch, dict):
        return [{k: cut(v, i) for k, v in batch.items()} for i in range(0, n, step)]
    if isinstance(batch, (tuple, list)):
        return [(tuple if isinstance(batch, tuple) else list)(cut(t, i) for t in batch) for i in range(0, n, step)]
    return [cut(batch, i) for i in range(0, n, step)]


def hessian_traces(
    model: nn.Module, batches: list, layers: dict[str, nn.Module], *, draws: int = 4, seed: int = 0
) -> dict[str, float]:
    """``tr(H_l)`` for each layer's weight, ``H`` the Hessian of the mean (per position) KL from the
    model's own output distribution at its current weights: the Fisher identity with sampled
    outputs (module docstring). ``layers``: name -> module of ``model`` with a ``.weight``.
    Gradients flow only into those weights; the model is left as it was.

    Each batch is split into micro-batches (one sequence of token ids; image or feature rows up to
    2**20 input elements): one backward graph of a whole batch holds every layer's activations and
    the logits over the vocabulary for all of its positions (SmolLM2, 8 x 512 tokens: ~15 GB), one
    sequence's a fraction of that. The estimate's expectation is the same (the sampled outputs of
    different rows are independent with zero-mean score, so the cross terms vanish either way)."""
    from . import calibrate

    g = torch.Generator().manual_seed(seed)
    weights = {n: m.weight for n, m in layers.items()}
    was = {n: w.requires_grad for n, w in weights.items()}
    others = [p for p in model.parameters() if p.requires_grad and all(p is not w for w in weights.values())]
    total = dict.fromkeys(layers, 0.0)
    positions = 0.0
    try:
        for p in others:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for b in (mb for batch in batches for mb in _micro_batches(batch)):
                logits = _logits(calibrate._call(model, b)).float()
                logp = torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
                mask = _mask(b, logits)
                m = None if mask is None else mask.reshape(-1)
                positions += float(logp.shape[0] if m is None else m.sum())
                probs = logp.detach().exp()
                for d in range(draws):
                    y = torch.multinomial(probs, 1, generator=g)
                    picked = logp.gather(1, y).squeeze(1)
                    s = picked.sum() if m is None else (picked * m).sum()
                    grads = torch.autograd.grad(s, list(weights.values()), retain_graph=d + 1 < draws)
                    for n, gr in zip(weights, grads):
                        total[n] += float(gr.float().pow(2).sum())
    finally:
        for n, w in weights.items():
            w.requires_grad_(was[n])
        for p in others:
            p.requires_grad_(True)
    return {n: t / (draws * positions) for n, t in total.items()}


@dataclass
class Allocation:
    """The chosen scheme per layer, what it costs, and how far from optimal it can be."""

    choice: dict[str, str]
    nbytes: int
    params: int
    loss: float  # predicted: sum of the chosen per-layer costs
    lower_bound: float  # no assignment within the budget has a smaller predicted cost
    objective: str  # "loss" (minimised under a size budget) or "size" (under a loss budget)

    @property
    def bpw(self) -> float:
        return 8.0 * self.nbytes / self.params

    @property
    def gap(self) -> float:
        """Optimality gap of the objective (nats of KL, or bytes), ``>= 0``."""
        return (self.loss if self.objective == "loss" else self.nbytes) - self.lower_bound

    def recipe(self) -> Recipe:
        """One rule per layer (exact names), layers not listed kept in float."""
        r = Recipe(default=None)
        for name, c in self.choice.items():
            r.add(name, c)
        return r

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choice.values():
            out[c] = out.get(c, 0) + 1
        return out


def parse_max_loss(text: str | float) -> float:
    """``"1%"`` -> ``ln(1.01)`` nats (a 1% perplexity rise for a language model); a plain number
    is taken as nats of KL."""
    s = str(text).strip()
    try:
        v = math.log1p(float(s[:-1]) / 100.0) if s.endswith("%") else float(s)
    except ValueError:
        raise MixedPrecisionError(f"max loss must be a number of nats or a percentage like 1%, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise MixedPrecisionError(f"max loss must be positive, got {text!r}")
    return v


def _dp(cost: np.ndarray, size: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiple-choice knapsack over integer ``size (L, C)`` in cells: ``best[b]`` = the least total
    cost of one option per layer with total size ``<= b`` (``inf`` if none); ``pick (L, cells+1)``
    the option layer ``l`` takes in that optimum."""
    best = np.zeros(cells + 1)  # no layers yet: cost 0 at every capacity
    picks = np.zeros((cost.shape[0], cells + 1), dtype=np.int16)
    for layer in range(cost.shape[0]):
        new = np.full(cells + 1, np.inf)
        for c in range(cost.shape[1]):
            s = int(size[layer, c])
            if s > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[s:] = best[: cells + 1 - s] + cost[layer, c]
            better = cand < new
            new[better], picks[layer, better] = cand[better], c
        best = new
    return best, picks


def _backtrack(picks: np.ndarray, size: np.ndarray, b: int) -> list[int]:
    out = []
    for layer in range(picks.shape[0] - 1, -1, -1):
        c = int(picks[layer, b])
        out.append(c)
        b -= int(size[layer, c])
    return out[::-1]


def allocate(
    sens: Sensitivity,
    *,
    target_bpw: float | None = None,
    max_bytes: int | None = None,
    max_loss: float | str | None = None,
    candidates: Sequence[str] | None = None,
    grid: int = 100_000,
) -> Allocation:
    """Choose one of ``candidates`` (default: all measured) per layer; see the module docstring.

    Exactly one budget: ``target_bpw`` (average stored bits per weight over the measured layers),
    ``max_bytes``, or ``max_loss`` (nats of summed KL, or a percentage string, :func:`parse_max_loss`).
    Raises :class:`MixedPrecisionError` when no assignment meets the budget, naming the reachable end.
    """
    if sum(x is not None for x in (target_bpw, max_bytes, max_loss)) != 1:
        raise MixedPrecisionError("give exactly one budget: target_bpw, max_bytes or max_loss")
    cands = list(candidates) if candidates is not None else list(sens.candidates)
    cands = [_candidate(c) for c in cands]
    missing = [c for c in cands if c not in sens.candidates]
    if missing:
        raise MixedPrecisionError(f"not measured: {', '.join(missing)} (measured: {', '.join(sens.candidates)})")
    layers = sens.layers
    cost = np.array([[sens.loss[n][c] for c in cands] for n in layers], dtype=np.float64)
    nbytes = np.array([[sens.nbytes[n][c] for c in cands] for n in layers], dtype=np.int64)
    total_params = sum(sens.params.values())
    base_loss = float(sens.info.get("base_loss") or 0.0)  # costs measured around an operating point
    smallest, largest = int(nbytes.min(1).sum()), int(nbytes.max(1).sum())

    def result(pick: list[int], lower: float, objective: str) -> Allocation:
        choice = {n: cands[c] for n, c in zip(layers, pick)}
        size = int(sum(nbytes[i, c] for i, c in enumerate(pick)))
        predicted = base_loss + float(sum(cost[i, c] for i, c in enumerate(pick)))
        return Allocation(choice, size, total_params, predicted, lower, objective)

    if max_loss is None:
        budget = int(max_bytes) if max_bytes is not None else int(math.floor(float(target_bpw) * total_params / 8))
        if budget < smallest:
            raise MixedPrecisionError(
                f"no assignment fits {budget:,} bytes ({8 * budget / total_params:.3f} bpw); the smallest "
                f"reachable with {', '.join(cands)} is {smallest:,} bytes ({8 * smallest / total_params:.3f} bpw)"
            )
        budget = min(budget, largest)
        unit = max(1.0, budget / grid)
        cells = int(budget // unit)
        up = np.ceil(nbytes / unit).astype(np.int64)  # feasible in exact bytes
        down = np.floor(nbytes / unit).astype(np.int64)  # a relaxation: bounds the optimum below
        best_up, picks = _dp(cost, up, cells)
        best_down, _ = _dp(cost, down, cells)
        if not np.isfinite(best_up[cells]):  # the grid's rounding up lost feasibility: go finer
            if unit == 1.0:
                raise MixedPrecisionError("no assignment fits the budget")  # pragma: no cover - unreachable
            return allocate(sens, max_bytes=budget, candidates=cands, grid=grid * 4)
        return result(_backtrack(picks, up, cells), base_loss + float(best_down[cells]), "loss")

    limit = parse_max_loss(max_loss)
    floor_loss = base_loss + float(cost.min(1).sum())
    if limit < floor_loss:
        raise MixedPrecisionError(
            f"no assignment keeps the predicted loss within {limit:.4g} nats; the least reachable with "
            f"{', '.join(cands)} is {floor_loss:.4g}"
        )
    unit = max(1.0, largest / grid)
    cells = int(math.ceil(largest / unit))
    up = np.ceil(nbytes / unit).astype(np.int64)
    down = np.floor(nbytes / unit).astype(np.int64)
    best_up, picks = _dp(cost, up, cells)
    best_down, _ = _dp(cost, down, cells)
    room = limit - base_loss + 1e-12
    b = int(np.argmax(best_up <= room))  # the smallest capacity meeting the loss budget
    lower_cells = int(np.argmax(best_down <= room))
    return result(_backtrack(picks, up, b), float(lower_cells * unit), "size")
