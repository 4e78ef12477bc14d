"""Scatter plot of predicted vs gold scores (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def scatter_plot(records: list[dict[str, Any]], path: str | Path, title: str,
                 scale: tuple[int, int] = (1, 5)) -> Path:
    """Predicted (y) vs gold (x) with the identity line; failed predictions are listed in the title count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
