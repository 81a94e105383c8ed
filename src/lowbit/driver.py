"""The quantization driver: walk a model, resolve each layer's scheme, quantize, swap modules.

Plumbing lives here; math lives in :mod:`lowbit.algorithms`. Every module that owns a weight is
accounted for in ``model.lowbit_layers`` (name -> :class:`LayerRecord`): quantized, kept in float
(and why), or unsupported. Nothing is skipped silently: a rule that names a module lowbit cannot
quantize raises :class:`UnsupportedModuleError`, and unsupported modules reached only by the
default scheme are listed in a warning and in ``lowbit inspect``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from . import kernels, swappable
from .algorithms import get_algorithm
from .nn import QuantConv2d, QuantEmbedding, QuantLinear, QuantModule
from .primitives import check_finite
from .recipe import Recipe
from .scheme import Scheme
from .sparse import SparseWeight

__all__ = ["quantize", "LayerRecord", "UnsupportedModuleError", "QuantizeError"]


class UnsupportedModuleError(TypeError):
    """A recipe rule asked for a scheme on modules lowbit cannot quantize."""


class QuantizeError(ValueError):
    """Bad arguments to :func:`quantize`."""


@dataclass
class LayerRecord:
    """What happened to one weight-owning module (shown by ``lowbit inspect``)."""

    name: str
    type: str
    status: str  # "quantized" | "kept" | "unsupported" | "folded" (a BatchNorm merged into a layer)
    scheme: str | None = None
    method: str | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def outside_inference_mode(fn):
    """Run ``fn`` with inference mode off: the modules and tensors it makes are ordinary ones,
    so a model quantized or loaded under ``torch.inference_mode()`` can later be trained
    (a bias made trainable, adapters on top) like any other."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def layer_errors(name: str):
    """Errors raised while working on layer ``name`` say so: the message gains the layer's name
    (same exception type) unless it already holds it."""
    try:
        yield
    except Exception as e:
        if name in str(e):
            raise
        try:
            new = type(e)(f"{name}: {e}")
        except Exception:  # an exception type that takes other arguments
            e.add_note(f"(while quantizing {name})")
            raise e from None
        raise new.with_traceback(e.__traceback__) from e


def _kind(mod: nn.Module) -> str | None:
    """The quantized module kind this float module maps to, or None (:mod:`lowbit.swappable`)."""
    if isinstance(mod, QuantModule):
        return None
    return swappable.kind_of(mod)


def _own_weights(mod: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters of ``mod`` itself (not its children) with 2 or more dimensions."""
    return [(n, p) for n, p in mod.named_parameters(recurse=False) if p is not None and p.dim() >= 2]


def _head_and_embedding_names(model: nn.Module) -> set[str]:
    """Names of embeddings, the output head, and any linear tied to an embedding's weight."""
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    embs = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    # the same storage (a meta skeleton has none: there the same tensor)
    emb_ptrs = {w.data_ptr() for w in embs if w.device.type != "meta"}
    emb_ids = {id(w) for w in embs}
    out = getattr(model, "get_output_embeddings", None)
    head = out() if callable(out) else None
    for n, m in model.named_modules():
        if m is head and head is not None:
            names.add(n)
        elif isinstance(m, nn.Linear) and (id(m.weight) in emb_ids or (m.weight.device.type != "meta"
                                                                       and m.weight.data_ptr() in emb_ptrs)):
            names.add(n)
        elif n.split(".")[-1] == "lm_head":
            names.add(n)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name``, and wherever else the module now there is registered (a module
    shared by two parents is one layer: it is swapped, and put back, everywhere at once)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules.get(child)
    others = []
    if old is not None:
        inside = {id(m) for m in new.modules()}  # a wrapper (QAT) holds the old module: leave that
        others = [(p, c) for _, p in model.named_modules(remove_duplicate=False) if id(p) not in inside
                  for c, m in p._modules.items() if m is old and (p, c) != (parent, child)]  # fmt: skip
    setattr(parent, child, new)
    for p, c in others:
        setattr(p, c, new)


class Corrected(NamedTuple):
    """A quantized (or pruned) weight with its low-rank correction ``A (N, r)``, ``B (r, K)``."""

    weight: object  # QWeight | SparseWeight
    a: torch.Tensor
    b: torch.Tensor


def _with_layer_options(algo, patterns: dict[str, dict], ranks: dict[str, int]):
    """``algo`` whose ``quantize_weight`` takes each layer's own pruning pattern (``patterns``:
    ``<layer>.weight`` -> ``{"sparsity": s}`` or ``{"nm": "2:4"}``, overriding the method's
    options; a pruning method's layers not listed stay dense) and fits a rank-``ranks[name]``
    correction ``A @ B`` to the listed weights' error ``W - deq(Q)``
    (:func:`lowbit.algorithms.lowrank.low_rank`), weighted by the calibration inputs' Hessian when
    the method gathers statistics (EoRA), plain SVD otherwise."""
    from .algorithms import lowrank

    def quantize_weight(w, scheme, *, name="weight", stats=None, **options):
        if name in patterns:
            options = {**options, "sparsity": None, "nm": None, **patterns[name]}
        elif algo.prunes and patterns and options.get("sparsity") is None and options.get("nm") is None:
            options = {**options, "sparsity": 0.0}  # other layers are pruned by their rules; this one is not
        q = algo.quantize_weight(w, scheme, name=name, stats=stats, **options)
        rank = ranks.get(name)
        if rank is None:  # convolutions, embeddings and layers without a rank take no correction
            return q
        err = w.detach().float() - q.dequantize(torch.float32).reshape(w.shape)
        a, b = lowrank.low_rank(err, getattr(stats, "hessian", None), rank=min(rank, *w.shape), name=name)
        return Corrected(q, a, b)

    needs = tuple(dict.fromkeys((*algo.needs, "hessian"))) if ranks and algo.uses_calibration else algo.needs
    return dataclasses.replace(algo, quantize_weight=quantize_weight, needs=needs)


def _layer_options(todo: list, recipe: Recipe, algo, method: str, correction_rank: int | None):
    """Each planned layer's pruning pattern and correction rank from its recipe rule (and
    ``correction_rank`` for every linear layer a rule gives no rank), checked: pruning only under a
    pruning method, corrections only for linear layers and below the weight's smaller side."""
    opts = {t[0]: recipe.options(t[0]) for t in todo}
    patterns = {f"{n}.weight": {k: o[k] for k in ("sparsity", "nm") if k in o} for n, o in opts.items()
                if "sparsity" in o or "nm" in o}  # fmt: skip
    embedded = [t[0] for t in todo if t[2] == "embedding" and f"{t[0]}.weight" in patterns]
    if embedded:
        raise QuantizeError(f"{embedded[0]}: pruning applies to linear and conv2d layers, not embeddings")
    if patterns and not algo.prunes:
        from .algorithms import ALGORITHMS

        raise QuantizeError(f"the recipe prunes {len(patterns)} layer(s) ({next(iter(patterns))[:-7]}, ...) but method "
                            f"{method!r} does not prune: use one of "
                            f"{', '.join(n for n, a in ALGORITHMS.items() if a.prunes)}")  # fmt: skip
    ranks = {}
    for name, mod, kind, _scheme, _why in todo:
        rank = opts[name].get("rank", correction_rank)
        if rank is None:
            continue
        if kind != "linear":
            if "rank" in opts[name]:
                raise QuantizeError(f"{name}: a low-rank correction applies to linear layers, not {type(mod).__name__}")
            continue
        shape = tuple(_float_weight(mod, kind).shape)
        if rank >= min(shape):
            raise QuantizeError(f"{name}: correction rank {rank} is not below the smaller side of {shape}: a "
                                "correction that large costs more than the float weight")  # fmt: skip
        ranks[f"{name}.weight"] = rank
    if correction_rank is not None and not ranks:
        raise QuantizeError("correction_rank applies to linear layers; the plan quantizes none")
    return patterns, ranks


def _swap(mod: nn.Module, kind: str, qw, method: str, act: tuple[float, int] | None = None) -> QuantModule:
    """The quantized module for ``mod`` from a :class:`QWeight` or a pruned
    :class:`~lowbit.sparse.SparseWeight` (run as dense codes, stored as mask + kept codes);
    ``act``: the static activations' (scale, zero point)."""
    dtype = str(mod.weight.dtype).replace("torch.", "")
    a = {} if act is None else {"act_scale": act[0], "act_zero": act[1]}
    if isinstance(qw, Corrected):
        qw, a["lowrank"] = qw.weight, (qw.a, qw.b)
    if isinstance(qw, SparseWeight):
        # a mask that removes nothing (a layer left dense under a pruning method) is pure overhead
        if qw.sparsity > 0:
            a["mask"] = qw.mask
        qw = qw.to_qweight()
    if kind == "linear":
        return QuantLinear(qw, mod.bias, method=method, orig_dtype=dtype, **a)
    if kind == "conv2d":
        conv = QuantConv2d.conv_args(mod)
        return QuantConv2d(qw, mod.bias, conv, method=method, orig_dtype=dtype, **a)
    return QuantEmbedding(qw, mod.padding_idx, method=method, orig_dtype=dtype, **a)


def _float_weight(mod: nn.Module, kind: str) -> torch.Tensor:
    if kind == "linear" and swappable.is_hf_conv1d(mod):
        return mod.weight.detach().t()
    return mod.weight.detach()


def _fold_batchnorms(model: nn.Module, todo: list, records: dict) -> Callable[[], None]:
    """Fold each BatchNorm that follows a layer about to be quantized (:mod:`lowbit.fold`), record
    it as "folded", and return a function that puts weights, biases and BatchNorms back."""
    from .fold import batchnorm_pairs, fold_batchnorm

    quantized = {t[0] for t in todo}
    pairs = [(layer, bn) for layer, bn in batchnorm_pairs(model) if layer in quantized]
    if not pairs:
        return lambda: None
    saved = []
    for layer, bn in pairs:
        mod = model.get_submodule(layer)
        bias = None if mod.bias is None else mod.bias.detach().clone()
        saved.append((layer, mod, mod.weight.detach().clone(), bias, bn, model.get_submodule(bn)))
    fold_batchnorm(model, pairs)  # refuses a training-mode BatchNorm before changing anything
    for layer, _mod, _w, _b, bn, bn_mod in saved:
        records[bn] = LayerRecord(bn, type(bn_mod).__name__, "folded", reason=f"folded into {layer}")

    def undo() -> None:
        with torch.no_grad():
            for _layer, mod, w, b, bn, bn_mod in saved:
                mod.weight.copy_(w)
                if b is None:
                    mod.bias = None
                else:
                    mod.bias.copy_(b)
                _set_module(model, bn, bn_mod)
                records.pop(bn, None)

    return undo


def _quantize_data_free(model, todo, algo, algo_options, method, records, progress) -> list:
    it = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc=f"quantize ({method})", unit="layer")
    # Tied weights (an embedding and its LM head) quantized with one scheme share one QWeight.
    done: dict[tuple, object] = {}
    swaps: list[tuple[str, QuantModule]] = []
    for name, mod, kind, scheme, why in it:
        w = _float_weight(mod, kind)
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), str(scheme))
        qw = done.get(key)
        with layer_errors(name):
            if qw is None:
                qw = done[key] = algo.quantize_weight(w, scheme, name=f"{name}.weight", **algo_options)
            swaps.append((name, _swap(mod, kind, qw, method)))
        records[name] = LayerRecord(name, type(mod).__name__, "quantized", str(scheme), method, why)
    for name, new in swaps:  # only now that every weight quantized without error
        _set_module(model, name, new)
    return swaps


def _plan(model: nn.Module, recipe: Recipe, allow_meta: bool = False) -> tuple[list, dict, set]:
    """What ``recipe`` does to each module of ``model``: the layers to quantize as ``(name, module,
    kind, scheme, why)``, a :class:`LayerRecord` for every other weight-owning module, and the
    names of embeddings/heads. Raises if a rule names a module lowbit cannot quantize; warns about
    unsupported modules the default would have reached. ``allow_meta``: weights on the meta
    device are expected (a streaming skeleton, whose weights are read layer by layer)."""
    if isinstance(model, QuantModule) or getattr(model, "lowbit_qat", False):
        raise QuantizeError(f"the model is already quantized: it is itself a {type(model).__name__} ({model.scheme})")
    if swappable.kind_of(model) is not None:
        raise QuantizeError(
            f"the model is itself a {type(model).__name__}: lowbit swaps layers inside a model in place, and a "
            f"module cannot replace itself; wrap it: nn.Sequential(layer)"
        )
    heads = _head_and_embedding_names(model)
    records: dict[str, LayerRecord] = dict(getattr(model, "lowbit_layers", {}) or {})
    todo: list[tuple[str, nn.Module, str, Scheme, str]] = []
    unsupported_named: list[str] = []
    unsupported_default: list[str] = []
    on_meta: list[str] = []  # weights with no values yet
    again: list[str] = []  # already quantized (or prepared for QAT) layers the spec reaches
    inside: list[str] = []  # QAT wrappers (lowbit.qat): their float layer is not planned again
    blocked = swappable.blocked(model)
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue  # (inside a QAT wrapper, or a layer being swapped whole: its parametrizations)
        if isinstance(mod, QuantModule) or getattr(mod, "lowbit_qat", False):
            if getattr(mod, "lowbit_qat", False):
                inside.append(name + ".")
            scheme, _why = recipe.resolve(name, embedding_or_head=name in heads)
            if scheme is not None:
                what = "prepared for QAT" if getattr(mod, "lowbit_qat", False) else "quantized"
                again.append(f"{name} ({what}: {mod.scheme}, {getattr(mod, 'method', 'qat')})")
            continue
        own = _own_weights(mod)
        kind, not_why = swappable.why_not(mod)
        if kind is not None and name in blocked:
            kind, not_why = None, blocked[name]
        if kind is None and not own and not not_why:
            continue
        scheme, why = recipe.resolve(name, embedding_or_head=name in heads)
        tname = type(mod).__name__
        if kind is None:
            reason = not_why or f"no quantized {tname} in lowbit; kept float"
            if scheme is not None:
                (unsupported_default if why == "default" else unsupported_named).append(f"{name} ({tname}: {reason})")
            records[name] = LayerRecord(name, tname, "unsupported", reason=reason)
            continue
        if scheme is None:
            records[name] = LayerRecord(name, tname, "kept", reason=why)
            continue
        if _float_weight(mod, kind).device.type == "meta" and not allow_meta:
            on_meta.append(name)
        todo.append((name, mod, kind, scheme, why))
        inside.append(name + ".")
    if again:
        raise QuantizeError(
            f"the model is already quantized: {len(again)} layer(s) the scheme would reach already have one: "
            + ", ".join(again[:4]) + (", ..." if len(again) > 4 else "")
            + ". lowbit quantizes float layers only: start again from the float model (reload it), "
            "call lowbit.convert() after QAT, or use a Recipe whose rules reach only the float layers"
        )
    if on_meta:
        raise QuantizeError(
            f"{len(on_meta)} layer(s) have their weights on the meta device, with no values to quantize: "
            f"{', '.join(on_meta[:4])}{', ...' if len(on_meta) > 4 else ''}; load real weights first"
        )
    if unsupported_named:
        raise UnsupportedModuleError(
            "recipe rules name modules lowbit cannot quantize: "
            + ", ".join(unsupported_named)
            + ". Supported: nn.Linear, transformers Conv1D, nn.Conv2d (zero padding), nn.Embedding, "
            "called by their parent and computing exactly what those classes compute."
        )
    if unsupported_default:
        warnings.warn(
            "lowbit keeps these modules in float: " + "; ".join(unsupported_default),
            stacklevel=5,  # the caller of quantize() (past _plan, quantize, no_grad's and our wrapper)
        )
    names = [n for n, _ in model.named_modules() if n]
    unused = [r.pattern for r in recipe.rules if not any(r.matches(n) for n in names)]
    if unused:  # a typo, or a regex written without "re:": say so rather than quietly doing less
        warnings.warn(
            f"recipe rule(s) {', '.join(map(repr, unused[:4]))}{', ...' if len(unused) > 4 else ''} match no module "
            f"of this {type(model).__name__} (patterns are shell globs; prefix a regular expression with 're:')",
            stacklevel=5,
        )
    return todo, records, heads


@outside_inference_mode
@torch.no_grad()
def quantize(
    model: nn.Module,
    spec: str | Scheme | Recipe,
    *,
    method: str = "rtn",
    calibration: Iterable | None = None,
    kernel: str = "auto",
    progress: bool = False,
    observer: str = "minmax",
    fold_bn: bool = True,
    bias_correction: bool | None = None,
    correction_rank: int | None = None,
    **options,
) -> nn.Module:
    """Quantize ``model`` in place by module swap and return it.

    Args:
        model: any ``nn.Module``; Linear, transformers Conv1D, Conv2d and (when a rule names
            them) Embedding layers are quantized.
        spec: a scheme string (``"w4g64"``), a :class:`Scheme`, or a :class:`Recipe` of
            per-layer rules.
        method: the algorithm (``lowbit.algorithms.ALGORITHMS``); ``"rtn"`` needs no data.
        calibration: an iterable of model inputs for methods that use data; data-free methods
            ignore it.
        kernel: ``"auto"`` (the fastest kernel that supports each layer) or a kernel name that
            every quantized linear layer must run (``lowbit.kernels.KERNELS``).
        progress: show a progress bar.
        observer: how static activation schemes (``w8a8-static``) choose each layer's input
            range from the calibration data: ``lowbit.observers.OBSERVERS`` (minmax, ema,
            percentile, mse, entropy). Static schemes need ``calibration`` whatever the method.
        fold_bn: fold each inference-mode BatchNorm that directly follows a quantized Conv2d or
            Linear (inside an ``nn.Sequential``) into that layer first, as deployment runs it
            (:mod:`lowbit.fold`); the BatchNorm becomes ``nn.Identity`` and is recorded "folded".
        bias_correction: for static activation schemes, one more pass over ``calibration``
            moves each layer's mean output error (weight and input rounding, per output
            channel) into its bias (Nagel et al. 2019). ``None`` (default): layers that have a
            bias (convolutions after BatchNorm folding do); ``True``: every static layer, adding a
            bias where there was none; ``False``: off.
        correction_rank: give each quantized linear layer a float16 low-rank correction of this
            rank, ``W ~ deq(Q) + A @ B`` with ``A (N, r)``, ``B (r, K)``, fitted to its weight error
            (after pruning, for the pruning methods) by truncated SVD weighted by the calibration
            inputs' Hessian for calibrated methods (EoRA, Liu et al. 2024), unweighted for
            data-free ones; counted in the layer's bytes. Convolutions and embeddings get none.
        **options: the method's options (``lowbit.algorithms.ALGORITHMS[method].options``):
            rtn ``clip="minmax" | "mse"``; gptq and awq+gptq ``damp`` (0.01), ``act_order``
            (True), ``clip="hessian" | "mse" | "minmax"`` (awq+gptq also ``"awq"``),
            ``sequential`` (each group of layers calibrated on the inputs the block's already
            quantized layers produce: GPTQ's "true sequential"); awq ``clip`` (True: the output-aware
            clip search); gptq, awq and awq+gptq ``shrink`` (True: ``E[x x^T]`` shrunk toward its
            diagonal by the sampling noise the token count and the activations' measured fourth moments
            imply, :func:`lowbit.algorithms.moments.shrink_to_diagonal`;
            False: the plain sample moment, as the papers); hqq ``importance``; smoothquant
            ``alpha`` (0.5); magnitude, wanda and sparsegpt ``sparsity`` or ``nm``.

    Every weight is quantized before any module is swapped, so an error (NaN weights, an
    unsupported layer named by a rule) leaves the model as it was. ``model.lowbit_layers``
    records what happened to every weight-owning module.
    """
    if not isinstance(model, nn.Module):
        raise QuantizeError(f"quantize() takes an nn.Module, got {type(model).__name__}")
    kernels.check_kernel_name(kernel)
    kernels.cpu.load_library()  # a bad LOWBIT_ISA fails here, before any work (cpu.IsaError)
    recipe = Recipe.coerce(spec)
    algo = get_algorithm(method)  # data-free methods ignore ``calibration``, as documented
    algo_options = algo.check_options(options)
    if correction_rank is not None and (not isinstance(correction_rank, int) or isinstance(correction_rank, bool)
                                        or correction_rank < 1):  # fmt: skip
        raise QuantizeError(f"correction_rank must be a positive integer, got {correction_rank!r}")
    from .observers import OBSERVERS

    if observer not in OBSERVERS:
        raise QuantizeError(f"unknown observer {observer!r}; observers: {', '.join(OBSERVERS)}")

    todo, records, heads = _plan(model, recipe)
    for scheme in sorted({t[3] for t in todo}, key=str):
        problem = algo.serves(scheme)
        if problem:
            raise QuantizeError(f"method {method!r} cannot serve scheme {scheme}: {problem}")
    static = any(t[3].act_static for t in todo)
    if bias_correction and not static:
        raise QuantizeError("bias_correction applies to static activation schemes (w8a8-static, ...); none is used")
    # Linear layers take dynamic (per-token) or static activations; convolutions static ones only
    # (one calibrated scale per input tensor); embeddings read token ids.
    embedded_acts = sorted(
        {t[0] for t in todo if t[3].act_bits and not (t[2] == "linear" or (t[2] == "conv2d" and t[3].act_static))}
    )
    if embedded_acts:
        raise QuantizeError(
            "activation quantization applies to linear layers (dynamic or -static) and conv2d layers "
            f"(-static only), not {', '.join(embedded_acts)}"
        )
    for name, mod, kind, _scheme, _why in todo:  # before any work, so the error names the layer
        check_finite(_float_weight(mod, kind), f"{name}.weight")
    patterns, ranks = _layer_options(todo, recipe, algo, method, correction_rank)
    if patterns or ranks:
        algo = _with_layer_options(algo, patterns, ranks)
    undo_folds = _fold_batchnorms(model, todo, records) if fold_bn else (lambda: None)
    try:
        if algo.uses_calibration or static:
            from . import calibrate

            # swaps block by block as it goes, and puts every module back if anything fails
            swaps = calibrate.run(model, todo, algo, calibration, algo_options, progress=progress, method=method,
                                  make_module=lambda mod, kind, qw, act, m=method: _swap(mod, kind, qw, m, act),
                                  observer=observer, bias_correction=bias_correction)  # fmt: skip
            model.lowbit_calibration = calibrate.provenance(calibration)
            info = {name: (type(mod).__name__, why) for name, mod, _, _, why in todo}
            for name, new in swaps:
                tname, why = info[name]
                records[name] = LayerRecord(name, tname, "quantized", str(new.scheme), new.method, why)
        else:
            swaps = _quantize_data_free(model, todo, algo, algo_options, method, records, progress)
    except BaseException:
        undo_folds()
        raise
    head_quantized = any(name in heads for name, _ in swaps)
    kernels.use_kernel(model, kernel)  # after all swaps, so shared weights convert once
    model.lowbit_layers = records
    if head_quantized:
        # A quantized head or embedding no longer shares a float tensor with its twin.
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return model

