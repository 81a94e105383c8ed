"""PNG plots (matplotlib, the 'report' extra): per-layer sensitivity, and size vs accuracy."""

from __future__ import annotations

import os
from pathlib import Path

from ..files import write_atomic


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("plots need the 'report' extra: pip install 'lowbit[report]'") from e
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))


def _finish(plt, fig, ax, path: str | os.PathLike, title: str) -> Path:
    """Title, legend and grid, then the PNG written atomically and the figure closed."""
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def sensitivity_plot(sens, path: str | os.PathLike, choice: dict[str, str] | None = None, title: str = "") -> Path:
    """Per-layer KL (log scale) of each candidate, layers in model order; with ``choice`` (an
    allocation), the chosen candidate of each layer is circled."""
    plt = _pyplot()
    layers = sens.layers
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.18 * len(layers) + 2)), 4.2))
    xs = range(len(layers))
    floor = min([v for d in sens.loss.values() for v in d.values() if v > 0] or [1e-6]) / 3
    for c in sens.candidates:
        if c == "skip":
            continue
        ax.plot(xs, [max(sens.loss[n][c], floor) for n in layers], marker="o", ms=3, lw=1, label=c)
    if choice:
        pts = [(i, max(sens.loss[n][choice[n]], floor)) for i, n in enumerate(layers) if choice[n] != "skip"]
        if pts:
            ax.scatter(*zip(*pts), s=60, facecolors="none", edgecolors="k", label="chosen")
        kept = [i for i, n in enumerate(layers) if choice[n] == "skip"]
        for i in kept:
            ax.axvline(i, color="0.6", lw=4, alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("KL to FP32 when quantized alone (nats)")
    step = max(1, len(layers) // 40)
    ax.set_xticks(list(xs)[::step])
    ax.set_xticklabels(layers[::step], rotation=90, fontsize=6)
    return _finish(plt, fig, ax, path, title or "per-layer sensitivity")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(size, error)`` that no other point beats on both (smaller size and
    smaller error, one of them strictly), sorted by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def tradeoff_plot(rows: list[dict], path: str | os.PathLike, x: str, y: str, xlabel: str, ylabel: str,
                  title: str = "") -> Path:  # fmt: skip
    """Scatter of ``rows`` (dicts with ``label``, ``x`` and ``y`` keys), the Pareto front (smaller
    ``x`` and smaller ``y`` both better) drawn as a step line, each point labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pts = [(float(r[x]), float(r[y])) for r in rows]
    front = pareto_front(pts)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=["C3" if i in front else "C0" for i in range(len(pts))])
    fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
    ax.step(fx, fy, where="post", color="C3", lw=1, alpha=0.7, label="Pareto front")
    for r, (px, py) in zip(rows, pts):
        ax.annotate(str(r["label"]), (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def compress_plot(result, path: str | os.PathLike, ratios: list[float] | None = None, title: str = "") -> Path:
    """Size vs accuracy of a :class:`lowbit.compress.Compressed`: the predicted KL of the best
    allocation at each ratio (the candidates' frontier, from the measured per-layer costs) and
    the KL measured on the result, before and after distillation."""
    plt = _pyplot()
    top = max(result.ratio * 1.6, 4.0)
    ratios = ratios or [1.5 + i * (top - 1.5) / 39 for i in range(40)]
    front = result.frontier(ratios)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    floor = 1e-5
    if front:
        ax.plot([r for r, _ in front], [max(k, floor) for _, k in front], marker=".", lw=1,
                label="best allocation (predicted: per-layer KL summed)")
    ax.scatter([result.ratio], [max(result.kl_before_distill, floor)], marker="s", color="C1", zorder=3,
               label="compressed (measured)")
    if result.distill_losses:
        ax.scatter([result.ratio], [max(result.kl, floor)], marker="*", s=120, color="C2", zorder=3,
                   label=f"after {len(result.distill_losses)} distillation steps (measured)")
    ax.set_yscale("log")
    ax.set_xlabel("times smaller than FP32 (stored bytes)")
    ax.set_ylabel("KL to FP32 (nats per position)")
    return _finish(plt, fig, ax, path, title or "size vs accuracy")
