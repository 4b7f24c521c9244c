"""The plots the library's own commands draw: the compute curve `ouroboros eval` writes beside
eval.json (depth_curve.png), and the pieces the recipes' reports reuse (`ouroboros_recipes.report`
draws the sweep plots with them). matplotlib is imported when a plot is drawn, not before."""
from __future__ import annotations

from pathlib import Path

from .atomic import write_with


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int) -> Path:
    """A figure as PNG, written like every file we write (temporary name, never through a link)."""
    return write_with(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def draw_compute(ax, points: list[tuple[str, float, float]], label: str, color=None) -> None:
    """Loss against mean recurrence steps per token: fixed depths as a curve, adaptive rules as points."""
    fixed = sorted((st, loss) for name, st, loss in points if name.split("@")[-1].isdigit())
    line = ax.plot([p[0] for p in fixed], [p[1] for p in fixed], "o-", label=label, color=color, lw=1.3, ms=4)[0]
    auto = [(st, loss) for name, st, loss in points if not name.split("@")[-1].isdigit()]
    if auto:
        ax.plot([p[0] for p in auto], [p[1] for p in auto], "*", color=line.get_color(), ms=11,
                label=f"{label}: adaptive exit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean recurrence steps per token")
    ax.set_ylabel("loss (nats/token)")


def plot_depth_curve(report, path: Path, references: bool = True) -> Path:
    """An evaluation report's compute curve, one line per split, with the full and pruned models."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, split in enumerate(report.splits):
        color = f"C{i}"
        draw_compute(ax, [(r.model, r.steps, r.loss) for r in report.curve(split)], split, color)
        for name, ls in (("baseline", "--"), ("full", ":")):
            row = report.row(split, name)
            if references and row is not None:
                ax.axhline(row.loss, color=color, ls=ls, lw=0.9, label=f"{split}: {name} ({row.loss:.2f})")
    ax.set_title("Loss against compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, 120)
    plt.close(fig)
    return path
