"""Compression to a size budget: quantization, pruning and low-rank corrections chosen per layer,
then distillation from the FP32 teacher (issue 16).

:func:`compress` runs the pipeline on a copy of the model:

1. **Measure.** Every candidate *choice* (:func:`lowbit.recipe.parse_choice`: a scheme, optionally
   pruned, ``"w4g64+50%"``, ``"w4g64+2:4"``, and/or corrected, ``"w3g64+r16"``) is tried on every
   searched layer alone (:func:`lowbit.mixed.sensitivity`): its cost is the KL divergence of the
   model's output distribution from FP32's, its size the layer's stored bytes, mask and correction
   included. Pruned candidates are quantized by a pruning method (SparseGPT when calibration data
   is given, magnitude otherwise), so the same method serves the dense candidates with nothing
   removed.
   With ``cost="hessian"`` the KL is predicted from Hessian traces instead (HAWQ-V2; one
   backward pass per batch instead of a forward pass per layer and candidate).
2. **Allocate.** The size budget is ``reference_bytes / target_ratio`` for the whole model: what
   the layers outside the search store (embeddings, norms, biases, and the layers ``fixed``
   quantizes) is subtracted, and the rest is shared among the searched layers by the
   multiple-choice knapsack of :func:`lowbit.mixed.allocate` (least summed KL within the bytes).
   ``target_bpw`` budgets the searched layers alone instead (stored bits per weight, masks and
   corrections included). With ``max_loss`` instead, the smallest model whose predicted KL stays
   within it; with both, the size budget's allocation is checked against the loss.
3. **Quantize** the model with the allocation's recipe (after the ``fixed`` layers), by
   ``method``; a method that moves scales between layers (AWQ, ``"awq+gptq"``) quantizes the
   recipe while the costs were measured by ``measure_method`` (a layer cannot be measured alone
   when its scales move).
4. **Distil** (``distill_steps > 0``): :func:`lowbit.prepare_qat` restarts every quantized layer
   from its post-training result (masks fixed, corrections trained) and :func:`lowbit.qat.fit`
   matches the FP32 teacher's output distribution (Hinton et al. 2015) on ``distill_data`` -- no
   labels needed -- before :func:`lowbit.convert` packs it again. ``distill_blocks > 0`` first
   fits each repeated block to the FP32 block's output (:func:`lowbit.qat.fit_blocks`).

Sizes are stored tensor bytes as :func:`lowbit.size_of` counts them (a saved file adds only its
header); ``reference_bytes`` counts the model's floating-point tensors at 4 bytes each (FP32).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..mixed import (
    Allocation,
    MixedPrecisionError,
    Sensitivity,
    allocate,
    output_kl,
    parse_max_loss,
    searchable_layers,
    sensitivity,
)
from ..recipe import Recipe, format_choice, parse_choice

__all__ = ["compress", "Compressed", "CompressError", "DEFAULT_CANDIDATES", "reference_bytes"]

#: Choices measured per layer when none are given: dense 8/4/3/2-bit and pruned 4/3-bit.
DEFAULT_CANDIDATES = ("w8", "w4g64", "w3g64", "w2g64", "w4g64+50%", "w3g64+50%", "w4g64+75%", "w3g64+75%")


class CompressError(ValueError):
    """A compression request that cannot be served (an unreachable ratio or loss, bad options)."""


@dataclass
class Compressed:
    """What :func:`compress` made: the model and how it was chosen.

    ``reference_bytes``: the input model's tensors with floats at 4 bytes (FP32); ``nbytes``: the
    compressed model's stored tensor bytes (:func:`lowbit.size_of`); ``kl``: mean KL (nats per
    position) of the compressed model's output distribution from the input model's on the
    measurement batches, ``kl_before_distill`` the same before distillation; ``seconds``: wall
    time of each stage."""

    model: nn.Module
    recipe: Recipe
    allocation: Allocation
    sensitivity: Sensitivity
    reference_bytes: int
    nbytes: int
    fixed_bytes: int
    kl: float
    kl_before_distill: float
    distill_losses: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    method: str = ""
    candidates: list[str] = field(default_factory=list)  # those allocated among (default: all measured)
    fixed_choice: str | None = None  # the choice taken when ``fixed`` offered several
    fixed_costs: dict[str, float] = field(default_factory=dict)  # KL of each reachable fixed choice alone
    block_errors: list[tuple[float, float]] = field(default_factory=list)  # per block (before, after): distill_blocks

    @property
    def ratio(self) -> float:
        """``reference_bytes / nbytes``: how many times smaller than FP32."""
        return self.reference_bytes / self.nbytes

    @property
    def searched_bpw(self) -> float:
        """Stored bits per weight of the searched layers (codes, scales, zero points, masks,
        corrections), as the allocation counts them."""
        return 8 * self.allocation.nbytes / sum(self.sensitivity.params[n] for n in self.sensitivity.layers)

    def frontier(self, ratios: Sequence[float]) -> list[tuple[float, float]]:
        """``(ratio, predicted KL)`` of the best allocation at each ratio that is reachable."""
        out = []
        for r in ratios:
            budget = int(self.reference_bytes / r) - self.fixed_bytes
            try:
                a = allocate(self.sensitivity, max_bytes=budget, candidates=self.candidates or None)
            except MixedPrecisionError:
                continue
            out.append((self.reference_bytes / (a.nbytes + self.fixed_bytes), a.loss))
        return out

    def summary(self) -> str:
        counts = ", ".join(f"{c} x{k}" for c, k in sorted(self.allocation.counts().items()))
        how = []
        if self.block_errors:
            how.append(f"block distillation of {len(self.block_errors)} blocks")
        if self.distill_losses:
            how.append(f"{len(self.distill_losses)} distillation steps")
        distil = (f"; KL {self.kl_before_distill:.4g} -> {self.kl:.4g} nats after {' and '.join(how)}" if how
                  else f"; KL {self.kl:.4g} nats")  # fmt: skip
        fixed = f"; fixed layers {self.fixed_choice}" if self.fixed_choice else ""
        return (f"{self.ratio:.2f}x smaller than FP32 ({self.nbytes:,} of {self.reference_bytes:,} bytes; "
                f"{self.method}: {counts}, {self.searched_bpw:.3f} bits per weight{fixed}){distil}")  # fmt: skip


def reference_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and persistent buffers with every floating-point tensor
    counted at 4 bytes (FP32), each shared tensor once."""
    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        tensors = list(mod.parameters(recurse=False))
        tensors += [b for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set]
        for t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


def _fixed_options(fixed) -> list[tuple[str | None, dict | Recipe | None]]:
    """``fixed`` as a list of ``(option, fixed)`` to try: one ``(None, fixed)`` when every entry
    names one choice; one per choice when entries give a sequence of choices (searched together,
    so a tied embedding and LM head stay one tensor)."""
    if fixed is None or isinstance(fixed, Recipe):
        return [(None, fixed)]
    if not isinstance(fixed, dict):
        raise CompressError(f"fixed is a dict of pattern -> choice (or a sequence of choices), got {type(fixed).__name__}")
    searched = {p: tuple(v) for p, v in fixed.items() if not isinstance(v, str)}
    if not searched:
        return [(None, fixed)]
    options = set(searched.values())
    if len(options) > 1 or not all(isinstance(c, str) for c in next(iter(options))) or not next(iter(options)):
        raise CompressError("fixed entries that give several choices are searched together (a tied embedding and LM "
                            f"head take one choice): give each the same non-empty sequence of choices, got {searched}")
    out = []
    for c in next(iter(options)):
        try:
            name = format_choice(*parse_choice(c))
        except ValueError as e:
            raise CompressError(f"bad fixed choice: {e}") from None
        out.append((name, {p: (c if p in searched else v) for p, v in fixed.items()}))
    return out


def _fixed_recipe(fixed) -> Recipe | None:
    if fixed is None or isinstance(fixed, Recipe):
        return fixed
    r = Recipe(default=None)
    for pattern, choice in dict(fixed).items():
        r.add(pattern, choice)
    return r


def _round_fixed(model: nn.Module, fixed_r: Recipe | None) -> nn.Module:
    """A copy of ``model`` with the ``fixed`` layers rounded to nearest (pruned by magnitude when a
    rule prunes)."""
    from .. import driver

    rest = copy.deepcopy(model).eval()
    if fixed_r is not None:
        driver.quantize(rest, fixed_r, **({"method": "magnitude", "sparsity": 0.0} if fixed_r.has_options else {}))
    return rest


def _allocate(sens: Sensitivity, cands: list[str], ref_bytes: int, fixed_bytes: int, fixed_kl: float,
              target_ratio: float | None, target_bpw: float | None, max_loss, *, hint: bool) -> Allocation:
    """The searched layers' allocation within ``ref_bytes / target_ratio`` less ``fixed_bytes`` (or
    ``target_bpw`` bits per searched weight) and / or ``max_loss`` less ``fixed_kl``;
    :class:`CompressError` when none fits."""
    smallest = sum(min(sens.nbytes[n][c] for c in cands) for n in sens.layers)
    weights = sum(sens.params[n] for n in sens.layers)
    alloc_ratio = alloc_loss = None
    if target_ratio is not None:
        budget = int(ref_bytes / target_ratio) - fixed_bytes
        if budget < smallest:
            best = ref_bytes / (fixed_bytes + smallest)
            raise CompressError(
                f"no choice of {', '.join(cands)} reaches {target_ratio:g}x: the largest reachable is "
                f"{best:.2f}x ({fixed_bytes:,} bytes outside the search"
                + (": quantize the embeddings and LM head with fixed=" if hint else "") + ")"
            )
        alloc_ratio = allocate(sens, max_bytes=budget, candidates=cands)
    elif target_bpw is not None:
        budget = int(target_bpw * weights / 8)
        if budget < smallest:
            raise CompressError(f"no choice of {', '.join(cands)} reaches {target_bpw:g} bits per weight on the "
                                f"{len(sens.layers)} searched layers: the fewest reachable is "
                                f"{8 * smallest / weights:.3f}")  # fmt: skip
        alloc_ratio = allocate(sens, max_bytes=budget, candidates=cands)
    if max_loss is not None:
        limit = parse_max_loss(max_loss) - fixed_kl
        if limit <= 0:
            raise CompressError(f"the fixed layers alone cost a KL of {fixed_kl:.4g} nats, the max loss "
                                f"{parse_max_loss(max_loss):.4g}")  # fmt: skip
        try:
            alloc_loss = allocate(sens, max_loss=limit, candidates=cands)
        except MixedPrecisionError as e:
            raise CompressError(str(e)) from None
    if alloc_ratio is not None and alloc_loss is not None and alloc_ratio.loss > alloc_loss.loss + 1e-12 and (
            alloc_ratio.nbytes < alloc_loss.nbytes):  # fmt: skip
        want, within = (
            (f"{target_ratio:g}x", f"the largest ratio within it is {ref_bytes / (fixed_bytes + alloc_loss.nbytes):.2f}x")
            if target_ratio is not None else
            (f"{target_bpw:g} bits per weight", f"the fewest bits per weight within it is "
                                                f"{8 * alloc_loss.nbytes / weights:.3f}"))  # fmt: skip
        raise CompressError(
            f"{want} costs a predicted KL of {alloc_ratio.loss + fixed_kl:.4g} nats, above the max loss "
            f"({alloc_loss.loss + fixed_kl:.4g} reachable); {within}"
        )
    return alloc_ratio if alloc_ratio is not None else alloc_loss


def compress(
    model: nn.Module,
    *,
    target_ratio: float | None = None,
    target_bpw: float | None = None,
    max_loss: float | str | None = None,
    batches: Iterable,
    calibration: Iterable | None = None,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    method: str | None = None,
    measure_method: str | None = None,
    cost: str = "kl",
    fixed: Recipe | dict | None = None,
    base: str | None = None,
    channels: float | None = None,
    measured: Sensitivity | None = None,
    distill_steps: int = 0,
    distill_blocks: int = 0,
    distill_data: Sequence | Callable | None = None,
    lr: float = 1e-4,
    step_lr: float = 1e-3,
    progress: bool = False,
) -> Compressed:
    """Compress ``model`` to ``target_ratio`` times smaller than FP32, or ``target_bpw`` bits per
    weight on the searched layers (and/or within ``max_loss``).

    Args:
        model: a float model returning logits (a tensor or an output with ``.logits``); not changed.
        target_ratio: FP32 bytes divided by compressed bytes, whole model (e.g. ``12``).
        target_bpw: instead of ``target_ratio``: stored bits per weight of the searched layers
            (codes, scales, zero points, masks and corrections; e.g. ``3.2``); the layers outside
            the search (``fixed``, embeddings) are not in this budget.
        max_loss: a bound on the predicted KL (nats summed over layers, or a percentage string:
            ``"2%"`` = a 2% perplexity rise, :func:`lowbit.mixed.parse_max_loss`).
        batches: model inputs the costs (and the result's ``kl``) are measured on.
        calibration: model inputs for calibrated methods; also the default distillation data.
        candidates: choices to measure per layer (``"skip"`` keeps a layer float).
        method: ``"sparsegpt"`` (default with calibration), ``"magnitude"`` (default without),
            ``"wanda"``, or a non-pruning method (rtn, hqq, gptq, awq, awq+gptq) when no candidate
            prunes.
        measure_method: the method the costs are measured with (default ``method``; ``"rtn"``
            when ``method`` moves scales between layers, as AWQ does, which cannot be measured
            one layer at a time). It must prune when a candidate does.
        cost: ``"kl"`` (each layer and candidate measured, one forward pass each) or
            ``"hessian"`` (the KL predicted from Hessian traces, :func:`lowbit.mixed.sensitivity`;
            much faster, coarser; not with ``base``).
        fixed: choices for layers outside the search, e.g. ``{"model.embed_tokens": "w4g64",
            "lm_head": "w4g64"}`` (embeddings and LM heads are otherwise kept float); rounded to
            nearest first (a tied pair given one scheme stays one tensor), their bytes counted in
            the budget, and left as they are by distillation. An entry may give a sequence of
            choices, ``("w8", "w4g64", "w3g64")``: every entry that does takes one of them together;
            each is measured (the KL of those layers rounded alone) and the one whose KL plus the
            searched layers' least predicted KL within the budget is smallest wins (under
            ``target_bpw``, whose budget leaves them out: the least KL; under ``max_loss`` alone: the
            fewest bytes); ``fixed_choice`` and ``fixed_costs`` report it.
        base: measure costs around this candidate (every layer quantized with it) instead of
            FP32 (:func:`lowbit.mixed.sensitivity`).
        channels: first remove this share of the channels of every channel group (structured
            pruning, :func:`lowbit.compress.structured.prune_channels`: feed-forward neurons of a
            transformer, chained Linear/Conv2d channels of other models); the tensors and the
            config shrink, and the costs are then measured on the smaller model.
        measured: a :class:`lowbit.mixed.Sensitivity` measured before (by an earlier
            ``compress``'s ``.sensitivity``, or ``lowbit sensitivity -o``) on the same layers with
            the same measure method, cost and base, and every one of ``candidates``: the measurement is skipped, so one
            table serves many ratios and candidate subsets.
        distill_steps: steps of distillation from the FP32 model after quantization (0: none).
        distill_blocks: passes of block-wise distillation (:func:`lowbit.qat.fit_blocks`, its
            rates) over the distillation data, after quantization and before ``distill_steps``
            (0: none): each repeated block (a decoder layer) trained to reproduce the FP32 block's
            output; for models made of a chain of repeated blocks, and a sequence of batches.
        distill_data: batches to distil on (default ``calibration``, else ``batches``), cycled, or a
            callable ``i -> batch`` giving step ``i``'s batch (``distill_steps`` only).
        lr, step_lr: distillation learning rates of the weights (and corrections) and the steps.

    Returns a :class:`Compressed`. Raises :class:`CompressError` when no allocation of the
    candidates meets the budget (naming the largest reachable ratio, or the least loss), for an
    already-quantized model, and for bad arguments (a non-positive ``lr``, an unreadable
    ``max_loss``, empty ``distill_data``); :class:`~lowbit.mixed.MixedPrecisionError` for a
    correction rank that no searched layer can take. The model is never changed.
    """
    from .. import driver, qat
    from ..algorithms import get_algorithm
    from ..evaluate.size import size_of

    if target_ratio is None and target_bpw is None and max_loss is None:
        raise CompressError("give a budget: target_ratio (e.g. 12) or target_bpw (e.g. 3.2), and/or max_loss "
                            "(e.g. '2%')")  # fmt: skip
    if target_ratio is not None and target_bpw is not None:
        raise CompressError("give one size budget: target_ratio (the whole model) or target_bpw (the searched "
                            "layers), not both")  # fmt: skip
    if target_ratio is not None and not (isinstance(target_ratio, (int, float)) and math.isfinite(target_ratio)
                                         and target_ratio > 1):  # fmt: skip
        raise CompressError(f"target_ratio must be a number above 1 (FP32 bytes / compressed bytes), got {target_ratio!r}")
    if target_bpw is not None and (isinstance(target_bpw, bool) or not isinstance(target_bpw, (int, float))
                                   or not math.isfinite(target_bpw) or target_bpw <= 0):  # fmt: skip
        raise CompressError(f"target_bpw must be a positive number of bits per weight, got {target_bpw!r}")
    if cost not in ("kl", "hessian"):
        raise CompressError(f"cost must be 'kl' or 'hessian', got {cost!r}")
    if cost == "hessian" and base is not None:
        raise CompressError("cost='hessian' predicts the KL around FP32; measure around base= with cost='kl'")
    if not isinstance(distill_steps, int) or isinstance(distill_steps, bool) or distill_steps < 0:
        raise CompressError(f"distill_steps must be a non-negative integer, got {distill_steps!r}")
    if not isinstance(distill_blocks, int) or isinstance(distill_blocks, bool) or distill_blocks < 0:
        raise CompressError(f"distill_blocks must be a non-negative integer, got {distill_blocks!r}")
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        raise CompressError(f"lr must be a positive learning rate, got {lr!r}")
    if max_loss is not None:
        try:
            parse_max_loss(max_loss)
        except MixedPrecisionError as e:
            raise CompressError(str(e)) from None
    if (distill_steps or distill_blocks) and distill_data is not None and not callable(distill_data):
        distill_data = list(distill_data)
        if not distill_data:
            raise CompressError("distill_data holds no batches; give some, or None to distil on the calibration data")
    from ..nn import quantized_summary

    done = quantized_summary(model)
    if done:
        raise CompressError(f"the model is already quantized ({done}): compress the float model")
    if distill_blocks and callable(distill_data):
        raise CompressError("distill_blocks needs a sequence of batches as distill_data, not a callable")
    if distill_blocks:
        from ..calibrate import find_blocks

        if find_blocks(model) is None:
            raise CompressError("distill_blocks needs a model made of a chain of repeated blocks (a decoder's or "
                                "an encoder's layers); use distill_steps for this model")  # fmt: skip
    try:
        parsed = [parse_choice(c) for c in candidates]
    except ValueError as e:
        raise CompressError(f"bad candidate: {e}") from None
    cands = [format_choice(*c) for c in parsed]  # canonical names, as a measured table holds them
    prunes = any("sparsity" in o or "nm" in o for _s, o in parsed)
    calibration = None if calibration is None else list(calibration)
    batches = list(batches)
    if method is None:
        method = ("sparsegpt" if calibration is not None else "magnitude") if prunes else (
            "gptq" if calibration is not None else "rtn")
    algo = get_algorithm(method)
    if prunes and not algo.prunes:
        raise CompressError(f"candidates prune weights, but method {method!r} does not prune: use sparsegpt, wanda "
                            "or magnitude")  # fmt: skip
    if algo.uses_calibration and calibration is None:
        raise CompressError(f"method {method!r} needs calibration data")
    if measure_method is None:
        measure_method = method if algo.smooth is None else "rtn"
    meas_algo = get_algorithm(measure_method)
    if meas_algo.smooth is not None:
        raise CompressError(f"measure_method {measure_method!r} moves scales between layers, so one layer cannot be "
                            "measured alone: measure with rtn, hqq or gptq (method may still be it)")  # fmt: skip
    if prunes and not meas_algo.prunes:
        raise CompressError(f"candidates prune weights, but measure_method {measure_method!r} does not prune: use "
                            "sparsegpt, wanda or magnitude")  # fmt: skip
    if meas_algo.uses_calibration and calibration is None:
        raise CompressError(f"measure_method {measure_method!r} needs calibration data")
    options = {"sparsity": 0.0} if algo.prunes else {}  # a dense candidate under a pruning method
    meas_options = {"sparsity": 0.0} if meas_algo.prunes else {}
    fixed_options = _fixed_options(fixed)
    fixed_r = _fixed_recipe(fixed_options[0][1])  # the same patterns in every option
    if fixed_r is not None:  # a typo would leave its layer in the search and the budget off: say so now
        names = [n for n, _ in model.named_modules() if n]
        unused = [r.pattern for r in fixed_r.rules if not any(r.matches(n) for n in names)]
        if unused:
            raise CompressError(
                f"fixed pattern(s) {', '.join(map(repr, unused))} match no module of this {type(model).__name__} "
                "(patterns are shell globs over module names; prefix a regular expression with 're:')"
            )
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    if algo.uses_calibration or meas_algo.uses_calibration:  # before any work: calibrated methods need each
        # layer's unfolded input
        from ..calibrate import unfoldable

        grouped = [n for n in searchable_layers(model) if (fixed_r is None or fixed_r.rule_for(n) is None)
                   and not unfoldable(model.get_submodule(n))]  # fmt: skip
        if grouped:
            more = f" and {len(grouped) - 1} more" if len(grouped) > 1 else ""
            raise CompressError(
                f"{grouped[0]}{more}: grouped/depthwise convolutions cannot be calibrated by "
                f"{method if algo.uses_calibration else measure_method!r}; give "
                "them a fixed choice, rounded to nearest (fixed={name: 'w8'}; CLI --fixed 're:...=w8'), or "
                "use method 'rtn' or 'hqq'")  # fmt: skip
    # 0. structured pruning (on a copy; the original stays the reference and the teacher)
    teacher, ref_bytes = model, reference_bytes(model)
    if channels is not None:
        from .structured import prune_channels

        model = copy.deepcopy(model).eval()
        prune_channels(model, channels, calibration=calibration)
        seconds["channels"] = time.perf_counter() - t0

    # 1. measure (on the float model; the layers ``fixed`` names are left out of the search)
    layers = searchable_layers(model)
    if fixed_r is not None:
        layers = [n for n in layers if fixed_r.rule_for(n) is None]
    if not layers:
        raise CompressError("no layers left to search: fixed= names every Linear/Conv2d layer")
    if measured is None:
        sens = sensitivity(model, list(candidates), batches, calibration=calibration, method=measure_method,
                           base=base, cost=cost, layers=layers, progress=progress, **meas_options)  # fmt: skip
    else:
        sens = measured
        missing = [c for c in cands if c not in sens.candidates]
        how = (sens.info.get("method"), sens.info.get("base"), sens.info.get("cost", "kl"))
        if missing or sens.layers != layers or how != (measure_method, base, cost):
            raise CompressError(
                "the measured table does not fit this request: "
                + (f"candidates {', '.join(missing)} not measured" if missing else
                   f"its measure method is {how[0]!r} (here {measure_method!r}), base {how[1]!r} (here {base!r}), "
                   f"cost {how[2]!r} (here {cost!r})" if sens.layers == layers else
                   f"it covers {len(sens.layers)} layers, this search {len(layers)}")  # fmt: skip
            )
    seconds["measure"] = time.perf_counter() - t0 - seconds.get("channels", 0.0)
    # The fixed layers, rounded to nearest (data-free: a tied embedding and LM head given one scheme
    # keep sharing one quantized tensor); what the rest stores is this model less the searched weights.
    # When ``fixed`` offers several choices, each is tried: its own KL (only those layers rounded)
    # is added to the allocation's, and the least total (or, under max_loss alone, the fewest
    # bytes) wins.
    plans = []  # (option, fixed recipe, fixed bytes, fixed KL, allocation) per reachable option
    errors: list[tuple[float, CompressError]] = []
    for option, fixed_o in fixed_options:
        fixed_r = _fixed_recipe(fixed_o)
        rest = _round_fixed(model, fixed_r)
        weights = [rest.get_submodule(n).weight for n in layers]
        fixed_bytes = size_of(rest).total_bytes - sum(w.numel() * w.element_size() for w in weights)
        fixed_kl = 0.0 if option is None else output_kl(teacher, rest, batches)
        del rest, weights
        try:
            alloc = _allocate(sens, cands, ref_bytes, fixed_bytes, fixed_kl, target_ratio, target_bpw, max_loss,
                              hint=fixed_r is None and bool(driver._head_and_embedding_names(model)))  # fmt: skip
        except CompressError as e:
            errors.append((ref_bytes / (fixed_bytes + sum(min(sens.nbytes[n][c] for c in cands) for n in sens.layers)), e))
            continue
        plans.append((option, fixed_r, fixed_bytes, fixed_kl, alloc))
    if not plans:
        if len(errors) == 1:
            raise errors[0][1]
        reach, e = max(errors, key=lambda x: x[0])  # the option that reaches furthest names the limit
        raise CompressError(f"no fixed choice ({', '.join(o for o, _ in fixed_options)}) meets the budget; the nearest: {e}")
    sized = target_ratio is not None or target_bpw is not None  # a size budget: least loss within it
    key = (lambda p: p[4].loss + p[3]) if sized else (lambda p: p[4].nbytes + p[2])
    option, fixed_r, fixed_bytes, fixed_kl, alloc = min(plans, key=key)
    fixed_costs = {p[0]: p[3] for p in plans} if option is not None else {}
    rest = _round_fixed(model, fixed_r)
    recipe = alloc.recipe()
    if fixed_r is not None:
        recipe.rules = [*fixed_r.rules, *recipe.rules]
    seconds["allocate"] = time.perf_counter() - t0 - seconds["measure"] - seconds.get("channels", 0.0)

    # 3. quantize
    t1 = time.perf_counter()
    out = driver.quantize(rest, alloc.recipe(), method=method, calibration=calibration, progress=progress,
                          **options)  # fmt: skip
    seconds["quantize"] = time.perf_counter() - t1
    kl_ptq = output_kl(teacher, out, batches)
    losses: list[float] = []
    block_errors: list[tuple[float, float]] = []

    # 4. distil
    if distill_steps or distill_blocks:
        t2 = time.perf_counter()
        if distill_data is None:
            data = calibration or batches
        else:  # a list (made at the checks above), or a callable drawing fresh batches (``i -> batch``,
            # e.g. new augmented crops per step)
            data = distill_data
        qat.prepare_qat(out)  # every quantized layer restarts from its post-training result
        if distill_blocks:
            bar = None
            if progress:
                from tqdm.auto import tqdm

                from ..calibrate import find_blocks

                bar = tqdm(total=len(find_blocks(out)[1]), desc="distil blocks", unit="block")
            try:
                block_errors = qat.fit_blocks(out, teacher, data, epochs=distill_blocks,
                                              on_block=None if bar is None else (lambda i, before, after: bar.update()))
            finally:
                if bar is not None:
                    bar.close()
        if distill_steps:
            losses = qat.fit(out, data, steps=distill_steps, teacher=teacher, lr=lr, step_lr=step_lr)
        qat.convert(out)
        seconds["distill"] = time.perf_counter() - t2
    kl = output_kl(teacher, out, batches) if losses or block_errors else kl_ptq
    nbytes = size_of(out).total_bytes
    if target_ratio is not None and ref_bytes / nbytes < target_ratio * (1 - 1e-9):  # a bug, not a user error
        warnings.warn(f"the compressed model is {ref_bytes / nbytes:.3f}x, short of the {target_ratio:g}x the "
                      "allocation met: please report it", stacklevel=2)  # fmt: skip
    return Compressed(out, recipe, alloc, sens, ref_bytes, nbytes, fixed_bytes, kl, kl_ptq, losses, seconds, method,
                      cands, option, fixed_costs, block_errors)
