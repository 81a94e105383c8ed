"""Structured pruning: remove whole channels so that the tensors (and the model's config) shrink.

A *channel group* is a set of layers whose output channels (rows) are the input channels of one
reading layer: a transformer's feed-forward block (Llama-style ``gate_proj``/``up_proj`` ->
``down_proj``, BERT-style ``intermediate.dense`` -> ``output.dense``; the width is the config's
``intermediate_size``), or, in a model without a transformers config, a chain found by tracing
(``torch.fx``) from a Linear/Conv2d through element-wise activations, pooling, dropout,
BatchNorm and depthwise convolutions (sliced with it), optionally a ``flatten(1)``, to the one
Linear/Conv2d that reads it (MobileNetV2's expansion channels: expand -> depthwise -> project).
Residual connections and layers used twice end a chain (those channels are shared, not owned).

:func:`prune_channels` scores every channel (:func:`lowbit.algorithms.pruning.channel_scores`:
the output energy its removal takes from the reading layer, weighted by the calibration inputs'
mean squares when given), keeps the best ``1 - fraction`` of each group (a multiple of
``multiple``; the same count in every group a config records, since one ``intermediate_size``
describes them all) and replaces the layers with smaller ones. The original weight shapes are
recorded in ``model.lowbit_resized``; the saved file marks those modules ``"resized"`` so that a
model without a config still loads into its original skeleton.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.pruning import PruningError, channel_scores, channels_kept

__all__ = ["ChannelGroup", "channel_groups", "prune_channels", "recalibrate_batchnorm"]


@dataclass
class ChannelGroup:
    """``producers`` (module names) make ``channels`` channels that ``reader`` takes as ``block``
    consecutive input columns each; ``between``: channel-wise modules (BatchNorm) sliced too;
    ``config_key``: the config attribute that records the width, if any."""

    producers: tuple[str, ...]
    reader: str
    channels: int
    block: int = 1
    between: tuple[str, ...] = ()
    config_key: str | None = None
    kept: list[int] = field(default_factory=list)


_PASS_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.tanh, torch.sigmoid, F.leaky_relu, F.dropout,
                   torch.max_pool2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.hardswish}  # fmt: skip
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish, nn.Dropout,
                 nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)  # fmt: skip


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _prunable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _transformer_groups(model: nn.Module) -> list[ChannelGroup]:
    out = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        kids = dict(mod.named_children())
        if all(isinstance(kids.get(k), nn.Linear) for k in ("gate_proj", "up_proj", "down_proj")):
            out.append(ChannelGroup((f"{prefix}gate_proj", f"{prefix}up_proj"), f"{prefix}down_proj",
                                    kids["down_proj"].in_features, config_key="intermediate_size"))  # fmt: skip
        inter, outp = kids.get("intermediate"), kids.get("output")
        if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(outp, "dense", None), nn.Linear):
            if inter.dense.out_features == outp.dense.in_features:
                out.append(ChannelGroup((f"{prefix}intermediate.dense",), f"{prefix}output.dense",
                                        outp.dense.in_features, config_key="intermediate_size"))  # fmt: skip
    return out


def _traced_groups(model: nn.Module) -> list[ChannelGroup]:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: no chains found this way
        raise PruningError(f"structured pruning traces the model to find its channel chains, and "
                           f"{type(model).__name__} does not trace ({type(e).__name__}: {e})") from None  # fmt: skip
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _prunable(mods[node.target]) or calls[node.target] != 1:
            continue
        producer = mods[node.target]
        cur, flat, between = node, False, []
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break
            u = users[0]
            if u.args[:1] != (cur,):  # the channel tensor must be the first argument
                break
            if u.op == "call_module":
                m = mods[u.target]
                if calls[u.target] != 1:
                    break
                if _prunable(m):
                    c = _out_channels(producer)
                    if isinstance(m, nn.Conv2d) and not flat and m.in_channels == c:
                        out.append(ChannelGroup((node.target,), u.target, c, 1, tuple(between)))
                    elif isinstance(m, nn.Linear) and (flat or isinstance(producer, nn.Linear)) and m.in_features % c == 0:
                        out.append(ChannelGroup((node.target,), u.target, c, m.in_features // c, tuple(between)))
                    break
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not flat:
                    between.append(u.target)
                elif _depthwise(m) and not flat:  # one filter per channel: sliced with it
                    between.append(u.target)
                elif not isinstance(m, _PASS_MODULES):
                    break
            elif u.op == "call_function" and u.target in _PASS_FUNCTIONS:
                pass
            elif u.op == "call_method" and u.target in _PASS_METHODS:
                pass
            elif (u.op == "call_function" and u.target is torch.flatten) or (u.op == "call_method" and u.target == "flatten"):
                start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
                if start != 1 or flat or isinstance(producer, nn.Linear):
                    break
                flat = True
            else:
                break
            cur = u
    return out


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The channel groups of ``model`` (module docstring): its transformer feed-forward blocks when
    it has a config, else the chains a trace finds. Raises :class:`PruningError` when none."""
    config = getattr(model, "config", None)
    groups = _transformer_groups(model) if config is not None else _traced_groups(model)
    if not groups:
        raise PruningError(f"no channel groups lowbit can prune in this {type(model).__name__}: structured pruning "
                           "handles transformer feed-forward blocks (Llama, BERT) and, in models without a config, "
                           "Linear/Conv2d chains through activations, pooling and flatten")  # fmt: skip
    if config is not None:
        width = getattr(config, "intermediate_size", None)
        odd = [g.reader for g in groups if g.config_key and g.channels != width]
        if odd:
            raise PruningError(f"{odd[0]} reads {groups[0].channels} channels but config.intermediate_size is {width}: "
                               "the config cannot express this model's widths")  # fmt: skip
    return groups


def _input_moments(model: nn.Module, readers: dict[str, nn.Module], calibration: list
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Mean and mean square of each reader's input columns (Linear: the last dimension; Conv2d: per
    channel over batch and positions) over ``calibration``; a tokenizer batch's padding positions
    (its ``attention_mask``) are left out."""
    from ..calibrate import _call, _hooks, _real_tokens, _token_mask

    sums: dict[str, list] = {}
    counts: dict[str, int] = dict.fromkeys(readers, 0)
    current: list = [None]  # the token mask of the batch being run

    def collect(name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        if isinstance(readers[name], nn.Conv2d):
            x2 = x.transpose(0, 1).reshape(x.shape[1], -1).T
        else:
            x2 = _real_tokens(x, current[0]).reshape(-1, x.shape[-1])
        s = sums.setdefault(name, [0, 0])
        s[0], s[1] = s[0] + x2.sum(0), s[1] + x2.pow(2).sum(0)
        counts[name] += x2.shape[0]

    with _hooks(readers, collect), torch.no_grad():
        for b in calibration:
            current[0] = _token_mask(b)
            _call(model, b)
    missing = [n for n in readers if not counts[n]]
    if missing:
        raise PruningError(f"the calibration data never reached {missing[0]}")
    return {n: (sums[n][0] / counts[n], sums[n][1] / counts[n]) for n in readers}


def _mean_compensated(new: nn.Module, weight: torch.Tensor, idx: torch.Tensor, block: int, mean: torch.Tensor) -> None:
    """Add to the pruned reader ``new``'s bias what the input columns of the original ``weight``
    outside ``idx`` (channels of ``block`` columns) gave its output on average:
    ``W[:, removed] @ mean[removed]`` (a convolution's kernel summed over its positions: exact in
    expectation for 1x1 kernels, away from the zero padding for others)."""
    cols = (idx[:, None] * block + torch.arange(block, device=idx.device)).reshape(-1)
    gone = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    gone[cols] = False
    w = weight.detach()[:, gone].float()
    if w.dim() == 4:
        w = w.sum((2, 3))
    new.bias.data += (w @ mean.to(w.device)[gone].to(w)).to(new.bias.dtype)


def _rows(m: nn.Module, idx: torch.Tensor) -> nn.Module:
    w = m.weight.detach()[idx].clone()
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, len(idx), bias=m.bias is not None, device=w.device, dtype=w.dtype)
    else:
        new = nn.Conv2d(m.in_channels, len(idx), m.kernel_size, m.stride, m.padding, m.dilation, 1,
                        m.bias is not None, m.padding_mode, device=w.device, dtype=w.dtype)  # fmt: skip
    new.weight.data.copy_(w)
    if m.bias is not None:
        new.bias.data.copy_(m.bias.detach()[idx])
    return new.train(m.training)


def _cols(m: nn.Module, idx: torch.Tensor, block: int) -> nn.Module:
    cols = (idx[:, None] * block + torch.arange(block, device=idx.device)).reshape(-1)
    w = m.weight.detach()[:, cols].clone()
    if isinstance(m, nn.Linear):
        new = nn.Linear(len(cols), m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
    else:
        new = nn.Conv2d(len(idx), m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1,
                        m.bias is not None, m.padding_mode, device=w.device, dtype=w.dtype)  # fmt: skip
    new.weight.data.copy_(w)
    if m.bias is not None:
        new.bias.data.copy_(m.bias.detach())
    return new.train(m.training)


def _channelwise(m: nn.Module, idx: torch.Tensor) -> nn.Module:
    """A BatchNorm or depthwise convolution restricted to channels ``idx``."""
    if not _depthwise(m):
        return _bn(m, idx)
    c = len(idx)
    new = nn.Conv2d(c, c, m.kernel_size, m.stride, m.padding, m.dilation, c, m.bias is not None, m.padding_mode,
                    device=m.weight.device, dtype=m.weight.dtype)  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(m.weight.detach()[idx])
        if m.bias is not None:
            new.bias.copy_(m.bias.detach()[idx])
    return new.train(m.training)


def _bn(m: nn.Module, idx: torch.Tensor) -> nn.Module:
    new = type(m)(len(idx), m.eps, m.momentum, m.affine, m.track_running_stats)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, attr, None)
            if t is not None:
                getattr(new, attr).copy_(t.detach()[idx])
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    return new.train(m.training)


@contextlib.contextmanager
def _evaluating(model: nn.Module, batchnorm_train: bool = False):
    """Every module in eval mode (BatchNorms in train mode with ``batchnorm_train``) while open;
    each module's own mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if batchnorm_train:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        yield
    finally:
        for m, training in modes:
            m.training = training


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms that keep running statistics (the ones :func:`recalibrate_batchnorm` updates)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calibration) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``calibration`` (model inputs), in
    place: each BatchNorm averages its batch statistics over the batches (cumulative average, each
    batch weighing the same; the BatchNorms normalize by the batch's own statistics during the pass,
    as in training), the other modules in eval mode (no dropout). Returns the number of BatchNorms
    updated. Raises :class:`PruningError` if the model cannot run on the data that way (a
    BatchNorm1d needs more than one value per channel: batches of at least 2); their statistics,
    modes and momenta are then as before.

    After channels are removed, a layer's output loses the removed channels' contribution, and
    the running statistics that follow (measured on the unpruned network) no longer centre it: the
    shift compounds through the network (MobileNetV2 with 25% of its expansion channels removed:
    1% top-1 agreement with FP32; after re-estimation on 64 calibration crops, 66%). Re-estimating
    them is "adaptive BatchNorm" (Li et al., EagleEye, ECCV 2020)."""
    from ..calibrate import _call, as_batches

    bns = _batchnorms(model)
    if not bns:
        return 0
    batches = as_batches(calibration, "BatchNorm re-estimation")
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        with _evaluating(model, batchnorm_train=True):
            for b in batches:
                _call(model, b)
    except Exception as e:
        for m, _momentum, buffers in saved:
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        raise PruningError(f"re-estimating the BatchNorm statistics on the calibration data failed "
                           f"({type(e).__name__}: {e}); a BatchNorm1d needs batches of at least 2, or pass "
                           "recalibrate=False") from e  # fmt: skip
    finally:
        for m, momentum, _buffers in saved:
            m.momentum = momentum
    return len(bns)


@torch.no_grad()
def prune_channels(model: nn.Module, fraction: float, *, calibration=None, multiple: int = 8,
                   recalibrate: bool = True) -> list[ChannelGroup]:  # fmt: skip
    """Remove ``fraction`` of the channels of every channel group of ``model`` in place.

    Args:
        model: a float model (not yet quantized).
        fraction: the share of each group's channels removed, in (0, 1); the kept count is
            rounded down to a multiple of ``multiple`` (at least ``multiple``, or all if fewer).
        calibration: model inputs; when given, channels are scored by the calibration inputs of
            their reading layer, else by the weights alone (:func:`channel_scores`).
        recalibrate: with ``calibration``, correct for what the removed channels gave on average.
            A model with BatchNorms has their running statistics re-estimated on it afterwards
            (:func:`recalibrate_batchnorm`). In a model without, a reading layer with a bias takes
            the removed channels' mean contribution into it (``W[:, removed] @ E[x_removed]``,
            the calibration inputs' mean; all-MiniLM-L6-v2 with 25% of its FFN neurons removed:
            held-out cosine 0.878 -> 0.907). Not both: re-estimated statistics move the kept
            channels too, so the original means no longer say what was lost (MobileNetV2, 25% of
            its channels: 65.7% top-1 agreement with re-estimation alone, 59.9% with both).
            False changes nothing else, so the pruned model computes exactly what the original
            computes with the removed channels zeroed.

    Returns the groups with ``kept`` (the channel indices kept). Raises :class:`PruningError` for a
    fraction outside (0, 1), a quantized model, or a model with no channel groups; nothing
    changes then. The model's config (``intermediate_size``) follows; ``model.lowbit_resized``
    records each changed layer's original weight shape.
    """
    from .. import driver
    from ..calibrate import as_batches
    from ..nn import quantized_summary

    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1):
        raise PruningError(f"the fraction of channels removed must be in (0, 1), got {fraction!r}")
    done = quantized_summary(model)
    if done:
        raise PruningError(f"the model is already quantized ({done}): prune channels of the float model")
    groups = channel_groups(model)
    mods = dict(model.named_modules())
    # a list of batches (read twice: scores, BatchNorms); the passes run in eval mode
    calibration = None if calibration is None else as_batches(calibration, "structured pruning")
    compensate = calibration is not None and recalibrate and not _batchnorms(model)
    sq = None
    if calibration is not None:
        with _evaluating(model):
            sq = _input_moments(model, {g.reader: mods[g.reader] for g in groups}, calibration)

    def keep_of(c: int) -> int:
        k = int(c * (1 - fraction)) // multiple * multiple
        return min(c, max(k, multiple))

    resized = dict(getattr(model, "lowbit_resized", {}) or {})
    plan = []  # (group, kept indices): scored on the original weights, before anything changes
    for g in groups:
        reader = mods[g.reader]
        w_reader = reader.weight  # a convolution's (N, C, kh, kw) as (N * kh * kw, C): one column per channel
        if isinstance(reader, nn.Conv2d):
            w_reader = w_reader.permute(0, 2, 3, 1).reshape(-1, reader.in_channels)
        x_sq = None if sq is None else sq[g.reader][1]
        scores = channel_scores(w_reader, g.block, x_sq, [mods[p].weight for p in g.producers])
        plan.append((g, channels_kept(scores, keep_of(g.channels))))
    touched = {n for g in groups for n in (*g.producers, g.reader, *g.between)}
    for name in touched:
        w = getattr(mods[name], "weight", None)
        if w is not None and w.dim() >= 2:  # layers, not BatchNorms: their original shapes
            resized.setdefault(name, tuple(w.shape))
    # a layer may read one group and produce the next: each change applies to the current module
    for g, idx in plan:
        g.kept = idx.tolist()
        for p in g.producers:
            driver._set_module(model, p, _rows(model.get_submodule(p), idx))
        for b in g.between:
            driver._set_module(model, b, _channelwise(model.get_submodule(b), idx))
        reader = model.get_submodule(g.reader)
        new = _cols(reader, idx, g.block)
        if compensate and new.bias is not None:  # the removed inputs' mean: into the bias
            _mean_compensated(new, reader.weight, idx, g.block, sq[g.reader][0])
        driver._set_module(model, g.reader, new)
    config = getattr(model, "config", None)
    keys = {g.config_key for g in groups if g.config_key}
    old_config = {key: getattr(config, key) for key in keys}
    for key in keys:
        setattr(config, key, keep_of(groups[0].channels))
    old_resized = getattr(model, "lowbit_resized", None)
    model.lowbit_resized = resized
    if calibration is not None and recalibrate:
        try:
            recalibrate_batchnorm(model, calibration)
        except PruningError:  # nothing changes: the original modules (never modified) go back
            for name in touched:
                driver._set_module(model, name, mods[name])
            for key, value in old_config.items():
                setattr(config, key, value)
            model.lowbit_resized = old_resized
            if old_resized is None:
                del model.lowbit_resized
            raise
    return groups
