"""The sequential calibration driver: feed calibration data block by block, in bounded memory.

For a model made of repeated blocks (a transformers decoder's ``model.layers``, an encoder's
``encoder.layer``, found as the largest ``nn.ModuleList`` of same-type blocks holding Linear
layers), the driver

1. runs the model on the calibration batches only up to the first block, keeping that block's
   inputs (hidden states and keyword arguments such as position embeddings and masks);
2. for each block: runs it (float) with hooks on its Linear layers that gather what the
   algorithm needs (input Hessian, per-channel mean and largest magnitudes); lets the
   algorithm move per-channel scales between a norm (or the previous linear) and the linears
   that read it (AWQ, SmoothQuant), checking numerically that the block still computes the same
   function; quantizes each layer; swaps the quantized modules in; and runs the *quantized*
   block to produce the next block's inputs, so later blocks see (and compensate) earlier
   blocks' error;
3. quantizes layers outside the blocks (or every layer of a model without blocks) from one more
   full forward pass with hooks.

Memory: one block's inputs and outputs for all batches, plus one block's statistics. On any
error every swapped module, and every tensor a scale was folded into, is restored.
Linear layers that read the same input (q/k/v, gate/up) share their statistics and scales.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .algorithms import moments, rtn
from .driver import _float_weight, _set_module, layer_errors

__all__ = ["run", "CalibrationError", "as_batches", "find_blocks", "Stats", "mean_output_error"]

class CalibrationError(ValueError):
    """Calibration data that cannot serve the method (missing, empty, malformed)."""


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first block."""


def as_batches(calibration: Iterable | None, method: str) -> list:
    """Calibration as a list of model inputs: tensors of token ids (``(T,)`` or ``(B, T)``),
    dicts of tensors as a tokenizer returns, or any positional input of a generic model."""
    if calibration is None:
        raise CalibrationError(
            f"method {method!r} needs calibration data: pass calibration= an iterable of model inputs "
            "(token-id tensors (B, T), or dicts from a tokenizer); lowbit.calibration_batches() makes them "
            "from the built-in calibration text"
        )
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    batches = []
    for b in calibration:
        if isinstance(b, Mapping) and not isinstance(b, dict):  # e.g. a tokenizer's BatchEncoding
            b = dict(b)
        if isinstance(b, torch.Tensor) and b.dim() == 1 and not b.is_floating_point():
            b = b.unsqueeze(0)
        if not isinstance(b, (torch.Tensor, dict, tuple, list)):
            raise CalibrationError(f"a calibration batch must be a tensor, a dict or a tuple, got {type(b).__name__}")
        batches.append(b)
    if not batches:
        raise CalibrationError(f"method {method!r} got empty calibration data")
    return batches


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"{tuple(batch.shape)} {str(batch.dtype).replace('torch.', '')}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def _call(model: nn.Module, batch) -> Any:
    """Run ``model`` on one batch; a batch the model cannot take (wrong shape, dtype, arguments)
    raises :class:`CalibrationError` saying what the batch was."""
    try:
        return _forward(model, batch)
    except (RuntimeError, TypeError, IndexError) as e:
        if type(e).__module__.startswith("lowbit"):
            raise
        raise CalibrationError(
            f"a calibration batch {_describe(batch)} does not fit the model ({type(e).__name__}: {e})"
        ) from e


def _forward(model: nn.Module, batch) -> Any:
    if isinstance(batch, dict):
        extra = {"use_cache": False} if _is_hf(model) else {}
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if _is_hf(model) and not batch.is_floating_point():
        return model(input_ids=batch, use_cache=False)
    return model(batch)


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "to_json_string")


def find_blocks(model: nn.Module, outermost: bool = False) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the largest ModuleList of same-type modules holding Linears
    (``outermost``: among those not inside another such list, e.g. a decoder's layers rather
    than one layer's experts; sizes count elements, so meta tensors serve)."""
    best = None
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < (1 if outermost else 2):
            continue  # (streaming: a decoder of one layer is still its chain of blocks)
        if outermost and any(name.startswith(o + ".") for o in lists):
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(isinstance(x, nn.Linear) for x in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    return None if best is None else (best[1], best[2])


@dataclass
class Stats:
    """What the algorithms need about one input tensor (shared by the linears that read it)."""

    k: int
    need: frozenset
    tokens: int = 0
    h: torch.Tensor | None = None  # (K, K) sum of x x^T
    h4: torch.Tensor | None = None  # (m, m) sum of x_i^2 x_j^2 over moments.fourth_moment_channels(K)
    absmax: torch.Tensor | None = None  # (K,)
    abssum: torch.Tensor | None = None  # (K,) sum of |x|

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.k).float()
        if not torch.isfinite(x).all():
            raise CalibrationError("calibration activations hold NaN/Inf; check the model and data")
        self.tokens += x.shape[0]
        if "hessian" in self.need:
            xx = x.t() @ x
            self.h = xx if self.h is None else self.h + xx
        if "fourth" in self.need:
            x2 = x[:, self.channels].square()
            f = x2.t() @ x2
            self.h4 = f if self.h4 is None else self.h4 + f
        if "absmax" in self.need:
            m = x.abs().amax(0)
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if "absmean" in self.need:
            a = x.abs().sum(0)
            self.abssum = a if self.abssum is None else self.abssum + a

    def merge(self, other: Stats) -> None:
        """Add the sums of ``other`` (gathered on other batches, e.g. another Ray worker)."""
        self.tokens += other.tokens
        for f in ("h", "h4", "abssum"):
            mine, theirs = getattr(self, f), getattr(other, f)
            if theirs is not None:
                setattr(self, f, theirs if mine is None else mine + theirs)
        if other.absmax is not None:
            self.absmax = other.absmax if self.absmax is None else torch.maximum(self.absmax, other.absmax)

    @property
    def channels(self) -> torch.Tensor:
        """The channels whose pairwise fourth moments are gathered (``moments.fourth_moment_channels``)."""
        return moments.fourth_moment_channels(self.k)

    @property
    def kurtosis(self) -> torch.Tensor | None:
        """``E[z_i^2 z_j^2]`` of the standardized inputs over :attr:`channels` ``(m, m)``
        (``moments.cokurtosis``); None when not gathered."""
        if self.h4 is None or self.h is None:
            return None
        n = max(self.tokens, 1)
        return moments.cokurtosis(self.h4 / n, self.h.diagonal()[self.channels] / n)

    @property
    def mean_abs(self) -> torch.Tensor:
        """``E|x|`` per input channel ``(K,)``."""
        return self.abssum / max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """``2 X X^T / n`` (the GPTQ objective's Hessian)."""
        return 2.0 * self.h / max(self.tokens, 1)

    def rescale(self, s: torch.Tensor) -> None:
        """Statistics of ``x / s`` (after a scale moved into the weights)."""
        if self.h is not None:
            self.h = self.h / s.unsqueeze(0) / s.unsqueeze(1)
        if self.h4 is not None:
            s2 = s[self.channels].square()
            self.h4 = self.h4 / s2.unsqueeze(0) / s2.unsqueeze(1)
        if self.absmax is not None:
            self.absmax = self.absmax / s
        if self.abssum is not None:
            self.abssum = self.abssum / s


class _Restore:
    """Undo log: modules swapped and tensors changed in place, restored on error."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: list[tuple[str, nn.Module]] = []
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []

    def swap(self, name: str, new: nn.Module) -> None:

        self.modules.append((name, self.model.get_submodule(name)))
        _set_module(self.model, name, new)

    def save(self, t: torch.Tensor) -> None:
        self.tensors.append((t, t.detach().clone()))

    def rollback(self, mark: int) -> None:
        """Put back the tensors saved since ``len(self.tensors)`` was ``mark``."""
        with torch.no_grad():
            for t, old in reversed(self.tensors[mark:]):
                t.copy_(old)
        del self.tensors[mark:]

    def undo(self) -> None:

        with torch.no_grad():
            for t, old in reversed(self.tensors):
                t.copy_(old)
        for name, old in reversed(self.modules):
            _set_module(self.model, name, old)


class _Replay(nn.Module):
    """A streamed block's stand-in for the pass that calibrates the layers after the blocks:
    hands its hidden-state input on, or (the last block) returns the quantized block's recorded
    outputs, one per call, in the block's own return type."""

    def __init__(self, outputs: list | None, as_tuple: bool) -> None:
        super().__init__()
        self.outputs, self.as_tuple, self.calls = outputs, as_tuple, 0

    def forward(self, *args, **kwargs):
        h = _hidden_in(args, kwargs)
        if self.outputs is not None:
            h = self.outputs[self.calls % len(self.outputs)]
            self.calls += 1
        return (h,) if self.as_tuple else h


def _block_outputs(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_block(block: nn.Module, inputs: list, masks: list | None = None, current: list | None = None,
               keep: Callable | None = None) -> list:  # fmt: skip
    """The block's outputs on every input; with ``current``, ``current[0]`` is set to each
    batch's token mask (``masks``) before its call, for hooks that gather statistics.
    ``keep(i, output)``: what is kept of output ``i`` (None: nothing; a copy spilled to disk)."""
    outs = []
    for i, (args, kwargs) in enumerate(inputs):
        if current is not None:
            current[0] = masks[i] if masks is not None else None
        out = _block_outputs(block(*args, **kwargs))
        outs.append(out if keep is None else keep(i, out))
    return outs


def _token_mask(batch) -> torch.Tensor | None:
    """The real (not padding) tokens of a tokenizer batch: its ``attention_mask`` as bool
    ``(B, T)``; None for batches without one (every position counts)."""
    m = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(m, torch.Tensor) and m.dim() == 2 and not m.is_floating_point():
        return m.bool() if not bool(m.bool().all()) else None
    return None


def _real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of a layer input ``x (B, T, ...)`` at real tokens ``(n, ...)``: padding positions
    carry activations no inference output depends on, and would bias every statistic."""
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask]


def _with_hidden(inp: tuple, hidden: torch.Tensor) -> tuple:
    args, kwargs = inp
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextlib.contextmanager
def _hooks(mods: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: fn(n, a[0])) for n, m in mods.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _groups(block: nn.Module, inputs: list, names: dict[str, nn.Module]) -> tuple[list[list[str]], dict[str, str]]:
    """Linears of ``block`` grouped by the input tensor they read, in call order, and for each
    group (keyed by its first layer) the module whose output that input is, if any."""
    first = inputs[0]
    seen: dict[int, str] = {}
    order: list[list[str]] = []
    producers: dict[int, str] = {}
    alive: list = []  # keeps every tensor seen referenced, so no id is reused during the pass
    handles = []

    def produced(n: str, out) -> None:
        alive.append(out)
        producers.setdefault(id(out), n)

    for n, m in block.named_modules():
        if n:
            handles.append(m.register_forward_hook(lambda m, a, o, n=n: produced(n, o)))

    def pre(n: str, x: torch.Tensor) -> None:
        alive.append(x)
        key = id(x)
        if key in seen:
            next(g for g in order if g[0] == seen[key]).append(n)
        else:
            seen[key] = n
            order.append([n])
            # the producer of x ran before this call, so its output id is known
            src[n] = producers.get(key)

    src: dict[str, str | None] = {}
    try:
        with _hooks(names, pre):
            block(*first[0], **first[1])
    finally:
        for h in handles:
            h.remove()
    grouped = {n for g in order for n in g}
    order += [[n] for n in names if n not in grouped]  # not called on this batch: alone, no producer
    return order, {g[0]: src.get(g[0]) for g in order}


def provenance(calibration) -> dict:
    """What a model was calibrated on, for its manifest (``model.lowbit_calibration``): the
    ``provenance`` of :func:`lowbit.calibration_batches`' list (domains or a text's SHA-256, split,
    sizes, seed), or only the kind of iterable a caller passed (it may be a one-shot generator, so
    it is not read again)."""
    given = getattr(calibration, "provenance", None)
    return dict(given) if isinstance(given, dict) else {"source": f"caller's {type(calibration).__name__}"}


def run(
    model: nn.Module,
    todo: list,
    algo,
    calibration,
    options: dict,
    *,
    progress: bool,
    method: str,
    make_module,
    observer: str = "minmax",
    bias_correction: bool | None = None,
    stream=None,
) -> list:
    """Quantize the ``todo`` layers ``(name, module, kind, scheme, why)`` with a calibrated
    ``algo``; swap the quantized modules into ``model`` and return ``[(name, new module)]``.

    Layers with static activation schemes also get ``(act_scale, act_zero)`` from an ``observer``
    (:mod:`lowbit.observers`) of their inputs: the inputs the calibration data produces after
    the earlier blocks were quantized, and after any scale folding in the layer's own block.
    ``make_module(mod, kind, qw, act)`` builds each quantized module (``act``: those two or None).

    ``bias_correction`` then runs the calibration data once more through the quantized model and
    moves each static-activation layer's mean output error into its bias (:func:`mean_output_error`):
    ``None`` corrects the layers that have a bias, ``True`` also gives one to those without,
    ``False`` corrects none.

    ``stream``: the model is a skeleton on the meta device whose values a
    :class:`lowbit.checkpoint.BlockStream` reads block by block (``load``, ``outside``) and
    to which each finished block is handed (``block_done``, ``rest_done``) to be written and
    freed; the blocks are taken as a chain without running the whole model, layers outside the
    blocks are calibrated on the last block's outputs replayed, and the returned list is empty.
    """
    needs_data = method if algo.uses_calibration else f"{method} with static activations"
    batches = as_batches(calibration, needs_data)
    _check_lengths(model, batches)
    masks = [_token_mask(b) for b in batches]  # statistics skip padding tokens
    want = {name: (mod, kind, scheme) for name, mod, kind, scheme, _ in todo}
    restore = _Restore(model)
    done: list[tuple[str, nn.Module]] = []
    # Calibration sees the model as inference does (dropout off, BatchNorm on running statistics),
    # whatever mode it came in; each module's mode is put back afterwards.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    sequential = bool(options.get("sequential", False))  # (check_options refused it for methods without it)
    try:
        with torch.no_grad():
            found = find_blocks(model, outermost=stream is not None)
            if stream is None and found is not None and not _sequential(model, found[1], batches[0]):
                found = None  # e.g. a mixture of experts' expert list: not a chain; one pass for all
            if stream is not None and found is None:
                raise CalibrationError("streaming calibration needs a model made of repeated blocks; this one has none")
            remaining = dict(want)
            # Embeddings read token ids, not activations: no statistics apply; they are rounded.
            for name in [n for n, (_, kind, _) in want.items() if kind == "embedding"]:
                mod, kind, scheme = remaining.pop(name)
                if stream is not None:
                    stream.load(mod)
                new = make_module(mod, kind, rtn.quantize_weight(mod.weight, scheme, name=f"{name}.weight"), None)
                new.method = "rtn"
                restore.swap(name, new)
                done.append((name, new))
            if stream is not None:
                stream.take(done)
                done.clear()
            if found is not None:
                prefix, blocks = found
                with stream.outside(model, blocks) if stream is not None else contextlib.nullcontext():
                    inputs = _capture(model, blocks, batches)
                keep = None
                if stream is not None and getattr(stream, "ray", None) is not None:
                    from .distributed import RayInputs

                    inputs = RayInputs(stream.ray[0], inputs, masks, stream.ray[1])
                    stream.opened.append(inputs)
                elif stream is not None and stream.spills(sum(_hidden_in(*inp).nbytes for inp in inputs)):
                    keep = lambda i, out: stream.spill(out)  # noqa: E731
                    inputs = [_with_hidden(inp, stream.spill(_hidden_in(*inp))) for inp in inputs]
                it = range(len(blocks))
                if progress:
                    from tqdm.auto import tqdm

                    it = tqdm(it, desc=f"calibrate ({method})", unit="block")
                replay = None
                unscaled: list[str] = []
                for i in it:
                    bname = f"{prefix}.{i}"
                    block = blocks[i]
                    if stream is not None:
                        stream.load(block)
                    layers = {n: remaining.pop(n) for n in list(remaining) if n.startswith(bname + ".")}
                    if layers:
                        _quantize_block(block, bname, inputs, layers, algo, options, restore, done, make_module,
                                        observer, sequential=sequential, masks=masks, unscaled=unscaled)  # fmt: skip
                    if i + 1 < len(blocks) and _distributed(inputs):
                        inputs.advance(block)
                    elif i + 1 < len(blocks):  # the quantized block's outputs feed the next block
                        inputs = [_with_hidden(inp, out) for inp, out in zip(inputs, _run_block(block, inputs, keep=keep))]
                    elif stream is not None and remaining:  # the layers after the blocks read these
                        args, kwargs = inputs[0]
                        outs = inputs.outputs(block) if _distributed(inputs) else _run_block(block, inputs, keep=keep)
                        replay = (outs, isinstance(block(*args, **kwargs), (tuple, list)))
                    if stream is not None:
                        stream.block_done(bname, block, done)
                        done.clear()
                        restore.modules.clear()  # (a streamed model is not restored: the output is not written)
                        restore.tensors.clear()
                del inputs
                if unscaled:
                    warnings.warn(
                        f"{method}: {len(unscaled)} group(s) of linears got no activation scales, because folding "
                        "them into the module before changed the block's output (that input also feeds another "
                        "path, e.g. a post-norm residual); they are quantized unscaled: "
                        + ", ".join(unscaled[:4]) + (", ..." if len(unscaled) > 4 else ""),
                        stacklevel=3,
                    )
            if remaining and stream is not None:
                originals = list(blocks)
                for i in range(len(blocks)):
                    blocks[i] = _Replay(replay[0] if i == len(blocks) - 1 else None, replay[1])
                try:
                    with stream.outside(model, None):
                        for n in remaining:  # (a layer no batch reaches still needs its weight)
                            stream.load(model.get_submodule(n))
                        _quantize_rest(model, batches, masks, remaining, algo, options, restore, done,
                                       make_module, observer)  # fmt: skip
                        stream.take(done)
                        done.clear()
                finally:
                    for i, b in enumerate(originals):
                        blocks[i] = b
            elif remaining:
                if algo.smooth is not None and found is None:
                    warnings.warn(
                        f"{algo.name}: the model has no chain of repeated blocks (a ModuleList of two or more "
                        "same-type modules holding Linears), where activation scales are searched and folded; "
                        "its layers are quantized without them", stacklevel=3)  # fmt: skip
                _quantize_rest(model, batches, masks, remaining, algo, options, restore, done, make_module, observer)
            if bias_correction is not False and stream is None:  # (the stream's caller refused it)
                floats = dict(restore.modules)
                targets = {
                    n: (new, floats[n])
                    for n, new in done
                    if new.scheme.act_static and (bias_correction or new.bias is not None)
                }
                corrections = mean_output_error(model, batches, targets) if targets else {}  # (a full pass)
                for n, delta in corrections.items():
                    q = targets[n][0]
                    base = q.bias.detach() if q.bias is not None else torch.zeros_like(delta)
                    # a new Parameter, not an in-place add: kernels cache what they derive from the bias
                    q.bias = nn.Parameter(base + delta, requires_grad=False)
    except BaseException:
        restore.undo()
        raise
    finally:
        for m, training in modes:
            m.train(training)
        olds = dict(restore.modules)
        for name, new in done:  # swapped in after the modes were saved: the mode of the one it replaced
            if name in olds:
                new.train(olds[name].training)
    return done


def _distributed(inputs) -> bool:
    """Whether the calibration inputs live on Ray workers (:class:`lowbit.distributed.RayInputs`)."""
    return not isinstance(inputs, list)


def _check_lengths(model: nn.Module, batches: list) -> None:
    """Token batches longer than the model's context, or with token ids outside its vocabulary
    (calibration text tokenized for another model), are an error before any work starts."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    try:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # (transformers models without a token embedding)
        emb = None
    vocab = getattr(emb, "num_embeddings", None)
    for b in batches:
        ids = b.get("input_ids") if isinstance(b, dict) else b
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or not ids.numel():
            continue
        if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise CalibrationError(
                f"calibration token ids span {int(ids.min())}..{int(ids.max())}; the model's vocabulary is "
                f"0..{vocab - 1}: was the text tokenized with another model's tokenizer?"
            )
        if limit and ids.shape[-1] > limit:
            raise CalibrationError(
                f"calibration sequences of {ids.shape[-1]} tokens exceed the model's context of {limit}; "
                "use a shorter seqlen"
            )


def _hidden_in(args: tuple, kwargs: dict):
    return args[0] if args else kwargs.get("hidden_states")


def _sequential(model: nn.Module, blocks: nn.ModuleList, batch) -> bool:
    """Whether ``blocks`` form a chain on ``batch``: each called once, in order, each one's
    hidden-state input equal to the previous one's output (what block-by-block calibration
    assumes). Parallel modules (a mixture of experts' experts) and blocks called twice do not."""
    calls: list[tuple[int, Any, Any]] = []
    ins: dict[int, Any] = {}

    def pre(i, args, kwargs):
        ins[i] = _hidden_in(args, kwargs)

    def post(i, out):
        calls.append((i, ins.get(i), _block_outputs(out)))

    handles = [b.register_forward_pre_hook(lambda m, a, k, i=i: pre(i, a, k), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda m, a, o, i=i: post(i, o)) for i, b in enumerate(blocks)]
    try:
        _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    if [c[0] for c in calls] != list(range(len(blocks))):
        return False
    for (_, _, prev_out), (_, cur_in, _) in zip(calls, calls[1:]):
        if not (isinstance(prev_out, torch.Tensor) and isinstance(cur_in, torch.Tensor)):
            return False
        if cur_in is not prev_out and not (cur_in.shape == prev_out.shape and torch.equal(cur_in, prev_out)):
            return False
    return True


def _capture(model: nn.Module, blocks: nn.ModuleList, batches: list) -> list:
    """(args, kwargs) of the first block's call, for every calibration batch."""
    captured = []

    def hook(mod, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                _call(model, b)
            except _Stop:
                continue
            raise CalibrationError("the model's forward never reached its first block")
    finally:
        h.remove()
    return captured


def _needs(algo) -> frozenset:
    return frozenset(algo.needs)


def _observers(layers: dict, prefix: str, observer: str) -> dict:
    """An activation observer for each static-activation layer of ``layers`` (short names)."""
    from .observers import make_observer

    return {full[len(prefix) :]: make_observer(observer) for full, (_m, _k, s) in layers.items() if s.act_static}


def _quantize_block(block, bname, inputs, layers, algo, options, restore, done, make_module, observer, *,
                    sequential: bool = False, masks: list | None = None, unscaled: list | None = None) -> None:  # fmt: skip
    """Quantize ``layers`` of ``block``. By default every layer's statistics come from one float
    pass of the block. ``sequential`` (GPTQ's "true sequential"): each group of layers reading
    one input gets its statistics only after the groups before it in the block are quantized,
    so it sees their rounding. ``masks``: each input's real tokens (statistics skip padding).
    ``unscaled``: collects the groups whose scales could not be folded (AWQ, SmoothQuant)."""
    unscaled = [] if unscaled is None else unscaled
    mods = {n: block.get_submodule(n[len(bname) + 1 :]) for n in layers}
    local = {n[len(bname) + 1 :]: m for n, m in mods.items()}
    order, producers = _groups(block, inputs, local)
    needs = _needs(algo)
    stats = {g[0]: Stats(_in_features(local[g[0]]), needs) for g in order}
    group_of = {n: g[0] for g in order for n in g}
    obs = _observers(layers, bname + ".", observer)

    reached: set[str] = set()
    current: list = [None]  # the token mask of the batch being run

    def collect(n: str, x: torch.Tensor) -> None:
        if x.numel() == 0:  # a layer called with no rows (an expert no token was routed to)
            return
        reached.add(n)
        x = _real_tokens(x, current[0])
        if x.numel() == 0:
            return
        if n in stats and algo.needs and (not sequential or algo.smooth is not None):
            stats[n].add(_unfold_input(local[n], x))  # the first layer of each group collects for it
        if n in obs and algo.smooth is None:
            obs[n].update(x)

    if _distributed(inputs):  # the batches live on Ray workers: they send back the sums
        if obs:  # pragma: no cover - quantize_checkpoint refuses static schemes with Ray
            raise CalibrationError("static activation schemes calibrate in one process")
        wanted = {n: stats[n] for n in stats if algo.needs and (not sequential or algo.smooth is not None)}
        reached = inputs.stats(block, list(local), wanted)
        ref_out = [_block_outputs(block(*inputs[0][0], **inputs[0][1]))]  # (_change reads the first batch)
    else:
        with _hooks(local, collect):
            ref_out = _run_block(block, inputs, masks, current, keep=lambda i, out: out if i == 0 else None)  # (_change)
    unreached = {f"{bname}.{n}" for n in local if n not in reached}
    _refuse_unreached_static(layers, unreached)

    if algo.smooth is not None:
        _smooth_block(block, inputs, ref_out, order, producers, local, stats, layers, bname, algo, options, restore,
                      unscaled)  # fmt: skip
        if obs:  # the folds changed the inputs: observe them again
            def observe(n: str, x: torch.Tensor) -> None:
                x = _real_tokens(x, current[0])
                if x.numel():
                    obs[n].update(x)

            with _hooks({n: local[n] for n in obs}, observe):
                _run_block(block, inputs, masks, current)

    def quantize(full: str) -> None:
        _mod, kind, scheme = layers[full]
        short = full[len(bname) + 1 :]
        with layer_errors(full):
            new = _quantize_one(mods[full], full, kind, scheme, stats[group_of[short]], obs.get(short), algo, options,
                                make_module, unreached)  # fmt: skip
        restore.swap(full, new)
        done.append((full, new))

    if not sequential:
        for full in layers:
            quantize(full)
        return
    for group in order:
        todo = [f"{bname}.{n}" for n in group if f"{bname}.{n}" in layers]
        if not todo:
            continue
        first = group[0]
        # the Hessian gathered again here, on inputs that have seen the earlier groups' rounding
        st = Stats(_in_features(local[first]), needs - {"absmean"})
        if _distributed(inputs):
            inputs.stats(block, [first], {first: st}, stop=first)
        for b, inp in enumerate(inputs if not _distributed(inputs) else []):
            mask = masks[b] if masks is not None else None
            x = _input_of(block, first, inp)
            if x is None or (x := _real_tokens(x, mask)).numel() == 0:
                continue
            st.add(_unfold_input(local[first], x))
        stats[first] = st
        for full in todo:
            quantize(full)


def _input_of(block: nn.Module, name: str, inp: tuple) -> torch.Tensor | None:
    """The input of ``block``'s submodule ``name`` on the block call ``inp`` (its first call),
    the pass stopped there; None if the call never reaches it."""
    got: list[torch.Tensor] = []

    def hook(m, a):
        got.append(a[0])
        raise _Stop

    h = block.get_submodule(name).register_forward_pre_hook(hook)
    try:
        block(*inp[0], **inp[1])
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0] if got else None


def _smooth_block(block, inputs, ref_out, order, producers, local, stats, layers, bname, algo, options, restore,
                  unscaled: list) -> None:  # fmt: skip
    """Move per-channel scales into each group's linears from the module feeding them; groups
    whose fold would change the block's function are appended to ``unscaled``."""
    from .models.hf import fold_target

    for group in order:
        if not all(f"{bname}.{n}" in layers for n in group):
            continue  # a skipped layer shares this input: scaling would change it
        if not all(isinstance(local[n], nn.Linear) for n in group):
            continue  # scales fold into (out, in) Linear weights only
        if stats[group[0]].tokens == 0:
            continue  # the calibration data never reached this group: nothing to scale by
        target = fold_target(block, group, producers.get(group[0]))
        if target is None:
            continue
        weights = [local[n].weight.detach() for n in group]
        scheme = layers[f"{bname}.{group[0]}"][2]
        with layer_errors(f"{bname}.{group[0]}"):
            s = algo.smooth(weights, stats[group[0]], scheme, **options)
        if s is None:
            continue
        mark = len(restore.tensors)
        for t in target.tensors():
            restore.save(t)
        for n in group:
            restore.save(local[n].weight)
            local[n].weight.mul_(s.unsqueeze(0))
        target.divide(s)
        # a fold must leave the block's function unchanged (it is exact up to rounding); one that
        # does not (the input also feeds a path besides these linears, e.g. a post-norm block's
        # residual, or a norm of another form) is undone and the group quantized unscaled
        err = _change(block, inputs, ref_out)
        if err > _fold_tolerance(weights[0].dtype):
            restore.rollback(mark)
            unscaled.append(f"{bname}.{group[0]} ({err:.1e})")
            continue
        stats[group[0]].rescale(s)
    err = _change(block, inputs, ref_out)
    if err > _fold_tolerance(next(block.parameters()).dtype):  # pragma: no cover - each fold was checked alone
        raise CalibrationError(
            f"{bname}: folding activation scales changed the block's output by {err:.2e} (relative); "
            "this architecture's norms or layers do not fold as lowbit assumes"
        )


def _fold_tolerance(dtype: torch.dtype) -> float:
    """The largest relative change of a block's output a scale fold may cause: 1e-3, or, in a
    16-bit model, twice the dtype's epsilon (storing the scaled weights rounds each to the dtype,
    which moves bf16 outputs by a few 1e-3; a fold that breaks the function moves them by far more)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-3, 2.0 * eps)


def _change(block: nn.Module, inputs: list, ref_out: list) -> float:
    """Relative change of the block's output on the first calibration batch."""
    check = _run_block(block, inputs[:1])
    ref = ref_out[0]
    return float((check[0] - ref).norm() / ref.norm().clamp_min(1e-12))


def _quantize_rest(model, batches, masks, remaining, algo, options, restore, done, make_module, observer) -> None:
    """Layers outside the blocks (or all layers of a model without blocks): one forward with hooks."""
    mods = {n: model.get_submodule(n) for n in remaining}
    stats = {n: Stats(_in_features(m), _needs(algo)) for n, m in mods.items()}
    obs = _observers(remaining, "", observer)

    reached: set[str] = set()
    current: list = [None]  # the token mask of the batch being run

    def collect(n: str, x: torch.Tensor) -> None:
        if x.numel() == 0:  # a layer called with no rows (an expert no token was routed to)
            return
        reached.add(n)
        x = _real_tokens(x, current[0])
        if x.numel() == 0:
            return
        if algo.needs:  # (rtn with static activations needs only the observers)
            stats[n].add(_unfold_input(mods[n], x))
        if n in obs:
            obs[n].update(x)

    with _hooks(mods, collect):
        for b, mask in zip(batches, masks):
            current[0] = mask
            _call(model, b)
    unreached = {n for n in mods if n not in reached}
    _refuse_unreached_static(remaining, unreached)
    for n, (_mod, kind, scheme) in remaining.items():
        with layer_errors(n):
            new = _quantize_one(mods[n], n, kind, scheme, stats[n], obs.get(n), algo, options, make_module, unreached)
        restore.swap(n, new)
        done.append((n, new))


def _refuse_unreached_static(layers: dict, unreached: set[str]) -> None:
    """Static activation scales come only from data: layers the calibration never reached refuse."""
    bad = sorted(n for n in unreached if layers[n][2].act_static)
    if bad:
        raise CalibrationError(
            f"the calibration data never reached {len(bad)} layer(s) with static activations, so they have no "
            f"activation range: {', '.join(bad[:8])}{', ...' if len(bad) > 8 else ''}. Pass calibration batches "
            "that exercise them (e.g. tokens routed to every expert), or give them a weight-only or dynamic scheme"
        )


def _quantize_one(mod, name, kind, scheme, st, obs, algo, options, make_module, unreached):
    """One layer's quantized module; a layer the calibration never reached is rounded to
    nearest (its weight is all there is to go on), with a warning naming it."""
    w = _float_weight(mod, kind)
    if name in unreached:
        warnings.warn(
            f"{name}: the calibration data never reached this layer; it is rounded to nearest instead of {algo.name}",
            stacklevel=2,
        )
        new = make_module(mod, kind, rtn.quantize_weight(w, scheme, name=f"{name}.weight"), None)
        new.method = "rtn"
        return new
    if st is not None and st.h is not None and 0 < st.tokens < st.k:
        warnings.warn(
            f"{algo.name}: {st.tokens} calibration tokens reached a layer with {st.k} input channels; with fewer "
            "tokens than channels E[x x^T] is singular and largely noise, and calibrated rounding can do worse "
            "than round to nearest ("
            + ("shrink=False: the plain sample moment is used as it is" if options.get("shrink") is False
               else "the moment is shrunk toward its diagonal, which pulls the noisy part out")
            + "). Calibrate on more tokens (lowbit's default: 64 x 512)", stacklevel=2)  # fmt: skip
    qw = algo.quantize_weight(w, scheme, name=f"{name}.weight", stats=st, **options)
    return make_module(mod, kind, qw, obs.qparams() if obs is not None else None)


def mean_output_error(
    model: nn.Module, batches: list, targets: dict[str, tuple[nn.Module, nn.Module]]
) -> dict[str, torch.Tensor]:
    """Each quantized layer's mean output error per output channel, for empirical bias correction.

    ``targets``: name -> (quantized module in ``model``, the float ``nn.Linear`` / ``nn.Conv2d``
    it stands for). One pass of the calibration ``batches`` through ``model``; each target's input
    ``x`` (as the quantized model produces it) also goes through the float module. Returns, for
    each target the data reached, the mean of ``float(x) - quantized(x)`` over every axis but the
    output channel (batch and tokens; batch, height and width for a Conv2d): ``(out_channels,)``
    float32. Added to the bias, it removes the systematic shift that weight *and* input rounding
    put into each channel -- large in depthwise convolutions, whose channels sum only nine products
    (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
    ICCV 2019, section 4.2, in its empirical form). Each layer's own error is measured on its
    quantized input, so corrections do not compound.
    """
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(targets, 0)
    current: list = [None]  # the token mask of the batch being run (padding does not count)

    def hook(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        ref = targets[name][1]
        d = (ref(x).float() - out.float()).detach()
        if not isinstance(ref, nn.Conv2d):
            d = _real_tokens(d, current[0])
            if d.numel() == 0:
                return
        ch = 1 if isinstance(ref, nn.Conv2d) else d.dim() - 1
        s = d.sum([i for i in range(d.dim()) if i != ch])
        sums[name] = s if name not in sums else sums[name] + s
        counts[name] += d.numel() // d.shape[ch]

    handles = [q.register_forward_hook(lambda m, a, o, n=n: hook(n, a[0], o)) for n, (q, _f) in targets.items()]
    try:
        with torch.no_grad():
            for b in batches:
                current[0] = _token_mask(b)
                _call(model, b)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def _in_features(mod: nn.Module) -> int:
    if isinstance(mod, nn.Conv2d):
        return mod.weight[0].numel()
    if isinstance(mod, nn.Linear):
        return mod.in_features
    return mod.weight.shape[0]  # transformers Conv1D stores (in, out)


def unfoldable(mod: nn.Module) -> bool:
    """Whether calibrated methods can collect ``mod``'s input statistics: not a grouped or
    depthwise convolution, whose input does not unfold into its weight's columns."""
    return not (isinstance(mod, nn.Conv2d) and mod.groups != 1)


def _unfold_input(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows matching its flattened weight's columns (convolutions unfolded)."""
    if isinstance(mod, nn.Conv2d):
        if not unfoldable(mod):
            raise CalibrationError("calibrated methods take grouped/depthwise convolutions only with rtn or hqq")
        cols = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, C*kh*kw, L)
        return cols.transpose(1, 2)
    return x
