"""Which float modules lowbit may replace by a quantized one, and why not the others.

Quantization here is a module swap (:mod:`lowbit.driver`): ``parent.child = QuantLinear(...)``.
That is only right when two things hold, and this file checks both:

1. **The module computes exactly what lowbit's quantized module reproduces.** ``nn.Linear``,
   ``nn.Conv2d`` (zero padding), ``nn.Embedding`` (no ``max_norm``) and transformers' ``Conv1D``
   qualify, and so does a subclass that inherits their ``forward`` (and, for ``Conv2d``, its
   ``_conv_forward``) unchanged, or a module whose weight is a ``torch.nn.utils.parametrize``
   parametrization (its current value is quantized). A subclass that overrides ``forward``
   (standardising its weight, padding its input, adding a LoRA branch), or whose ``forward`` is
   replaced on the instance, computes something else: it stays float, with the reason.
2. **The module is reached only as a child called by its parent.** A parent that reads the
   child's tensors itself (``nn.MultiheadAttention`` passes ``out_proj.weight`` to
   ``F.multi_head_attention_forward``; ``nn.TransformerEncoderLayer``'s fast path reads
   ``linear1.weight``) or calls one of its methods other than ``forward`` would break on the
   swapped module. :func:`blocked` finds such reads by reading the source of the parent's
   ``forward`` (and of the methods it calls on ``self``) with :mod:`ast`: ``self.child.attr``,
   ``getattr(self.child, "attr")``, and the same through a local alias (``c = self.child``,
   ``for e in self.experts``, ``self.experts[i]``). An attribute counts when the quantized
   replacement would lack it (``weight`` does; ``bias``, ``in_features`` do not). Modules with
   forward hooks of their own are kept too: a hook may read the weight, and lowbit cannot move
   it to another module faithfully.

Whatever stays float for these reasons is listed in ``model.lowbit_layers`` with the reason and
shown by ``lowbit inspect``; a recipe rule that names it raises ``UnsupportedModuleError``.
A parent whose source cannot be read (defined in a REPL) is trusted, except for the torch
built-ins named in :data:`KNOWN_READERS`.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from functools import cache

from torch import nn

__all__ = ["kind_of", "why_not", "blocked", "is_hf_conv1d", "KNOWN_READERS"]

# Parents that read some children's tensors directly, kept for when source is unavailable.
KNOWN_READERS: dict[type, tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
    nn.TransformerEncoderLayer: ("linear1", "linear2"),
    nn.TransformerDecoderLayer: ("linear1", "linear2"),
}

# What each quantized module offers a parent that reads attributes (beyond nn.Module's own).
_OFFERS = {
    "linear": {"bias", "in_features", "out_features"},
    "conv2d": {"bias", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
               "padding_mode"},  # fmt: skip
    "embedding": {"num_embeddings", "embedding_dim", "padding_idx"},
}


def is_hf_conv1d(mod: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``)."""
    t = type(mod)
    return t.__name__ == "Conv1D" and t.__module__ == "transformers.pytorch_utils"


def _base_class(mod: nn.Module) -> type:
    """The class that defines the module's computation (a parametrized module's original class)."""
    t = type(mod)
    if getattr(mod, "parametrizations", None) is not None and t.__name__.startswith("Parametrized"):
        return t.__bases__[0]
    return getattr(t, "_lowbit_float_base", t)  # (lowbit.nn.HalfStoredLinear: nn.Linear's computation)


def _inherits(t: type, base: type, *methods: str) -> bool:
    return issubclass(t, base) and all(getattr(t, m) is getattr(base, m) for m in methods)


def why_not(mod: nn.Module) -> tuple[str | None, str]:
    """``(kind, "")`` for a module lowbit can swap (kind: ``"linear"``, ``"conv2d"``,
    ``"embedding"``), or ``(None, reason)``; ``reason`` is ``""`` for modules that are not layers
    lowbit knows at all."""
    t = _base_class(mod)
    layer = issubclass(t, (nn.Linear, nn.Conv2d, nn.Embedding)) or is_hf_conv1d(mod)
    if layer and type(mod).__call__ is not nn.Module.__call__:
        return None, f"{type(mod).__name__} overrides __call__; lowbit cannot reproduce it"
    if layer and ("forward" in vars(mod) or "_conv_forward" in vars(mod)):
        return None, "its forward is replaced on the instance (as accelerate's hooks do); lowbit cannot reproduce it"
    if layer and any(isinstance(p, nn.parameter.UninitializedParameter) for p in mod.parameters(recurse=False)):
        return None, f"{type(mod).__name__} is a lazy module not yet initialised: run one forward pass first"
    if issubclass(t, nn.Linear):
        if _inherits(t, nn.Linear, "forward"):
            return "linear", ""
        return None, f"{t.__name__} overrides nn.Linear.forward; lowbit reproduces nn.Linear's computation only"
    if is_hf_conv1d(mod):
        return "linear", ""
    if issubclass(t, nn.Conv2d):
        if not _inherits(t, nn.Conv2d, "forward", "_conv_forward"):
            return None, f"{t.__name__} overrides nn.Conv2d's forward; lowbit reproduces nn.Conv2d's computation only"
        if mod.padding_mode != "zeros":
            return None, f"Conv2d with padding_mode={mod.padding_mode!r}: lowbit's convolution pads with zeros"
        return "conv2d", ""
    if issubclass(t, nn.Embedding):
        if not _inherits(t, nn.Embedding, "forward"):
            return None, f"{t.__name__} overrides nn.Embedding.forward; lowbit reproduces nn.Embedding's lookup only"
        if mod.max_norm is not None:
            return None, "Embedding with max_norm renormalises its rows at lookup; lowbit does not"
        return "embedding", ""
    return None, ""


def kind_of(mod: nn.Module) -> str | None:
    """The quantized module kind ``mod`` maps to, or ``None`` (see :func:`why_not`)."""
    return why_not(mod)[0]


# ---- parents that read their children -------------------------------------------------------
@cache
def _method_ast(cls: type, name: str) -> ast.FunctionDef | None:
    fn = getattr(cls, name, None)
    fn = getattr(fn, "__func__", fn)
    if fn is None or not inspect.isfunction(fn) or fn is getattr(nn.Module, name, None):
        return None
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _self_child(node: ast.AST, aliases: dict[str, set[str]]) -> set[str]:
    """The child attribute names ``node`` stands for: ``self.x``, ``self.x[i]``, or an alias."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return {node.attr}
    if isinstance(node, ast.Subscript):
        return _self_child(node.value, aliases)
    if isinstance(node, ast.Name):
        return aliases.get(node.id, set())
    return set()


@cache
def _reads(cls: type) -> dict[str, frozenset[str]]:
    """For a parent class: child attribute name -> attributes its code reads on that child
    (``forward`` and the ``self.method(...)`` calls it makes, transitively). ``None``-safe:
    classes without readable source give ``{}``."""
    out: dict[str, set[str]] = {}
    todo, seen = ["forward"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        fn = _method_ast(cls, name)
        if fn is None:
            continue
        aliases: dict[str, set[str]] = {}
        for node in ast.walk(fn):  # aliases first: c = self.child / for e in self.experts
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                kids = _self_child(node.value, aliases)
                if kids:
                    aliases.setdefault(node.targets[0].id, set()).update(kids)
            elif isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
                it = node.iter
                if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("enumerate", "zip"):
                    it = it.args[0] if it.args else it
                kids = _self_child(it, aliases)
                if kids:
                    aliases.setdefault(node.target.id, set()).update(kids)
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                for kid in _self_child(node.value, aliases):
                    out.setdefault(kid, set()).add(node.attr)
                # self.method(...): follow it
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    todo.append(node.attr)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
                if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                    for kid in _self_child(node.args[0], aliases):
                        out.setdefault(kid, set()).add(node.args[1].value)
    return {k: frozenset(v) for k, v in out.items()}


def _lacks(child: nn.Module, kind: str, attrs: frozenset[str]) -> list[str]:
    """Attributes read on ``child`` that its quantized replacement would not have."""
    keep = set(dir(nn.Module)) | _OFFERS[kind]
    return sorted(a for a in attrs if a not in keep and (hasattr(child, a) or a in ("weight",)))


def blocked(model: nn.Module) -> dict[str, str]:
    """Modules of ``model`` that are swappable by type but must stay float: name -> reason.

    A module is blocked when its parent reads, on it, an attribute the quantized module would
    not have (see the module docstring), or when it carries forward hooks of its own.
    """
    out: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for pname, parent in model.named_modules():
        reads = _reads(type(parent))
        known = KNOWN_READERS.get(type(parent), ())
        for cname, child in parent.named_children():
            targets = [(cname, child)]
            if isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                targets += [(cname, c) for c in child.children()]
            for attr_owner, mod in targets:
                kind = kind_of(mod)
                if kind is None:
                    continue
                full = names[id(mod)]
                lacking = _lacks(mod, kind, reads.get(attr_owner, frozenset()))
                if attr_owner in known and "weight" not in lacking:
                    lacking.append("weight")
                if lacking and full not in out:
                    what = ", ".join(f"{cname}.{a}" for a in lacking)
                    out[full] = (
                        f"{type(parent).__name__} ({pname or 'the model'}) reads {what} directly instead of calling "
                        f"{cname}; swapping it would break the parent, so it stays float"
                    )
    for name, mod in model.named_modules():
        if kind_of(mod) is not None and name not in out and (mod._forward_hooks or mod._forward_pre_hooks):
            out[name] = "has forward hooks of its own, which may read its weight; kept float"
    return out
