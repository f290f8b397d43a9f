"""The few plotting helpers every experiment shares (matplotlib with the Agg backend).

Experiments build their figures with plain matplotlib; these helpers only remove the
repetition: a figure context that saves a PNG and closes, and a multi-curve line plot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["curves", "figure", "plt"]


@contextlib.contextmanager
def figure(path: str | Path, ncols: int = 1, nrows: int = 1, size: tuple[float, float] | None = None,
           title: str | None = None, **subplot_kw: Any) -> Iterator[tuple[Any, Any]]:
    """Create a figure, yield ``(fig, axes)``, then save it as PNG at ``path`` and close it.

    Args:
        path: Output file; ``.png`` is appended when missing; parent folders are created.
        ncols: Subplot columns.
        nrows: Subplot rows.
        size: Figure size in inches; default 4.5 × 3.5 per panel.
        title: Optional figure title.
        **subplot_kw: Passed to ``plt.subplots``.

    Yields:
        ``(fig, axes)``: ``axes`` is a single Axes for one panel and otherwise always a 2-D
        ``[nrows, ncols]`` array (iterate with ``axes.flat``), whatever the layout.
    """
    path = Path(path)
    if path.suffix != ".png":
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    size = size or (4.5 * ncols, 3.5 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=ncols * nrows == 1, **subplot_kw)
    try:
        yield fig, axes
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def curves(ax: Any, series: Mapping[str, Sequence[float]], x: Sequence[float] | None = None,
           xlabel: str = "", ylabel: str = "", logx: bool = False, logy: bool = False,
           title: str | None = None) -> Any:
    """Draw one labelled line per entry of ``series`` on ``ax`` and return ``ax``.

    Args:
        ax: A matplotlib Axes.
        series: Label → y values.
        x: Shared x values (default ``0..len-1`` per series).
        xlabel: X-axis label.
        ylabel: Y-axis label.
        logx: Log-scale x axis.
        logy: Log-scale y axis.
        title: Axes title.
    """
    for label, ys in series.items():
        xs = x if x is not None else range(len(ys))
        ax.plot(list(xs), list(ys), label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax
