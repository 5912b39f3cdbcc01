"""Confusion-matrix plot for classification runs, drawn with matplotlib's Agg canvas (no display, no pyplot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_confusion_matrix(matrix: Any, label_names: list[str], path: str | Path) -> Path:
    """Write the confusion matrix as a PNG: cells annotated with counts, coloured by the fraction of the true class.

    Colouring by row fraction keeps rare classes readable next to frequent ones; the counts stay exact.
    Returns the path written.
    """
    # Figure + FigureCanvasAgg instead of pyplot: no global backend switch, no figure registry to leak into.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    n = len(label_names)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {n} label names")
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=float), where=row_sums > 0)

    side = min(max(4.0, 0.6 * n + 2.0), 24.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix",
    )
    ax.set_xticklabels(label_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(label_names)
    fontsize = max(5, 11 - n // 4)
    for (i, j), count in np.ndenumerate(counts):
        text = f"{count:g}" if np.issubdtype(counts.dtype, np.floating) else str(count)
        color = "white" if fractions[i, j] > 0.5 else "black"
        ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
