"""Tidy text and Markdown tables (the CLI's and BENCHMARKS.md's)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["text_table", "markdown_table"]


def _cells(rows: Sequence[Sequence[object]]) -> list[list[str]]:
    return [[c if isinstance(c, str) else f"{c}" for c in r] for r in rows]


def _numeric(s: str) -> bool:
    t = s.replace(",", "").replace("%", "").replace("x", "").replace("×", "").replace("+", "").strip()
    try:
        float(t)
    except ValueError:
        return False
    return True


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Aligned plain-text table: numbers right-aligned, text left-aligned."""
    body = _cells(rows)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """GitHub-flavoured Markdown table; numeric columns right-aligned."""
    body = _cells(rows)
    align = []
    for i in range(len(headers)):
        col = [r[i] for r in body]
        align.append("---:" if col and all(_numeric(c) or c in ("-", "") for c in col) else "---")
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)
