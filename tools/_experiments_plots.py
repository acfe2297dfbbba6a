"""PNG plots of the sweep: a metric vs step per method (mean over seeds, shaded +-1 std), headless."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from _experiments_stats import RunData, across_seeds, trailing_mean

# Fixed colours per method name so that a method keeps its colour across plots and reruns.
_PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#ff7f0e", "#e377c2", "#17becf", "#7f7f7f",
            "#bcbd22"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on the machines this runs on
    import matplotlib.pyplot as plt

    return plt


def colours(methods: Sequence[str]) -> Dict[str, str]:
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(methods)}


def _draw(ax, runs: List[RunData], key: str, label: str, colour: str, smooth: int, dashed: bool) -> bool:
    steps, mean, std, _ = across_seeds(runs, key)
    if not steps:
        return False
    mean_s = trailing_mean(mean, smooth)
    std_s = trailing_mean(std, smooth)
    ax.plot(steps, mean_s, color=colour, label=f"{label} (n={len(runs)})", linestyle="--" if dashed else "-",
            linewidth=1.6)
    ax.fill_between(steps, [m - s for m, s in zip(mean_s, std_s, strict=True)],
                    [m + s for m, s in zip(mean_s, std_s, strict=True)], color=colour, alpha=0.15, linewidth=0)
    return True


def plot_metric(path: Path, runs_by_method: Dict[str, List[RunData]], labels: Dict[str, str],
                panels: List[tuple], key: str, ylabel: str, smooth: int, title: str,
                hline: Optional[float] = None) -> bool:
    """One PNG with one panel per (panel title, [method names]); returns False when nothing was plotted."""
    plt = _pyplot()
    palette = colours(list(runs_by_method))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False, sharey=True)
    drawn = False
    for ax, (panel_title, names) in zip(axes[0], panels, strict=True):
        for index, name in enumerate(names):
            runs = runs_by_method.get(name) or []
            drawn |= _draw(ax, runs, key, labels[name], palette[name], smooth, dashed=index > 0 and "maspo" in name)
        if hline is not None:
            ax.axhline(hline, color="black", linewidth=0.8, linestyle=":", label=f"threshold {hline:g}")
        ax.set_title(panel_title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title + (f" (trailing mean over {smooth} steps; band: +-1 std over seeds)" if smooth > 1
                          else " (band: +-1 std over seeds)"), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_maspo_stats(path: Path, runs_by_method: Dict[str, List[RunData]], labels: Dict[str, str],
                     names: List[str], keys: List[tuple], smooth: int) -> bool:
    """A grid of MASPO statistics (one panel per (key, title)) for the given methods."""
    plt = _pyplot()
    palette = colours(list(runs_by_method))
    columns = 3
    rows = (len(keys) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    drawn = False
    for index, (key, title) in enumerate(keys):
        ax = axes[index // columns][index % columns]
        for position, name in enumerate(names):
            drawn |= _draw(ax, runs_by_method.get(name) or [], key, labels[name], palette[name], smooth,
                           dashed=position > 0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
        if index == 0:
            ax.legend(fontsize=7, loc="best")
    for index in range(len(keys), rows * columns):
        axes[index // columns][index % columns].axis("off")
    fig.suptitle(f"MASPO statistics per RL step (trailing mean over {smooth} steps; band: +-1 std over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn
