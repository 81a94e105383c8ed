"""Quantization-aware training: fake quantization with learned step sizes, then the packed model.

    model = lowbit.prepare_qat(model, "w4g64")                  # in place: QAT wrappers
    lowbit.qat.fit(model, batches, teacher=fp32_model, steps=300) # or any training loop
    lowbit.convert(model)                                       # packed QuantLinear/QuantConv2d

:func:`prepare_qat` wraps every layer the recipe selects (``nn.Linear``, ``nn.Conv2d``) in a
:class:`QATLayer` that keeps the float weight trainable and fake-quantizes it in the forward pass:

    w_hat = (clamp(round(w / s + z), 0, 2^b - 1) - z) * s          (per group, as the scheme stores)

``round`` passes its gradient straight through (STE); ``clamp`` stops it outside the range; the
step ``s`` is a parameter learned by the LSQ gradient (Esser et al., "Learned Step Size
Quantization", ICLR 2020: ``d w_hat / d s = round(v) - v`` inside the range, the clipped code
outside, scaled by ``1 / sqrt(n * Q_p)`` with ``n`` the elements sharing the step). The forward
pass uses ``s`` rounded to its storage dtype (fp16) and, for asymmetric schemes, the learned zero
point rounded to an integer code, so :func:`convert` stores exactly what training saw. Steps
start from the min/max choice of PTQ (or the MSE clip with ``init="mse"``).

Int8 activations: dynamic schemes (``w4a8``) fake-quantize each token with its own absmax, as
the kernels do; static ones (``w8a8-static``) learn one step per layer input by LSQ from an
observer's start (calibration batches, or the first training batch) and keep its zero point.

BatchNorms that follow a wrapped layer are folded first (``fold_bn=True``; they must be in
inference mode, with running statistics): QAT then trains the folded weights, the form the
deployed model runs. :func:`convert` refuses a model that still has a BatchNorm in training mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .driver import outside_inference_mode
from .primitives import _fits, check_finite, choose_qparams, grouped, mse_clip_search, round_scale
from .recipe import Recipe
from .scheme import Scheme

__all__ = ["QATError", "QATLayer", "prepare_qat", "convert", "fit", "fit_blocks", "distill_loss"]


class QATError(ValueError):
    """A model or scheme QAT cannot train or convert."""


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _grad_scaled(p: torch.Tensor, g: float) -> torch.Tensor:
    """``p`` in the forward pass, its gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    return (p - p * g).detach() + p * g


def lsq_fake_quantize(
    x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | float, qmin: int, qmax: int, *, hold_codes: bool = False
) -> torch.Tensor:
    """``(clamp(round(x / step + zero), qmin, qmax) - zero) * step``, straight-through rounding;
    ``step`` and ``zero`` broadcast against ``x``; gradients reach ``x`` (inside the range) and
    ``step`` (LSQ: ``round(v) - v`` inside the range).

    ``hold_codes``: the step and zero point get the gradient of ``(q - zero) * step`` with the
    codes ``q`` held (``q - zero`` and ``-step``), as scale fine-tuning does (PEQA, Kim et al.
    2023; EfficientQAT's E2E-QP). For ``x`` on the grid, as after post-training quantization,
    LSQ's step gradient ``round(v) - v`` is exactly 0 and an optimizer would move the steps on
    rounding noise alone."""
    if hold_codes:
        z = zero.detach() if isinstance(zero, torch.Tensor) else zero
        q = torch.clamp(_ste_round(x / step.detach() + z), qmin, qmax)
    else:
        q = torch.clamp(_ste_round(x / step + zero), qmin, qmax)
    return (q - zero) * step


class _WeightQuant(nn.Module):
    """Learned per-group steps (and zero points) of one weight ``(N, K)``; groups as stored."""

    def __init__(self, w2d: torch.Tensor, scheme: Scheme, init: str, start=None) -> None:
        super().__init__()
        fmt = scheme.fmt
        if fmt.kind != "affine":
            raise QATError(f"QAT learns integer steps: {scheme} ({fmt.name}) is not an integer format")
        self.scheme = scheme
        self.shape = tuple(w2d.shape)
        if start is not None:  # a post-training quantization's scales and zero points
            qp = start
        else:
            qp = mse_clip_search(w2d.detach(), scheme) if init == "mse" else choose_qparams(w2d.detach(), scheme)
        self.step = nn.Parameter(qp.scale.clone())  # (R, ng), R = N or 1 (per tensor)
        # From a post-training quantization every weight sits on its grid, where LSQ's step
        # gradient vanishes: the steps learn with the codes held instead (lsq_fake_quantize).
        self.hold_codes = start is not None
        # Steps that start in the storage dtype's normal range stay there (a step trained below it
        # would store every scale of the weight as float32: twice the bytes the budget counted).
        sd = fmt.scale_dtype
        self.floor = torch.finfo(sd).tiny if sd is not None and sd != torch.float32 and _fits(qp.scale, sd) else 0.0
        self.zero = nn.Parameter(qp.zero.clone()) if qp.zero is not None else None  # (R, ng) asym only
        self.group = self.shape[1] if scheme.group_size is None else scheme.group_size
        if scheme.per_tensor:
            self.group = self.shape[0] * self.shape[1]
        q_pos = fmt.qmax - (fmt.sym_zero if scheme.symmetric else 0)  # LSQ's Q_p
        self.grad_scale = 1.0 / math.sqrt(self.group * max(1, q_pos))

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step rounded to its storage dtype and the zero point rounded to a code (no grad)."""
        fmt = self.scheme.fmt
        step = self.step.detach()
        if self.floor:
            step = torch.where(step == 0, step, torch.copysign(step.abs().clamp_min(self.floor), step))
        s = round_scale(step, fmt)
        z = None if self.zero is None else self.zero.detach().round().clamp(0, fmt.qmax)
        return s, z

    def forward(self, w2d: torch.Tensor) -> torch.Tensor:
        fmt = self.scheme.fmt
        s_stored, z_stored = self.stored()
        step = self.step + (s_stored - self.step).detach()  # fp16 value, LSQ gradient
        step = _grad_scaled(step, self.grad_scale)
        step = torch.where(step.detach() == 0, torch.ones_like(step), step)  # an all-zero group
        if self.zero is None:
            zero = float(fmt.sym_zero)
        else:
            zero = _grad_scaled(self.zero + (z_stored - self.zero).detach(), self.grad_scale).unsqueeze(-1)
        flat = w2d.reshape(1, -1) if self.scheme.per_tensor else w2d
        g = grouped(flat, self.group)  # (R, ng, G), zero-padded
        out = lsq_fake_quantize(g, step.unsqueeze(-1), zero, 0, fmt.qmax, hold_codes=self.hold_codes)
        return out.reshape(flat.shape[0], -1)[:, : flat.shape[1]].reshape(self.shape)


class _ActQuant(nn.Module):
    """Int8 input activations: dynamic per token, or static with a learned step (LSQ)."""

    QMAX = 127

    def __init__(self, scheme: Scheme) -> None:
        super().__init__()
        self.static = scheme.act_static
        self.group = scheme.act_group
        self.step = nn.Parameter(torch.ones(())) if self.static else None
        self.register_buffer("zero", torch.zeros((), dtype=torch.int8) if self.static else None)
        self.ready = not self.static  # static steps start from an observer
        self.bypass = False  # pass inputs through unchanged (while observers watch them)

    def init_from(self, step: float, zero: int) -> None:
        with torch.no_grad():
            self.step.fill_(step)
            self.zero.fill_(zero)
        self.ready = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if not self.static:
            from .kernels.reference import quantize_activations

            return x + (quantize_activations(x.detach(), self.group) - x).detach()  # STE
        if not self.ready:  # no calibration given: start from the first batch's range
            from .observers import make_observer

            obs = make_observer("minmax")
            obs.update(x)
            self.init_from(*obs.qparams())
        g = 1.0 / math.sqrt(x.numel() * self.QMAX)
        step = _grad_scaled(self.step.abs().clamp_min(1e-12), g)
        z = float(self.zero)
        # round, then shift by the zero point: the order of the kernels' quantize_static
        q = torch.clamp(_ste_round(x / step) + z, -self.QMAX, self.QMAX)
        return (q - z) * step


class QATLayer(nn.Module):
    """A Linear or Conv2d (``self.layer``, its float weight trainable) whose weight and, for ``a8``
    schemes, input run fake-quantized."""

    lowbit_qat = True  # the driver's planning skips what is inside (it does not import this file)

    def __init__(self, layer: nn.Module, scheme: Scheme, init: str = "minmax", *, start=None,
                 mask: torch.Tensor | None = None, lowrank: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise QATError(f"QAT wraps nn.Linear and nn.Conv2d, not {type(layer).__name__}")
        if lowrank is not None and not isinstance(layer, nn.Linear):
            raise QATError("a low-rank correction applies to linear layers only")
        self.layer = layer
        self.scheme = scheme
        self.wq = _WeightQuant(layer.weight.detach().reshape(layer.weight.shape[0], -1), scheme, init, start)
        self.aq = _ActQuant(scheme) if scheme.act_bits else None
        # a pruned layer's kept positions, bool (N, K): fixed; the removed weights stay exactly 0
        self.register_buffer("mask", mask)
        # a low-rank correction A (N, r) @ B (r, K) beside the quantized weight: trained in float32,
        # stored as float16 again by convert()
        self.lowrank_a = self.lowrank_b = None
        if lowrank is not None:
            self.lowrank_a = nn.Parameter(lowrank[0].detach().float().clone())
            self.lowrank_b = nn.Parameter(lowrank[1].detach().float().clone())

    def fake_weight(self) -> torch.Tensor:
        w = self.layer.weight
        w2 = w.reshape(w.shape[0], -1)
        if self.mask is not None:
            w2 = w2 * self.mask
        return self.wq(w2).reshape(w.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        w = self.fake_weight()
        if isinstance(self.layer, nn.Linear):
            y = F.linear(x, w, self.layer.bias)
            if self.lowrank_a is not None:
                y = y + F.linear(F.linear(x, self.lowrank_b), self.lowrank_a)
            return y
        return self.layer._conv_forward(x, w, self.layer.bias)

    def extra_repr(self) -> str:
        kept = "" if self.mask is None else f", sparsity={1 - float(self.mask.float().mean()):.3g}"
        rank = "" if self.lowrank_a is None else f", rank={self.lowrank_a.shape[1]}"
        return f"scheme={self.scheme}{kept}{rank}"


def _from_ptq(model: nn.Module) -> nn.Module:
    """Wrap every quantized (and pruned) linear and conv2d module of a post-training-quantized
    model in a :class:`QATLayer` that starts from its weight, scales, zero points, mask and
    correction; embeddings and shared (tied) weights stay quantized as they are."""
    from . import driver
    from .nn import QuantModule
    from .sparse import unpack_mask

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]
    # Embeddings (not trained by QAT) and weights shared by two modules (a tied embedding and LM
    # head) stay as they are: training one side would untie them.
    users: dict[int, int] = {}
    for _n, m in layers:
        users[m.qweight.data_ptr()] = users.get(m.qweight.data_ptr(), 0) + 1
    layers = [(n, m) for n, m in layers if m.op != "embedding" and users[m.qweight.data_ptr()] == 1]
    if not layers:
        raise QATError("prepare_qat(model) without a scheme trains a quantized model's layers; this one has none "
                       "(give a scheme or recipe to start from float)")  # fmt: skip
    bad = [f"{n} ({m.scheme}, {m.op})" for n, m in layers if m.scheme.fmt.kind != "affine" or m.scheme.act_static]
    if bad:
        raise QATError("QAT restarts integer weight-only or dynamic-activation linear and conv2d layers; "
                       f"not {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")  # fmt: skip
    new = []
    for name, m in layers:
        w = m.qw.dequantize(torch.float32)  # the codes alone: a correction stays beside them
        if m.op == "linear":
            f = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        else:
            f = nn.Conv2d(m.weight_shape[1] * m.groups, m.weight_shape[0], m.weight_shape[2:], stride=m.stride,
                          padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None)  # fmt: skip
        with torch.no_grad():
            f.weight.copy_(w)
            if m.bias is not None:
                f.bias.copy_(m.bias.detach())
        mask = None if m.mask is None else unpack_mask(m.mask, m.qw.cols)
        lowrank = None if m.lowrank_a is None else (m.lowrank_a, m.lowrank_b)
        new.append((name, QATLayer(f, m.scheme, start=m.qw.qparams(), mask=mask, lowrank=lowrank)))  # (copies)
    records = dict(getattr(model, "lowbit_layers", {}) or {})
    for name, q in new:
        old = model.get_submodule(name)
        driver._set_module(model, name, q)
        rec = records.get(name)
        records[name] = driver.LayerRecord(name, rec.type if rec else type(old).__name__, "quantized", str(q.scheme),
                                           f"{old.method}+qat", rec.reason if rec else "")  # fmt: skip
    model.lowbit_layers = records
    return model


@outside_inference_mode
def prepare_qat(
    model: nn.Module,
    spec: str | Scheme | Recipe | None = None,
    calibration: Iterable | None = None,
    *,
    observer: str = "minmax",
    init: str = "minmax",
    fold_bn: bool = True,
    bias_correction: bool | None = None,
) -> nn.Module:
    """Wrap the layers ``spec`` selects in :class:`QATLayer` (in place); returns ``model``.

    Without ``spec``, ``model`` is a post-training-quantized (possibly pruned) model: every
    quantized linear and conv2d layer is wrapped starting from its dequantized weight, its scales
    and zero points and, for a pruned layer, its mask, which stays fixed (removed weights stay 0),
    so training starts exactly where PTQ (GPTQ, SparseGPT, ...) ended and :func:`convert` gives
    back the same storage, pruned layers included.

    ``calibration`` (model inputs) starts static activation steps from ``observer``; without it
    they start from the first batch seen. ``init``: ``"minmax"`` or ``"mse"`` weight steps.
    With calibration, static layers then start from corrected biases as ``lowbit.quantize`` does
    (``bias_correction``: ``None`` those that have a bias, ``True`` all, adding a trainable one,
    ``False`` none), so training starts where post-training quantization ends.
    """
    from . import driver

    if init not in ("minmax", "mse"):
        raise QATError(f"init must be 'minmax' or 'mse', got {init!r}")
    if spec is None:
        return _from_ptq(model)
    recipe = Recipe.coerce(spec)
    todo, records, _heads = driver._plan(model, recipe)
    wrapped = [t for t in todo if isinstance(t[1], (nn.Linear, nn.Conv2d))]
    other = [f"{t[0]} ({type(t[1]).__name__})" for t in todo if t not in wrapped]
    if other:
        raise QATError(f"QAT trains nn.Linear and nn.Conv2d layers; the recipe also selects {', '.join(other)}")
    if not wrapped:
        raise QATError("no trainable layers: the model has no nn.Linear or nn.Conv2d layer the recipe selects")
    frozen = [t[0] for t in wrapped if not t[1].weight.requires_grad]
    if len(frozen) == len(wrapped):
        raise QATError("no trainable layers: every selected layer's weight has requires_grad=False")
    any_static = any(t[3].act_static for t in wrapped)
    if bias_correction and (calibration is None or not any_static):
        raise QATError("bias_correction needs calibration batches and a static activation scheme")
    batches = None
    if any_static and calibration is not None:  # read once (an iterator can be), before anything changes
        from .calibrate import as_batches

        batches = as_batches(calibration, "QAT's static activations")
    for name, mod, _kind, scheme, _w in wrapped:  # every check before anything changes
        check_finite(mod.weight, f"{name}.weight")
        if scheme.fmt.kind != "affine":
            raise QATError(f"QAT learns integer steps: {scheme} ({scheme.fmt.name}) is not an integer format")
    undo = driver._fold_batchnorms(model, wrapped, records) if fold_bn else (lambda: None)
    try:  # steps start from the folded weights
        new = [(name, QATLayer(mod, scheme, init)) for name, mod, _k, scheme, _w in wrapped]
    except BaseException:
        undo()
        raise
    for (name, mod, _kind, scheme, why), (_, q) in zip(wrapped, new):
        driver._set_module(model, name, q)
        records[name] = driver.LayerRecord(name, type(mod).__name__, "quantized", str(scheme), "qat", why)
    model.lowbit_layers = records
    static = {n: model.get_submodule(n) for n, *_ in wrapped if model.get_submodule(n).aq is not None}
    static = {n: m for n, m in static.items() if m.aq.static}
    if static and batches is not None:
        _init_activations(model, static, batches, observer)
        if bias_correction is not False:
            _correct_biases(model, static, batches, bias_correction)
    return model


def _correct_biases(model: nn.Module, layers: dict[str, QATLayer], batches: list, force: bool | None) -> None:
    """Add each static layer's mean output error (fake-quantized vs float, same input) to its bias."""
    from .calibrate import mean_output_error

    targets = {n: (m, m.layer) for n, m in layers.items() if force or m.layer.bias is not None}
    for n, delta in mean_output_error(model, batches, targets).items():
        layer = targets[n][1]
        with torch.no_grad():
            if layer.bias is None:
                layer.bias = nn.Parameter(delta.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.add_(delta.to(layer.bias.dtype))


def _init_activations(model: nn.Module, layers: dict[str, QATLayer], batches: list, observer: str) -> None:
    """Observe each static layer's float input over the calibration batches; start its step there."""
    from .calibrate import _call, _hooks
    from .observers import make_observer

    obs = {n: make_observer(observer) for n in layers}
    try:
        for m in layers.values():
            m.aq.bypass = True  # observe unrounded inputs
        with _hooks(layers, lambda n, x: obs[n].update(x)), torch.no_grad():
            for b in batches:
                _call(model, b)
    finally:
        for m in layers.values():
            m.aq.bypass = False
    for n, m in layers.items():
        m.aq.init_from(*obs[n].qparams())


def _already(model: nn.Module) -> str:
    """" (the model is already quantized: ...)" when it holds packed layers, else ""."""
    from .nn import quantized_summary

    done = quantized_summary(model)
    return f" (the model is already quantized: {done})" if done else ""


@outside_inference_mode
def convert(model: nn.Module, kernel: str = "auto") -> nn.Module:
    """Replace every :class:`QATLayer` with the packed module PTQ would produce, holding the learned
    steps (in place; returns ``model``). Saved files are the same format as PTQ's."""
    from . import driver, kernels
    from .primitives import QParams
    from .qweight import QWeight
    from .sparse import SparseWeight

    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if bns:
        raise QATError(
            f"BatchNorm in training mode at conversion ({', '.join(bns[:3])}): call model.eval() first, "
            "so that its running statistics, not a batch's, are what the deployed model uses"
        )
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QATLayer)]
    if not layers:
        raise QATError("no QAT layers to convert: call prepare_qat() first" + _already(model))
    swaps = []
    for name, q in layers:
        if q.aq is not None and q.aq.static and not q.aq.ready:
            raise QATError(f"{name}: its activation step was never initialised (no calibration, no forward pass)")
        w = q.layer.weight.detach()
        check_finite(w, f"{name}.weight")
        s, z = q.wq.stored()
        if q.mask is not None:  # removed weights at the code of exact 0, then only the kept ones stored
            w = (w.reshape(w.shape[0], -1) * q.mask).reshape(w.shape)
        qw = QWeight.from_float(w, q.scheme, QParams(s, z), name=f"{name}.weight")
        if q.mask is not None:
            qw = SparseWeight.from_qweight(qw, q.mask)
        if q.lowrank_a is not None:
            a, b = (t.detach().to(torch.float16) for t in (q.lowrank_a, q.lowrank_b))
            check_finite(a, f"{name}.lowrank_a")
            check_finite(b, f"{name}.lowrank_b")
            qw = driver.Corrected(qw, a, b)
        act = None
        if q.aq is not None and q.aq.static:
            act = (float(q.aq.step.detach().abs()), int(q.aq.zero))
        kind = "linear" if isinstance(q.layer, nn.Linear) else "conv2d"
        swaps.append((name, driver._swap(q.layer, kind, qw, "qat", act)))
    for name, new in swaps:
        driver._set_module(model, name, new)
    kernels.use_kernel(model, kernel)
    return model


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean ``KL(softmax(teacher / T) || softmax(student / T)) * T^2`` over the positions of logits
    ``(..., C)`` (Hinton et al., 2015)."""
    t = temperature
    logp = torch.log_softmax(student.float() / t, dim=-1)
    logq = torch.log_softmax(teacher.float() / t, dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1).mean() * (t * t)


def embedding_distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation loss of a sentence encoder from its teacher's token states ``(B, T, H)``: the
    mean cosine distance of the mean-pooled embeddings (what sentence-transformers compares)
    plus that of every real token's state (an intermediate-feature term, as in Jiao et al.,
    TinyBERT, 2020, by direction rather than squared error so that scale drift costs nothing).
    ``mask (B, T)``: 1 for real tokens."""
    from .mixed import mean_pool

    s, t = student.float(), teacher.float()
    sentence = 1 - F.cosine_similarity(mean_pool(s, mask), mean_pool(t, mask), dim=-1).mean()
    m = torch.ones(s.shape[:2], dtype=s.dtype, device=s.device) if mask is None else mask.to(s.dtype)
    tokens = ((1 - F.cosine_similarity(s, t, dim=-1)) * m).sum() / m.sum().clamp_min(1.0)
    return sentence + tokens


def _log_space_grads(scales: list[nn.Parameter], logs: list[nn.Parameter]) -> None:
    """Move each step's gradient onto ``u = log|step|`` (``dL/du = dL/dstep * step``), ``u`` taken
    from the step as it is now (an activation step may have been set by its first batch)."""
    with torch.no_grad():
        for p, u in zip(scales, logs):
            u.copy_(p.abs().clamp_min(torch.finfo(p.dtype).tiny).log())
            u.grad = None if p.grad is None else p.grad * p
            p.grad = None


def _from_log_space(scales: list[nn.Parameter], logs: list[nn.Parameter]) -> None:
    """Write the updated ``log|step|`` back, keeping each step's sign; a zero step (an all-zero
    group) stays zero."""
    with torch.no_grad():
        for p, u in zip(scales, logs):
            p.copy_(torch.where(p == 0, p, torch.copysign(u.exp(), p)))


class _Optimizer:
    """AdamW over ``scope``'s trainable float parameters (``lr``), the learned steps of the QAT
    layers ``qat`` as ``log|step|`` and their zero points (``step_lr``), all on one cosine from
    full to 0."""

    def __init__(self, scope: nn.Module, qat: list, lr: float, step_lr: float) -> None:
        self.scales = [p for m in qat for p in (m.wq.step, m.aq.step if m.aq is not None else None) if p is not None]
        zeros = [m.wq.zero for m in qat if m.wq.zero is not None]
        ids = {id(p) for p in self.scales + zeros}
        weights = [p for p in scope.parameters() if p.requires_grad and id(p) not in ids]
        # Steps learn in log space. Adam's update does not depend on the gradient's size, so on a raw
        # step it moves every step by about step_lr in absolute terms: far too much for a layer whose
        # steps are small, too little where they are large. On log|step| an update is a relative
        # change (step_lr = its fraction per update) whatever the layer's weight range.
        self.logs = [nn.Parameter(torch.zeros_like(p)) for p in self.scales]
        groups = [{"params": weights, "lr": lr, "weight_decay": 0.0},
                  {"params": self.logs, "lr": step_lr, "weight_decay": 0.0},
                  {"params": zeros, "lr": step_lr, "weight_decay": 0.0}]  # fmt: skip
        self.opt = torch.optim.AdamW(groups)
        self.base = [grp["lr"] for grp in self.opt.param_groups]

    def update(self, loss: torch.Tensor, done: float) -> None:
        """One AdamW update on ``loss``'s gradients, rates at the cosine's point ``done`` in [0, 1)."""
        for grp, lr0 in zip(self.opt.param_groups, self.base):
            grp["lr"] = lr0 * 0.5 * (1.0 + math.cos(math.pi * done))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        _log_space_grads(self.scales, self.logs)
        self.opt.step()
        _from_log_space(self.scales, self.logs)


def fit(
    model: nn.Module,
    batches,
    *,
    steps: int,
    seconds: float | None = None,
    teacher: nn.Module | None = None,
    loss_fn=None,
    lr: float = 1e-5,
    step_lr: float = 1e-4,
    temperature: float = 1.0,
    on_step=None,
) -> list[float]:
    """A minimal QAT loop: AdamW over the float weights (``lr``), the learned steps (``step_lr``,
    a relative rate: steps are learned as ``log|step|``, so an update changes a step by about that
    fraction whatever its size) and zero points (``step_lr`` codes per update),
    ``steps`` updates cycling through ``batches`` (a list, or a callable ``i -> batch``), learning
    rates on a cosine from full to 0. With ``seconds``, training also stops at that wall time and
    the cosine follows whichever of steps or time is further along, so a time budget still ends
    with a decayed rate.

    Loss: ``distill_loss(model(b), teacher(b))`` with a ``teacher`` (the FP32 model: no labels
    needed; :func:`embedding_distill_loss` for a sentence encoder, whose output has no logits),
    else ``loss_fn(model, batch)``. With a teacher the student runs in inference mode (no
    dropout: it learns to match the teacher's deterministic outputs); with ``loss_fn`` in training
    mode; BatchNorm statistics stay frozen either way. Returns the loss of every step; ``on_step(i, loss)`` is
    called after each (for logging; return ``True`` to stop early).
    """
    from .calibrate import _call
    from .mixed import _is_encoder, _logits

    if (teacher is None) == (loss_fn is None):
        raise QATError("give exactly one of teacher= (distillation) or loss_fn=")
    if steps < 1:
        raise QATError(f"steps must be >= 1, got {steps}")
    qat = [m for m in model.modules() if isinstance(m, QATLayer)]
    if not qat:
        raise QATError("no QAT layers: call prepare_qat() first" + _already(model))
    opt = _Optimizer(model, qat, lr, step_lr)
    t0 = time.perf_counter()
    if teacher is not None:
        teacher.eval()
    # Distillation matches the teacher's deterministic outputs: the student runs without dropout
    # (as the teacher does); training on labels keeps the model's dropout.
    model.train(teacher is None)
    for mod in model.modules():  # BatchNorms left unfolded keep their statistics frozen
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
    get = batches if callable(batches) else (lambda i: batches[i % len(batches)])
    losses = []
    try:
        for i in range(steps):
            done = i / steps if seconds is None else max(i / steps, (time.perf_counter() - t0) / seconds)
            if done >= 1.0:
                break
            b = get(i)
            if teacher is not None:
                with torch.no_grad():
                    t_out = _call(teacher, b)
                s_out = _call(model, b)
                if not _is_encoder(t_out):
                    loss = distill_loss(_logits(s_out), _logits(t_out), temperature)
                else:  # a sentence encoder: its embeddings and token states, by direction
                    loss = embedding_distill_loss(s_out.last_hidden_state, t_out.last_hidden_state,
                                                  b.get("attention_mask") if isinstance(b, dict) else None)  # fmt: skip
            else:
                loss = loss_fn(model, b)
            opt.update(loss, done)
            losses.append(loss.item())
            if on_step is not None and on_step(i, losses[-1]):
                break
    finally:
        model.eval()
    return losses


def _token_errors(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each real token's squared error relative to its target, ``||out_t - target_t||^2 /
    ||target_t||^2`` (a vector over the real tokens).

    Relative per token because a decoder's residual stream is dominated by a few tokens: in
    SmolLM2-135M the first token of a window (the attention sink) holds ~97% of a middle layer's
    summed squared output, so a plain MSE fits that one token and ignores the others; and the
    next block's RMSNorm divides every token by its own norm anyway."""
    from .calibrate import _real_tokens

    o, t = _real_tokens(out, mask), _real_tokens(target, mask)
    o, t = o.reshape(-1, o.shape[-1]).float(), t.reshape(-1, t.shape[-1]).float()
    return (o - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)


def _block_error(block: nn.Module, inputs: list, target: list, masks: list) -> tuple[float, list]:
    """``block``'s outputs on ``inputs`` and their mean relative error per real token against
    ``target`` (:func:`_token_errors`)."""
    from .calibrate import _block_outputs

    outs = [_block_outputs(block(*a, **k)) for a, k in inputs]
    errs = [_token_errors(o, t, m) for o, t, m in zip(outs, target, masks)]
    return float(sum(e.sum() for e in errs)) / max(1, sum(e.numel() for e in errs)), outs


@outside_inference_mode
def fit_blocks(
    model: nn.Module,
    teacher: nn.Module,
    batches,
    *,
    epochs: int = 2,
    lr: float = 1e-4,
    step_lr: float = 1e-2,
    seed: int = 0,
    on_block=None,
) -> list[tuple[float, float]]:
    """Block-wise distillation: each repeated block of ``model`` (a decoder's layers) trained in
    turn, its QAT layers' weights, learned steps and zero points and its other float parameters
    (norms) by AdamW, to reproduce the output of the same block of ``teacher`` (the FP32 model),
    token by token: the loss is each token's squared error relative to its own norm, so the few
    tokens that carry a decoder's massive activations do not drown the others.

    The block reads what the already trained student blocks before it produce and is fitted to
    what the teacher's blocks produce from the teacher's own inputs, so it also learns to undo
    the error that reaches it (the block-wise reconstruction of BRECQ, Li et al. 2021, and of
    EfficientQAT's Block-AP, Chen et al. 2024, with the LSQ steps of :func:`fit`). Only one
    block trains at a time, and the LM head never runs: a step costs a block's forward and
    backward, where :func:`fit` pays the whole model and the teacher's logits.

    Args:
        model: prepared by :func:`prepare_qat` (e.g. from a GPTQ model), made of a chain of
            repeated blocks (``calibrate.find_blocks``).
        teacher: the float model with the same chain of blocks.
        batches: model inputs (calibration batches); padding tokens (an ``attention_mask``)
            count in no loss.
        epochs: passes over ``batches`` per block, one update per batch, in a shuffled order
            (``seed``); learning rates on a cosine from full to 0 within each block.
        lr, step_lr: as :func:`fit` (``step_lr`` a relative change of a step per update). The
            defaults were chosen on SmolLM2-135M's calibration text (output KL from an AWQ+GPTQ
            w3g128 start, 64 windows of 512 tokens: 0.515 before, 0.460 at lr 2e-5 / step_lr 2e-3,
            0.443 at these); few updates per block (one per batch) need rates above :func:`fit`'s.
        on_block: ``on_block(i, before, after)`` after block ``i`` (for logging).

    Returns:
        For every block, its output's error relative to the teacher's, per token
        ``||student_t - teacher_t||^2 / ||teacher_t||^2`` averaged over the real tokens of
        ``batches`` (the loss it is trained on), before and after its training (both with the
        trained blocks before it).

    Raises:
        QATError: no QAT layers, ``epochs < 1``, or a model or teacher without a chain of
            repeated blocks (or with different numbers of them).
    """
    from .calibrate import _block_outputs, _capture, _sequential, _token_mask, _with_hidden, as_batches, find_blocks

    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise QATError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not any(isinstance(m, QATLayer) for m in model.modules()):
        raise QATError("no QAT layers: call prepare_qat() first" + _already(model))
    batches = as_batches(batches, "block-wise distillation")
    found, tfound = find_blocks(model), find_blocks(teacher)
    if found is None or tfound is None or len(found[1]) != len(tfound[1]):
        raise QATError("block-wise distillation needs a model and a teacher made of the same chain of repeated "
                       f"blocks; found {0 if found is None else len(found[1])} and "
                       f"{0 if tfound is None else len(tfound[1])}")  # fmt: skip
    blocks, tblocks = found[1], tfound[1]
    modes = [(m, m.training) for m in [*model.modules(), *teacher.modules()]]
    model.eval()  # no dropout: the student matches the teacher's deterministic outputs
    teacher.eval()
    masks = [_token_mask(b) for b in batches]
    gen = torch.Generator().manual_seed(seed)
    result: list[tuple[float, float]] = []
    try:
        with torch.no_grad():
            if not (_sequential(model, blocks, batches[0]) and _sequential(teacher, tblocks, batches[0])):
                raise QATError("block-wise distillation needs blocks that run as a chain, each once, in order")
            s_in, t_in = _capture(model, blocks, batches), _capture(teacher, tblocks, batches)
        for i, (block, tblock) in enumerate(zip(blocks, tblocks)):
            with torch.no_grad():
                target = [_block_outputs(tblock(*a, **k)) for a, k in t_in]
                before, outs = _block_error(block, s_in, target, masks)
            layers = [m for m in block.modules() if isinstance(m, QATLayer)]
            if layers:
                opt = _Optimizer(block, layers, lr, step_lr)
                order = torch.cat([torch.randperm(len(s_in), generator=gen) for _ in range(epochs)]).tolist()
                for step, j in enumerate(order):
                    args, kwargs = s_in[j]
                    loss = _token_errors(_block_outputs(block(*args, **kwargs)), target[j], masks[j]).mean()
                    opt.update(loss, step / len(order))
                with torch.no_grad():
                    after, outs = _block_error(block, s_in, target, masks)
            else:
                after = before
            result.append((before, after))
            s_in = [_with_hidden(inp, o) for inp, o in zip(s_in, outs)]
            t_in = [_with_hidden(inp, t) for inp, t in zip(t_in, target)]
            if on_block is not None:
                on_block(i, before, after)
    finally:
        for m, mode in modes:
            m.train(mode)
    return result
