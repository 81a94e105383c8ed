"""Recipe: an ordered list of (module-name pattern -> scheme | "skip") rules with a default.

A rule may also prune the layer or give it a low-rank correction (issue 16): its *choice* is a
scheme followed by ``+`` options, ``"w4g64+50%"`` (remove 50% of the weights), ``"w4g64+2:4"``
(keep 2 of every 4), ``"w3g64+r16"`` (a float16 rank-16 correction ``A @ B``), or several,
``"w3g64+50%+r8"``. Pruning needs a method that prunes (magnitude, wanda, sparsegpt); under such
a method a layer whose rule names no pattern stays dense.

Patterns are shell globs matched against the full module name (``model.layers.*.mlp.down_proj``)
or, prefixed with ``re:``, Python regular expressions that must match the whole name. The first
matching rule wins; no match falls back to ``default``.

Embeddings and the LM head keep their float weights unless a rule names them explicitly: a
default scheme never reaches them (their quantization error hits every token, and they are
often tied to each other). :meth:`Recipe.resolve` says why a layer got what it got, and
``lowbit inspect`` prints that reason.

JSON form::

    {"format": "lowbit-recipe", "version": 1, "default": "w4g64",
     "rules": [{"pattern": "lm_head", "scheme": "int8"},
               {"pattern": "model.layers.0.*", "scheme": "skip"}]}
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .files import write_text_atomic
from .scheme import Scheme, SchemeError, parse_scheme

__all__ = ["Recipe", "Rule", "RecipeError", "SKIP", "parse_choice", "format_choice"]

SKIP = "skip"
RECIPE_VERSION = 1  # written when no rule prunes or corrects: older readers read it
OPTIONS_VERSION = 2  # rules with "sparsity", "nm" or "rank"
_OPTION_KEYS = ("sparsity", "nm", "rank")


class RecipeError(ValueError):
    """A recipe file or rule that cannot be used."""


def _check_options(sparsity, nm, rank) -> None:
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool)
                                     and 0 < sparsity < 1):  # fmt: skip
        raise RecipeError(f"a rule's sparsity is a fraction in (0, 1) (the share of weights removed), got {sparsity!r}")
    if nm is not None:
        parts = nm.split(":") if isinstance(nm, str) else []
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
            raise RecipeError(f"a rule's N:M pattern keeps N of every M weights, 0 < N < M, e.g. '2:4'; got {nm!r}")
    if sparsity is not None and nm is not None:
        raise RecipeError("a rule prunes by sparsity or by an N:M pattern, not both")
    if rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise RecipeError(f"a rule's correction rank is a positive integer, got {rank!r}")


@dataclass(frozen=True)
class Rule:
    """``pattern`` -> ``scheme`` (``None`` means keep the layer in float, i.e. "skip"), and
    optionally the layer's pruning (``sparsity``, a fraction in (0, 1), or ``nm``, ``"2:4"``) and
    low-rank correction ``rank``."""

    pattern: str
    scheme: Scheme | None
    sparsity: float | None = None
    nm: str | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise RecipeError("a rule's pattern is a non-empty string")
        _check_options(self.sparsity, self.nm, self.rank)
        if self.scheme is None and self.options:
            raise RecipeError(f"rule {self.pattern!r} keeps the layer in float: it cannot also prune or correct it")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise RecipeError(f"bad regular expression in rule {self.pattern!r}: {e}") from None

    @property
    def options(self) -> dict:
        """The rule's pruning and correction, only those it sets: ``{"sparsity": 0.5, "rank": 8}``."""
        return {k: getattr(self, k) for k in _OPTION_KEYS if getattr(self, k) is not None}

    @property
    def choice(self) -> str:
        return format_choice(self.scheme, self.options)

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


def _scheme_or_skip(value: str | Scheme | None) -> Scheme | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == SKIP):
        return None
    return parse_scheme(value)


def parse_choice(text: str | Scheme | None) -> tuple[Scheme | None, dict]:
    """``"w3g64+50%+r8"`` -> ``(Scheme w3g64, {"sparsity": 0.5, "rank": 8})``; the options are
    ``N%`` (sparsity), ``N:M`` and ``rN`` (correction rank), each at most once; ``"skip"`` ->
    ``(None, {})``. Raises :class:`RecipeError` (or :class:`SchemeError` for the scheme part)."""
    if text is None or isinstance(text, Scheme):
        return text, {}
    if not isinstance(text, str):
        raise RecipeError(f"a choice is a string such as 'w4g64+50%', got {type(text).__name__}")
    head, *rest = [p.strip() for p in text.split("+")]
    opts: dict = {}
    for part in rest:
        low = part.lower()
        if re.fullmatch(r"\d+(\.\d+)?%", low):
            key, value = "sparsity", float(low[:-1]) / 100
        elif re.fullmatch(r"\d+:\d+", low):
            key, value = "nm", low
        elif re.fullmatch(r"r\d+", low):
            key, value = "rank", int(low[1:])
        else:
            raise RecipeError(f"{text!r}: unknown option {part!r} after the scheme; options are N% (prune that "
                              "share of the weights), N:M (keep N of every M) and rN (a rank-N correction)")  # fmt: skip
        if key in opts:
            raise RecipeError(f"{text!r}: {key} given twice")
        opts[key] = value
    scheme = _scheme_or_skip(head)
    _check_options(opts.get("sparsity"), opts.get("nm"), opts.get("rank"))
    if scheme is None and opts:
        raise RecipeError(f"{text!r}: a layer kept in float cannot also be pruned or corrected")
    return scheme, opts


def format_choice(scheme: Scheme | None, options: dict | None = None) -> str:
    """The inverse of :func:`parse_choice`: ``"w3g64+50%+r8"``."""
    out = str(scheme) if scheme is not None else SKIP
    o = options or {}
    if o.get("sparsity") is not None:
        out += f"+{100 * o['sparsity']:g}%"
    if o.get("nm") is not None:
        out += f"+{o['nm']}"
    if o.get("rank") is not None:
        out += f"+r{o['rank']}"
    return out


@dataclass
class Recipe:
    """Per-layer schemes. ``default=None`` keeps unmatched layers in float."""

    default: Scheme | None
    rules: list[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.default, str):  # Recipe(default="w4g64"): a scheme string, or "skip"
            self.default = _scheme_or_skip(self.default)

    @classmethod
    def from_scheme(cls, scheme: str | Scheme) -> Recipe:
        """A recipe that applies one scheme to every eligible layer."""
        return cls(default=parse_scheme(scheme))

    @classmethod
    def coerce(cls, spec: str | Scheme | Recipe) -> Recipe:
        """Accept what :func:`lowbit.quantize` accepts: a scheme string, a Scheme or a Recipe."""
        if isinstance(spec, Recipe):
            return spec
        return cls.from_scheme(spec)

    def add(self, pattern: str, scheme: str | Scheme | None) -> Recipe:
        """Append a rule; ``scheme`` is a choice (:func:`parse_choice`: ``"w4g64"``,
        ``"w4g64+50%+r8"``, ``"skip"``); returns self for chaining."""
        s, opts = parse_choice(scheme)
        self.rules.append(Rule(pattern, s, **opts))
        return self

    def rule_for(self, name: str) -> Rule | None:
        """The first rule matching module ``name`` (None: the default applies)."""
        return next((r for r in self.rules if r.matches(name)), None)

    def options(self, name: str) -> dict:
        """The pruning and correction of module ``name``'s rule (``{}`` for the default)."""
        rule = self.rule_for(name)
        return {} if rule is None else rule.options

    @property
    def has_options(self) -> bool:
        return any(r.options for r in self.rules)

    def resolve(self, name: str, *, embedding_or_head: bool = False) -> tuple[Scheme | None, str]:
        """The scheme for module ``name`` (``None`` = keep float) and the reason, for inspect."""
        rule = self.rule_for(name)
        if rule is not None:
            return rule.scheme, f"rule {rule.pattern!r}"
        if embedding_or_head:
            return None, "embedding/LM head kept by default (name it in a rule to include it)"
        return self.default, "default"

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "lowbit-recipe",
            "version": OPTIONS_VERSION if self.has_options else RECIPE_VERSION,
            "default": str(self.default) if self.default is not None else SKIP,
            "rules": [
                {"pattern": r.pattern, "scheme": str(r.scheme) if r.scheme is not None else SKIP, **r.options}
                for r in self.rules
            ],
        }

    @classmethod
    def from_dict(cls, d: object) -> Recipe:
        if not isinstance(d, dict) or d.get("format") != "lowbit-recipe":
            raise RecipeError('not a lowbit recipe (expected {"format": "lowbit-recipe", ...})')
        version = d.get("version")
        if version not in (RECIPE_VERSION, OPTIONS_VERSION) or isinstance(version, bool):
            raise RecipeError(
                f"unknown recipe version {version!r}; this lowbit reads versions {RECIPE_VERSION} and {OPTIONS_VERSION}"
            )
        allowed = {"pattern", "scheme", *(_OPTION_KEYS if version == OPTIONS_VERSION else ())}
        rules = d.get("rules", [])
        if not isinstance(rules, list):
            raise RecipeError("recipe 'rules' must be a list")
        try:
            out = cls(default=_scheme_or_skip(d.get("default", SKIP)))
            for i, r in enumerate(rules):
                if not isinstance(r, dict) or not {"pattern", "scheme"} <= set(r) <= allowed:
                    raise RecipeError(f"rule {i} must be an object with 'pattern' and 'scheme'"
                                      + (f" and optionally {', '.join(map(repr, _OPTION_KEYS))}"
                                         if version == OPTIONS_VERSION else " only (version 1)"))  # fmt: skip
                if not isinstance(r["scheme"], str) or "+" in r["scheme"]:
                    raise RecipeError(f"rule {i}: 'scheme' is a scheme string such as 'w4g64', got {r['scheme']!r}")
                out.rules.append(Rule(r["pattern"], _scheme_or_skip(r["scheme"]),
                                      **{k: r[k] for k in _OPTION_KEYS if k in r}))  # fmt: skip
        except SchemeError as e:
            raise RecipeError(f"bad scheme in recipe: {e}") from None
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the recipe as JSON (atomically: a temp file renamed into place)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def __str__(self) -> str:
        parts = [f"{r.pattern}->{r.choice}" for r in self.rules]
        parts.append(f"*->{self.default if self.default is not None else SKIP}")
        return ", ".join(parts)
