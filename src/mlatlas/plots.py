"""The few plotting helpers experiments share (matplotlib with the Agg backend).

Experiments build their figures with plain matplotlib; these helpers only remove the
repetition: a figure context that saves a PNG and closes, a multi-curve line plot, the
grid-world panel (state values with the chosen actions) of the rl experiments, and an image
with its detected boxes for the detectors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    import torch

    from mlatlas.rl.gridworld import GridWorld

__all__ = ["curves", "detections", "figure", "loss_curve", "plt", "policy_grid"]


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


def policy_grid(ax: Any, world: GridWorld, values: torch.Tensor, actions: torch.Tensor,
                title: str = "") -> Any:
    """Draw a grid world's state values as a heatmap with one arrow per chosen action.

    Forbidden cells are framed orange, the target blue; "stay" is drawn as a ring.

    Args:
        ax: A matplotlib Axes.
        world: The :class:`~mlatlas.rl.gridworld.GridWorld`.
        values: ``(S,)`` state values shown as colours and numbers.
        actions: ``(S, A)`` bool or 0/1 mask of the actions to draw in each state.
        title: Axes title.
    """
    import torch

    from mlatlas.rl.gridworld import MOVES  # lazy: plots must not pull in gymnasium

    grid = values.detach().double().view(world.rows, world.cols).numpy()
    im = ax.imshow(grid, cmap="viridis")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for row, col in world.forbidden:
        ax.add_patch(_cell_frame(row, col, "orange"))
    ax.add_patch(_cell_frame(*world.target, "deepskyblue"))
    mask = torch.as_tensor(actions).bool()
    for s in range(world.n_states):
        row, col = world.cell(s)
        ax.text(col, row + 0.32, f"{float(values[s]):.1f}", ha="center", va="center",
                fontsize=7, color="white")
        for a in mask[s].nonzero().flatten().tolist():
            d_row, d_col = MOVES[a]
            if d_row == 0 and d_col == 0:
                ax.plot(col, row, "o", ms=4, mfc="none", mec="white")
            else:
                ax.arrow(col, row, 0.3 * d_col, 0.3 * d_row, head_width=0.1, color="white",
                         length_includes_head=True)
    ax.set_xticks(range(world.cols))
    ax.set_yticks(range(world.rows))
    ax.set_title(title, fontsize=9)
    return ax


def _cell_frame(row: int, col: int, color: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, ec=color, lw=2.5)


def loss_curve(ax: Any, losses: Sequence[float], label: str, title: str,
               points: int = 50) -> None:
    """A training loss per step, averaged over consecutive blocks to about ``points`` points."""
    k = max(1, len(losses) // points)
    starts = list(range(0, len(losses), k))
    smooth = [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in starts]
    curves(ax, {label: smooth}, x=starts, xlabel="step", ylabel="loss", logy=True, title=title)


DETECTION_COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple")


def detections(ax: Any, image: torch.Tensor, detection: Mapping[str, torch.Tensor],
               classes: Sequence[str], min_score: float = 0.5) -> None:
    """Draw ``image`` ``[3, H, W]`` (values in [0, 1]) with its boxes scoring ≥ ``min_score``.

    ``detection`` holds ``boxes`` ``[n, 4]`` ``(x1, y1, x2, y2)`` pixels, ``scores`` ``[n]``
    and ``labels`` ``[n]``; each box is outlined in its class colour with "class score".
    """
    from matplotlib.patches import Rectangle

    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    for b, s, lab in zip(detection["boxes"], detection["scores"], detection["labels"]):
        if s < min_score:
            continue
        x1, y1, x2, y2 = (b - 0.5).tolist()  # pixel centres → edges for imshow
        c = DETECTION_COLOURS[int(lab) % len(DETECTION_COLOURS)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=c, lw=1.2))
        ax.text(x1, y1 - 1, f"{classes[int(lab)]} {float(s):.2f}", fontsize=6, color=c)
    ax.axis("off")
