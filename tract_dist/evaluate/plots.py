"""Scatter plot of predicted vs gold scores (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display on training and evaluation machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (its folder made) and free it: pyplot keeps every open figure alive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def scatter_plot(records: list[dict[str, Any]], path: str | Path, title: str,
                 scale: tuple[int, int] = (1, 5)) -> Path:
    """Predicted (y) vs gold (x) with the identity line; failed predictions are listed in the title count."""
    plt = _pyplot()
    good = [r for r in records if r["prediction"] is not None]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter([r["gold"] for r in good], [r["prediction"] for r in good], s=12, alpha=0.6)
    lo, hi = scale
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, linestyle="--")
    ax.set_xlim(lo - 0.2, hi + 0.2)
    ax.set_ylim(lo - 0.2, hi + 0.2)
    ax.set_xlabel("gold score")
    ax.set_ylabel("predicted score")
    ax.set_title(f"{title} (n={len(good)}, failed={len(records) - len(good)})")
    return _save(fig, path)


def pearson_bars(values: dict[tuple[str, str], float | None], path: str | Path, title: str) -> Path:
    """Grouped bars: one group per benchmark, one bar per series (a stage and inference mode), height the
    Pearson correlation; an undefined one (a constant prediction vector) is marked ``n/a`` instead of drawn.

    ``values``: ``{(series, benchmark): pearson}``, e.g. ``{("stage2 cot_rail", "vicuna"): 0.41}``."""
    plt = _pyplot()
    series = sorted({s for s, _ in values})
    benches = sorted({b for _, b in values})
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(benches) * max(1, len(series)) + 1.5), 4), dpi=100)
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(benches))]
        ys = [values.get((s, b)) for b in benches]
        bars = ax.bar(xs, [0.0 if y is None else y for y in ys], width, label=s)
        for bar, y in zip(bars, ys):
            ax.annotate("n/a" if y is None else f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="top" if y is not None and y < 0 else "bottom", fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylim(min(-0.1, *(v for v in values.values() if v is not None), 0) - 0.05, 1.05)
    ax.set_ylabel("Pearson (predicted vs gold)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
