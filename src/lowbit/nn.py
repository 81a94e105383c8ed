"""Quantized modules that replace float ones by module swap.

Each holds one :class:`~lowbit.qweight.QWeight` as buffers named ``qweight``, ``scales`` and
``zeros`` (so ``state_dict`` keys are ``<module path>.qweight`` etc.), a float ``bias`` when the
original had one, and the name of the kernel that runs it (``kernel``; see :mod:`lowbit.kernels`).

* :class:`QuantLinear`: ``y (..., N) = x (..., K) @ W^T + b`` for ``nn.Linear`` and for
  transformers' ``Conv1D`` (whose stored weight is ``(K, N)``; it is transposed once here).
* :class:`QuantConv2d`: ``nn.Conv2d``; the weight ``(out, in/groups, kh, kw)`` is quantized as
  ``(out, in/groups*kh*kw)`` rows.
* :class:`QuantEmbedding`: ``nn.Embedding``; rows ``(num, dim)``, groups along ``dim``; a lookup
  dequantizes only the rows it gathers.

Static activation schemes (``w8a8-static``) also hold the calibrated int8 parameters of the
layer's input: ``act_scale``, a float32 scalar, and ``act_zero``, an int8 scalar in -127..127
(``q = clamp(round(x / act_scale) + act_zero, -127, 127)``, ``x ~ act_scale * (q - act_zero)``;
``act_zero = -127`` for unsigned inputs such as ReLU outputs, 0 for symmetric ones).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .qweight import QWeight
from .scheme import Scheme, parse_scheme
from .sparse import SparseWeight, kept_count, sparse_from_tensors, sparse_nbytes, unpack_mask

__all__ = ["QuantModule", "QuantLinear", "QuantConv2d", "QuantEmbedding", "QUANT_MODULES", "shared_row_conversion",
           "quantized_summary", "HalfStoredLinear", "HalfStoredEmbedding", "keep_half_storage"]

# While set (see shared_row_conversion), state_dict() converts each tiled weight to the row layout
# once, so modules sharing one weight (a tied embedding and LM head) emit the same tensors.
_ROWS_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lowbit_rows_memo", default=None)


@contextlib.contextmanager
def shared_row_conversion():
    """Within this block, ``state_dict()`` converts a weight shared by several modules once."""
    token = _ROWS_MEMO.set({})
    try:
        yield
    finally:
        _ROWS_MEMO.reset(token)


# The stored tensors of a weight moved to another device, by the id of its (old) qweight, held
# weakly: modules sharing one weight (a tied embedding and LM head) that move one after the other
# keep sharing one copy on the new device, and nothing here keeps a moved tensor alive.
_MOVED: dict[int, tuple[weakref.ref, dict, list]] = {}
_STORED = ("qweight", "scales", "zeros")


def _move_stored(mod: QuantModule, stored: dict, fn, device: torch.device) -> dict:
    """``stored`` (``mod``'s qweight, scales and zeros, in ``mod.layout``) in the row layout on
    ``device``, where ``fn`` moves tensors (or leaves them: a state dict's load), dtypes kept;
    made once per shared weight. The modules sharing it are listed (weakly) in
    ``mod._sharers``, so that they choose kernels together."""
    old = stored["qweight"]
    hit = _MOVED.get(id(old))
    if hit is not None and hit[0]() is old:
        moved = {n: None if r is None else r() for n, r in hit[1].items()}
        if all(moved[n] is not None for n, r in hit[1].items() if r is not None) and moved["qweight"].device == device:
            hit[2].append(weakref.ref(mod))
            mod._sharers = hit[2]
            return moved
    qw = QWeight(mod.scheme, mod.weight_shape, stored["qweight"], stored["scales"], stored["zeros"], mod.layout)
    rows = qw.to_layout("rows").tensors()
    moved = {}
    for n in _STORED:
        t = rows.get(n)
        if t is not None:
            new = fn(t)
            moved[n] = new if new.dtype == t.dtype else t.to(new.device)
        else:
            moved[n] = None
    if id(old) not in _MOVED:
        weakref.finalize(old, _MOVED.pop, id(old), None)
    mod._sharers = [weakref.ref(mod)]
    _MOVED[id(old)] = (weakref.ref(old), {n: None if t is None else weakref.ref(t) for n, t in moved.items()},
                       mod._sharers)  # fmt: skip
    return moved


def _checked_lowrank(lowrank, qw: QWeight, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A low-rank correction ``(A (N, r), B (r, K))`` as stored: float16, finite."""
    if op != "linear":
        raise ValueError(f"a low-rank correction applies to linear layers, not a {op}")
    a, b = lowrank
    r = a.shape[1] if a.dim() == 2 else -1
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != qw.rows or tuple(b.shape) != (r, qw.cols) or r < 1:
        raise ValueError(f"a low-rank correction of a {tuple(qw.shape)} weight is A (N, r), B (r, K); got "
                         f"{tuple(a.shape)}, {tuple(b.shape)}")  # fmt: skip
    a, b = a.detach().to(torch.float16).contiguous(), b.detach().to(torch.float16).contiguous()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("a low-rank correction holds NaN/Inf (or values beyond float16's range)")
    return a, b


def _checked_mask(mask: torch.Tensor, qw: QWeight) -> torch.Tensor:
    """A pruned weight's packed mask, ``(N, ceil(K / 8))`` uint8 (:mod:`lowbit.sparse`)."""
    want = (qw.rows, -(-qw.cols // 8))
    if mask.dtype != torch.uint8 or tuple(mask.shape) != want:
        raise ValueError(f"a pruned weight's mask is uint8 {want}, got {mask.dtype} {tuple(mask.shape)}")
    return mask


class QuantModule(nn.Module):
    """Common storage of the quantized modules; subclasses define ``forward``."""

    op: str = ""  # the kernel registry's op name

    def __init__(
        self,
        qw: QWeight,
        bias: torch.Tensor | None,
        method: str = "rtn",
        orig_dtype: str = "float32",
        act_scale: float | torch.Tensor | None = None,
        act_zero: int | torch.Tensor = 0,
        mask: torch.Tensor | None = None,
        lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.orig_dtype = orig_dtype  # dtype of the float weight this replaced (recorded in lowbit.json)
        self.scheme: Scheme = qw.scheme
        self.weight_shape: tuple[int, ...] = tuple(qw.shape)
        self.method = method
        self.layout = qw.layout  # "rows" as stored, or "tiled" for the CPU kernel (lowbit.packing)
        self.register_buffer("qweight", qw.data)
        self.register_buffer("scales", qw.scale)
        self.register_buffer("zeros", qw.zero)
        self.register_parameter(
            "bias", nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None
        )
        if qw.scheme.act_static:
            if act_scale is None:
                raise ValueError(
                    f"{qw.scheme} needs a calibrated activation scale: quantize with calibration= batches"
                )
            a = torch.as_tensor(act_scale, dtype=torch.float32).detach().clone().reshape(())
            if not (bool(torch.isfinite(a)) and float(a) > 0):
                raise ValueError(f"activation scale must be finite and positive, got {float(a)}")
            z = torch.as_tensor(act_zero).detach().reshape(())
            if z.is_floating_point() or not -127 <= int(z) <= 127:
                raise ValueError(f"activation zero point must be an integer in -127..127, got {z.item()}")
            self.register_buffer("act_scale", a)
            self.register_buffer("act_zero", z.to(torch.int8).clone())
        elif act_scale is not None:
            raise ValueError(f"{qw.scheme} has no static activation scale (use a -static scheme)")
        else:
            self.register_buffer("act_scale", None)
            self.register_buffer("act_zero", None)
        self.register_buffer("mask", None if mask is None else _checked_mask(mask, qw))
        a, b = (None, None) if lowrank is None else _checked_lowrank(lowrank, qw, self.op)
        self.register_buffer("lowrank_a", a)  # (N, r) float16: the correction A of W ~ deq(Q) + A @ B
        self.register_buffer("lowrank_b", b)  # (r, K) float16
        self.kernel = "reference"
        self.kernel_note = ""
        self.kernel_pref = "auto"  # what the user asked for; re-applied after a reload
        self._kernel_impl = None  # set by lowbit.kernels.assign()
        self._kernel_state = None  # what a kernel derived from the buffers (it checks validity)

    @property
    def qw(self) -> QWeight:
        """The weight as a :class:`QWeight` view of the buffers (no copy), in their layout."""
        return QWeight(self.scheme, self.weight_shape, self.qweight, self.scales, self.zeros, self.layout)

    def set_qweight(self, qw: QWeight) -> None:
        """Replace the stored weight (same scheme and shape; any layout)."""
        if qw.scheme != self.scheme or tuple(qw.shape) != self.weight_shape:
            raise ValueError("set_qweight keeps the scheme and shape")
        self._buffers["qweight"], self._buffers["scales"], self._buffers["zeros"] = qw.data, qw.scale, qw.zero
        self.layout = qw.layout
        self._kernel_state = None

    @property
    def weight(self) -> torch.Tensor:
        """The weight dequantized (a new tensor in the original dtype, original shape), for code
        that reads ``.weight`` instead of calling the module (a parent passing it to
        ``F.linear`` itself, a helper function, a hook). Such callers then compute with the
        quantized values at reference speed; lowbit keeps the children whose parents it can see
        doing this in float (:mod:`lowbit.swappable`), so this is the fallback for the ones it
        cannot see, and it warns once per module."""
        if not getattr(self, "_weight_read_warned", False):
            self._weight_read_warned = True
            warnings.warn(
                f"the .weight of a quantized {type(self).__name__} ({self.extra_repr()}) was read directly "
                "instead of calling the module; it is dequantized on every read (reference speed)",
                stacklevel=2,
            )
        dtype = getattr(torch, self.orig_dtype, torch.float32)
        w = self.dequantized()
        return w.to(dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32)

    def dequantized(self) -> torch.Tensor:
        """The weight this module computes with, float32 in the original shape: the dequantized
        codes (zeros where pruned) plus the low-rank correction ``A @ B`` if it has one."""
        w = self.qw.dequantize(torch.float32)
        if self.lowrank_a is not None:
            w = w + (self.lowrank_a.float() @ self.lowrank_b.float()).reshape(w.shape)
        return w

    def storage_note(self) -> str:
        """What is stored unlike the format's default ("" when nothing is): float32 scales for a
        weight whose range float16 scales cannot hold (:func:`lowbit.primitives.round_scale`)."""
        want = self.scheme.fmt.scale_dtype
        if self.scales is not None and want is not None and self.scales.dtype != want:
            have = str(self.scales.dtype).replace("torch.", "")
            return f"{have} scales ({str(want).replace('torch.', '')} cannot hold this weight's range at full precision)"
        return ""

    @property
    def nbytes(self) -> int:
        """Stored bytes of the weight (codes + scales + zeros, and for a pruned weight its mask
        with only the kept codes: :class:`~lowbit.sparse.SparseWeight`), plus a low-rank
        correction's float16 ``A`` and ``B``; the bias is counted apart."""
        if self.mask is None:
            out = self.qw.nbytes
        else:
            out = sparse_nbytes(self.scheme, self.weight_shape, self.mask, self.scales, self.zeros)
        if self.lowrank_a is not None:
            out += (self.lowrank_a.numel() + self.lowrank_b.numel()) * self.lowrank_a.element_size()
        return out

    @property
    def rank(self) -> int:
        """The rank of the low-rank correction (0: none)."""
        return 0 if self.lowrank_a is None else self.lowrank_a.shape[1]

    @property
    def sparsity(self) -> float:
        """The fraction of the weight pruned (0.0 for a dense weight)."""
        return 0.0 if self.mask is None else 1 - kept_count(self.mask, self.qw.cols) / self.qw.cols

    def sparse_weight(self) -> SparseWeight:
        """The pruned weight as stored (mask + kept codes), from the dense codes this module runs."""
        if self.mask is None:
            raise ValueError(f"{type(self).__name__} ({self.extra_repr()}) is not pruned")
        rows = self.qw.to_layout("rows")
        return SparseWeight.from_qweight(rows, unpack_mask(self.mask, rows.cols))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_impl is None:
            from . import kernels

            kernels.assign_at_first_call(self)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        if x.numel() == 0 or needs_grad:
            # An empty batch has nothing for a fast kernel to do; a gradient (to the input, or to
            # a bias made trainable) needs autograd, which only the reference kernel (torch ops) records.
            from .kernels import reference

            y = getattr(reference, self.op)(self, x)
        else:
            y = self._kernel_impl(self, x)
        if self.lowrank_a is not None:  # the correction, in x's float dtype: y += (x B^T) A^T
            dt = x.dtype if x.is_floating_point() else torch.float32
            y = y + F.linear(F.linear(x.to(dt), self.lowrank_b.to(dt)), self.lowrank_a.to(dt)).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        sparse = "" if self.mask is None else f", sparsity={self.sparsity:.3g}"
        sparse += f", rank={self.rank}" if self.rank else ""
        return f"shape={self.weight_shape}, scheme={self.scheme}{sparse}, method={self.method}, kernel={self.kernel}"

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() cast every floating buffer; the stored codes, scales and zero
        # points are a format, not a dtype preference, so they keep their dtypes (devices move).
        # A move to another device brings the stored row layout (the kernels there read their
        # own layouts), shared by modules that share the weight, and chooses the kernel again on
        # the next call.
        device = self.qweight.device
        target = fn(torch.empty(0, device=device)).device
        moving = target != device
        stored = {n: self._buffers[n] for n in _STORED}
        if moving:  # hidden from Module._apply: moved (once per shared weight) below
            for n in _STORED:
                self._buffers[n] = None
        kept = {n: getattr(self, n) for n in ("qweight", "scales", "zeros", "act_scale", "act_zero", "mask", "lowrank_a",
                                             "lowrank_b")}  # fmt: skip
        try:
            super()._apply(fn, recurse)
        finally:
            if moving:
                self._buffers.update(stored)
        for n, old in kept.items():
            new = getattr(self, n)
            if old is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        if moving:
            from . import kernels

            self._buffers.update(_move_stored(self, stored, fn, target))
            self.layout = "rows"
            self._kernel_impl = None  # chosen again at the next call (or by lowbit.kernels.use_kernel)
            self.kernel, self.kernel_note = "unassigned", f"moved to {self.qweight.device}: chosen at the next call"
            if not kernels.runs_on(self.kernel_pref, self.op, target.type):  # a CPU kernel asked for, on a GPU
                self.kernel_note += f" ({self.kernel_pref}, asked for before, does not run there: auto)"
                self.kernel_pref = "auto"
        self._kernel_state = None
        return self

    def __getstate__(self):
        # copy.deepcopy / pickle: what a kernel derived (raw pointers into these buffers) is
        # rebuilt on the next call, never copied
        state = self.__dict__.copy()
        state["_kernel_state"] = None
        state.pop("_sharers", None)  # weak references to the modules sharing the weight
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # State dicts (and so files) always hold the row layout, whatever the kernel reads; a
        # pruned weight holds its mask and only the kept codes (SparseWeight's tensors).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "rows" and self.mask is None:
            return
        memo = _ROWS_MEMO.get()
        key = self.qweight.data_ptr()
        qw = memo.get(key) if memo is not None else None
        if qw is None:
            qw = self.qw.to_layout("rows") if self.mask is None else self.sparse_weight()
            if memo is not None:
                memo[key] = qw
        new = qw.tensors()
        for name in ("qweight", "scales", "zeros"):
            if name not in new:
                destination.pop(prefix + name, None)
        for name, t in new.items():  # (keys already there keep their place: the file's tensor order)
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        # State dicts (and files) hold the row layout; come back to it (once for a weight modules
        # share: a tied embedding and head stay one tensor), load, and let the kernels derive their
        # layouts again at the next call, together for the modules sharing the weight.
        if self.layout != "rows":
            stored = {n: self._buffers[n] for n in _STORED}
            self._buffers.update(_move_stored(self, stored, lambda t: t, self.qweight.device))
            self.layout = "rows"
        self._kernel_impl = None
        self._kernel_state = None
        if self.mask is not None and isinstance(state_dict.get(prefix + "mask"), torch.Tensor):
            # the file's kept codes, expanded to the dense codes the kernels run (a copy of the
            # dict's entries is changed: load_state_dict hands each module its own copy)
            dense = sparse_from_tensors(self.scheme, self.weight_shape, state_dict, prefix).to_qweight()
            for name in ("qweight", "scales", "zeros"):
                state_dict.pop(prefix + name, None)
            state_dict.update({prefix + n: t for n, t in dense.tensors().items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QuantLinear(QuantModule):
    """Quantized ``nn.Linear``: weight ``(out_features, in_features)``."""

    op = "linear"

    def __init__(
        self,
        qw: QWeight,
        bias: torch.Tensor | None = None,
        method: str = "rtn",
        orig_dtype: str = "float32",
        act_scale: float | torch.Tensor | None = None,
        act_zero: int | torch.Tensor = 0,
        mask: torch.Tensor | None = None,
        lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(qw, bias, method, orig_dtype, act_scale, act_zero, mask, lowrank)
        self.out_features, self.in_features = qw.shape

    @classmethod
    def from_float(
        cls,
        mod: nn.Module,
        scheme: Scheme | str,
        *,
        name: str = "weight",
        act_scale: float | None = None,
        act_zero: int = 0,
    ) -> QuantLinear:
        w = _linear_weight(mod)
        qw = QWeight.from_float(w, parse_scheme(scheme), name=name)
        return cls(qw, mod.bias, act_scale=act_scale, act_zero=act_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def _linear_weight(mod: nn.Module) -> torch.Tensor:
    """``(out, in)`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (stored ``(in, out)``)."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return mod.weight.t()
    raise TypeError(f"not a linear layer: {type(mod).__name__}")


class QuantConv2d(QuantModule):
    """Quantized ``nn.Conv2d`` (zero padding mode); runs the dequantized weight through conv2d."""

    op = "conv2d"

    def __init__(
        self,
        qw: QWeight,
        bias: torch.Tensor | None,
        conv: dict,
        method: str = "rtn",
        orig_dtype: str = "float32",
        act_scale: float | torch.Tensor | None = None,
        act_zero: int | torch.Tensor = 0,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(qw, bias, method, orig_dtype, act_scale, act_zero, mask)
        self.stride = tuple(conv["stride"])
        self.padding = conv["padding"] if isinstance(conv["padding"], str) else tuple(conv["padding"])
        self.dilation = tuple(conv["dilation"])
        self.groups = int(conv["groups"])

    @property
    def out_features(self) -> int:
        """Rows of the flattened weight ``(out_channels, in_channels/groups * kh * kw)``: what the
        GEMM kernels call N."""
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the flattened weight (K): ``in_channels/groups * kh * kw``."""
        return math.prod(self.weight_shape[1:])

    @staticmethod
    def conv_args(mod: nn.Conv2d) -> dict:
        if mod.padding_mode != "zeros":
            raise TypeError(f"Conv2d with padding_mode={mod.padding_mode!r} is not supported")
        return {
            "stride": list(mod.stride),
            "padding": mod.padding if isinstance(mod.padding, str) else list(mod.padding),
            "dilation": list(mod.dilation),
            "groups": mod.groups,
        }

    @classmethod
    def from_float(cls, mod: nn.Conv2d, scheme: Scheme | str, *, name: str = "weight") -> QuantConv2d:
        qw = QWeight.from_float(mod.weight, parse_scheme(scheme), name=name)
        return cls(qw, mod.bias, cls.conv_args(mod))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)

    def conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantEmbedding(QuantModule):
    """Quantized ``nn.Embedding``: weight ``(num_embeddings, embedding_dim)``, groups along dim."""

    op = "embedding"

    def __init__(
        self, qw: QWeight, padding_idx: int | None = None, method: str = "rtn", orig_dtype: str = "float32",
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(qw, None, method, orig_dtype, mask=mask)
        self.num_embeddings, self.embedding_dim = qw.shape
        self.padding_idx = padding_idx

    @classmethod
    def from_float(cls, mod: nn.Embedding, scheme: Scheme | str, *, name: str = "weight") -> QuantEmbedding:
        if mod.max_norm is not None:
            raise TypeError("Embedding with max_norm renormalises its weight at lookup; not supported")
        return cls(QWeight.from_float(mod.weight, parse_scheme(scheme), name=name), mod.padding_idx)

    def rows(self, idx: torch.Tensor) -> QWeight:
        """A QWeight of only the rows ``idx`` (1-D long), shape ``(len(idx), dim)``."""
        return self.qw.rows_subset(idx)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._run(idx)


QUANT_MODULES = (QuantLinear, QuantConv2d, QuantEmbedding)

HALF_TILE_BYTES = 4 << 20  # float32 weight rows widened at a time by HalfStoredLinear (and a GEMM packs a copy)


class HalfStoredLinear(nn.Linear):
    """An unquantized ``nn.Linear`` of a float32 model whose weight ``(N, K)`` stays in the
    bf16/fp16 it was stored in (a bf16 checkpoint's LM head, loaded by :func:`lowbit.load`):
    ``y = x @ W^T + b`` is computed in ``x``'s dtype from the weight widened a tile of rows
    (:data:`HALF_TILE_BYTES` as float32) at a time; every bf16/fp16 value is exact in float32, so
    the result is a float32 linear of the stored values, and no float32 copy of the weight exists.
    When ``x`` has the weight's dtype (the model cast to bf16) this is ``nn.Linear`` itself."""

    _lowbit_float_base = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype or not x.is_floating_point():
            return super().forward(x)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.empty(x2.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        tile = max(16, HALF_TILE_BYTES // (4 * max(1, w.shape[1])))
        for n0 in range(0, w.shape[0], tile):
            y[:, n0 : n0 + tile] = x2 @ w[n0 : n0 + tile].to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], w.shape[0])


class HalfStoredEmbedding(nn.Embedding):
    """An unquantized ``nn.Embedding`` of a float32 model whose weight stays in the bf16/fp16 it
    was stored in: a lookup gathers the stored rows and returns them as float32 (exact)."""

    _lowbit_float_base = nn.Embedding

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = super().forward(idx)
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def keep_half_storage(mod: nn.Module) -> bool:
    """Make a plain ``nn.Linear``/``nn.Embedding`` whose weight is bf16/fp16 compute in float32
    from that storage (:class:`HalfStoredLinear`, :class:`HalfStoredEmbedding`, by class swap: its
    state dict is unchanged); False (nothing done) for any other module."""
    kind = {nn.Linear: HalfStoredLinear, nn.Embedding: HalfStoredEmbedding}.get(type(mod))
    if kind is None or mod.weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    mod.__class__ = kind
    return True


def quantized_summary(model: nn.Module, most: int = 3) -> str:
    """``"name (scheme, method), ..."`` of the quantized modules in ``model`` (the first ``most``),
    or ``""`` when it holds none: what errors say a model already is."""
    q = [f"{n} ({m.scheme}, {m.method})" for n, m in model.named_modules() if isinstance(m, QuantModule)]
    return ", ".join(q[:most]) + (", ..." if len(q) > most else "")
