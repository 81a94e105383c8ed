"""Recipe: an ordered list of (module-name pattern -> scheme | "skip") rules with a default.

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

__all__ = ["Recipe", "Rule", "RecipeError", "SKIP"]

SKIP = "skip"
RECIPE_VERSION = 1


class RecipeError(ValueError):
    """A recipe file or rule that cannot be used."""


@dataclass(frozen=True)
class Rule:
    """``pattern`` -> ``scheme`` (``None`` means keep the layer in float, i.e. "skip")."""

    pattern: str
    scheme: Scheme | None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise RecipeError("a rule's pattern is a non-empty string")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise RecipeError(f"bad regular expression in rule {self.pattern!r}: {e}") from None

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


def _scheme_or_skip(value: str | Scheme | None) -> Scheme | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == SKIP):
        return None
    return parse_scheme(value)


@dataclass
class Recipe:
    """Per-layer schemes. ``default=None`` keeps unmatched layers in float."""

    default: Scheme | None
    rules: list[Rule] = field(default_factory=list)

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
        """Append a rule (``scheme`` may be ``"skip"``); returns self for chaining."""
        self.rules.append(Rule(pattern, _scheme_or_skip(scheme)))
        return self

    def resolve(self, name: str, *, embedding_or_head: bool = False) -> tuple[Scheme | None, str]:
        """The scheme for module ``name`` (``None`` = keep float) and the reason, for inspect."""
        for rule in self.rules:
            if rule.matches(name):
                return rule.scheme, f"rule {rule.pattern!r}"
        if embedding_or_head:
            return None, "embedding/LM head kept by default (name it in a rule to include it)"
        return self.default, "default"

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "lowbit-recipe",
            "version": RECIPE_VERSION,
            "default": str(self.default) if self.default is not None else SKIP,
            "rules": [
                {"pattern": r.pattern, "scheme": str(r.scheme) if r.scheme is not None else SKIP}
                for r in self.rules
            ],
        }

    @classmethod
    def from_dict(cls, d: object) -> Recipe:
        if not isinstance(d, dict) or d.get("format") != "lowbit-recipe":
            raise RecipeError('not a lowbit recipe (expected {"format": "lowbit-recipe", ...})')
        if d.get("version") != RECIPE_VERSION:
            raise RecipeError(
                f"unknown recipe version {d.get('version')!r}; this lowbit reads version {RECIPE_VERSION}"
            )
        rules = d.get("rules", [])
        if not isinstance(rules, list):
            raise RecipeError("recipe 'rules' must be a list")
        try:
            out = cls(default=_scheme_or_skip(d.get("default", SKIP)))
            for i, r in enumerate(rules):
                if not isinstance(r, dict) or set(r) != {"pattern", "scheme"}:
                    raise RecipeError(f"rule {i} must be an object with exactly 'pattern' and 'scheme'")
                out.add(r["pattern"], r["scheme"])
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
        parts = [f"{r.pattern}->{r.scheme if r.scheme is not None else SKIP}" for r in self.rules]
        parts.append(f"*->{self.default if self.default is not None else SKIP}")
        return ", ".join(parts)
