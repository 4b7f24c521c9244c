"""The sweep's plots: training curves, gap recovered by variant / depth and by rank, the
Controller's modulation (heatmaps, input dependence), loss against compute, and where a passage's
tokens stop under adaptive exit. `report.write_report` draws them; the demo draws the last.
"""
from __future__ import annotations

from pathlib import Path

from ouroboros_lm.checkpoints import iter_metrics
from ouroboros_lm.config import TARGETS
from ouroboros_lm.plots import draw_compute, pyplot, save_figure


MAX_CURVE_POINTS = 4096  # a figure 9 inches wide shows no more


def curve_points(run_dir: Path) -> list[tuple[float, float]]:
    """(step, loss) of a run's metric records, streamed: at most MAX_CURVE_POINTS of them, evenly spaced (every
    2nd, 4th, ... record once there are more), so a metrics file of any length costs a few pages of memory."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    pts, stride, seen = [], 1, 0
    for rec in iter_metrics(run_dir):
        if not (number(rec.get("step")) and number(rec.get("loss"))):
            continue
        if seen % stride == 0:
            pts.append((rec["step"], rec["loss"]))
            if len(pts) > MAX_CURVE_POINTS:
                pts, stride = pts[::2], stride * 2
        seen += 1
    return pts


def plot_training_curves(sweep_dir: Path, results: list[dict], plt) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in results:
        pts = curve_points(sweep_dir / "runs" / r["name"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=r["name"], lw=1.2)
    ref = results[0]["reference"]["train"]
    ax.axhline(ref["baseline"], color="k", ls="--", lw=1, label=f"pruned baseline ({ref['baseline']:.2f})")
    ax.axhline(ref["full"], color="k", ls=":", lw=1, label=f"full model ({ref['full']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training curves")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure(fig, sweep_dir / "training_curves.png", 120)
    plt.close(fig)


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]]) -> None:
    import numpy as np

    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=label)
    ax.set_xticks(x, groups)
    ax.axhline(0, color="k", lw=0.8)


def plot_gap(sweep_dir: Path, table: list[dict], plt) -> None:
    depths = sorted({r["eval_depth"] for r in table})
    names = list(dict.fromkeys(r["name"] for r in table))
    fig, ax = plt.subplots(figsize=(10, 5))
    series = {n: [next((r["heldout_gap_recovered_pct"] for r in table if r["name"] == n and r["eval_depth"] == d), 0.0) for d in depths]
              for n in names}
    grouped_bars(ax, [f"depth {d}" for d in depths], series)
    ax.set_ylabel("held-out gap recovered (%)")
    ax.set_title("Held-out gap recovered by run and evaluation depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, sweep_dir / "gap_by_variant_depth.png", 120)
    plt.close(fig)

    # by rank: runs that differ only in rank
    def key(r):
        return (r["variant"], r["gate"], r["pooling"], r["train_depths"], r["lr"])

    groups: dict = {}
    for r in table:
        groups.setdefault(key(r), set()).add(r["rank"])
    best = max(groups.items(), key=lambda kv: len(kv[1]))
    fig, ax = plt.subplots(figsize=(8, 5))
    ranks = sorted(best[1])
    sel = [r for r in table if key(r) == best[0]]
    series = {f"depth {d}": [next((r["heldout_gap_recovered_pct"] for r in sel if r["rank"] == k and r["eval_depth"] == d), 0.0)
                             for k in ranks] for d in depths}
    grouped_bars(ax, [f"rank {k}" for k in ranks], series)
    ax.set_ylabel("held-out gap recovered (%)")
    ax.set_title(f"By rank ({best[0][0]}, {'gate' if best[0][1] else 'no gate'}, {best[0][2]})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, sweep_dir / "gap_by_rank.png", 120)
    plt.close(fig)


def load_modulation(path: Path) -> dict:
    """A run's modulation.pt (tensors only: weights_only), or a ValueError naming the file."""
    import torch

    try:
        mod = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file, whatever torch makes of it
        raise ValueError(f"{path} is corrupt ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if not isinstance(mod, dict) or not isinstance(mod.get("d"), torch.Tensor) or mod["d"].dim() != 4:
        raise ValueError(f"{path}: expected {{'d': a 4-dimensional tensor}}")
    return mod


def plot_controller(sweep_dir: Path, results: list[dict], plt) -> None:

    runs = [r for r in results if (sweep_dir / "runs" / r["name"] / "modulation.pt").is_file()]
    fig_h, fig_s = sweep_dir / "controller_heatmaps.png", sweep_dir / "controller_spread.png"
    if not runs:
        for path, text in ((fig_h, "no Controller run in this sweep"), (fig_s, "no Controller run in this sweep")):
            fig, ax = plt.subplots(figsize=(5, 2))
            ax.text(0.5, 0.5, text, ha="center", va="center")
            ax.axis("off")
            save_figure(fig, path, 100)
            plt.close(fig)
        return
    main = runs[0]
    mod = load_modulation(sweep_dir / "runs" / main["name"] / "modulation.pt")
    d = mod["d"]  # [inputs, steps, 7, r]
    n_in, n_steps = min(d.shape[0], 4), d.shape[1]
    lim = float(d.abs().max()) or 1.0
    fig, axes = plt.subplots(n_in, n_steps, figsize=(1.6 * n_steps + 1, 1.4 * n_in + 1), squeeze=False)
    for i in range(n_in):
        for s in range(n_steps):
            ax = axes[i][s]
            im = ax.imshow(d[i, s].numpy(), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks(range(len(TARGETS)) if s == 0 else [])
            if s == 0:
                ax.set_yticklabels(TARGETS, fontsize=6)
                ax.set_ylabel(f"input {i}", fontsize=7)
            if i == 0:
                ax.set_title(f"step {s}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="d (rank columns)")
    fig.suptitle(f"Controller modulation, {main['name']}: targets x rank, per step, per held-out input", fontsize=9)
    save_figure(fig, fig_h, 120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(runs):
        m = load_modulation(sweep_dir / "runs" / r["name"] / "modulation.pt")["d"]
        spread = m.std(dim=0).mean(dim=(-1, -2))  # across inputs, per step
        size = m.abs().mean(dim=(0, -1, -2))
        color = f"C{i % 10}"
        ax.plot(range(m.shape[1]), spread.numpy(), marker="o", color=color, label=f"{r['name']}: spread across inputs")
        ax.plot(range(m.shape[1]), size.numpy(), ls="--", color=color, label=f"{r['name']}: mean |d|")
    ax.set_xlabel("recurrence step")
    ax.set_ylabel("modulation")
    ax.set_title("Does the modulation depend on the input? (std across held-out inputs vs size)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, fig_s, 120)
    plt.close(fig)


def plot_exit_steps(tokens: list[str], steps: list[int], path: Path, title: str) -> Path:
    """Steps each token of a passage took under adaptive exit, the token under its bar, and their histogram."""
    plt = pyplot()
    fig, (top, hist) = plt.subplots(2, 1, figsize=(max(8, 0.22 * len(tokens)), 6.5), gridspec_kw={"height_ratios": [2, 1]})
    top.bar(range(len(steps)), steps, color="C0")
    top.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") or "·" for t in tokens], rotation=90, fontsize=7)
    top.set_ylabel("recurrence steps")
    top.set_title(title)
    hist.hist(steps, bins=range(1, max(steps) + 2), align="left", rwidth=0.85, color="C1")
    hist.set_xlabel("steps before exit")
    hist.set_ylabel("tokens")
    fig.tight_layout()
    save_figure(fig, path, 120)
    plt.close(fig)
    return path


def plot_compute(sweep_dir: Path, results: list[dict], plt) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, split in zip(axes, ("train", "heldout")):
        for i, r in enumerate(results):
            steps = r.get("mean_steps", {}).get(split, {})
            draw_compute(ax, [(k, steps[k], v) for k, v in r["losses"][split].items() if k in steps], r["name"], f"C{i}")
        ax.set_title(f"{split}: loss against mean steps per token")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, sweep_dir / "compute.png", 120)
    plt.close(fig)


def plot_frontier(report, stored: dict[str, int], path: Path, title: str = "", speed: dict[str, float] | None = None) -> Path:
    """The quality-compute frontier: gap recovered against decoder-layer passes per token for every model of a
    report (full, pruned stack, heal models, the recursion at each depth joined by a line), one panel per split,
    each point labelled with the pretrained layers it stores (`stored`: row name -> layers; the recursion's rows
    share one entry under "ouroboros"). Where a loop sits left of or above the heal models, looping pays.
    With `speed` (row name -> decode speed measured in the deployed runtime, relative to the full model's: "full" 1),
    that is the x-axis instead, and only the rows measured are drawn."""
    from ouroboros_lm.evaluate import gap_recovered

    plt = pyplot()
    splits = list(report.splits)
    cols = min(3, len(splits))
    rows = (len(splits) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False)
    for ax, split in zip(axes.flat, splits):
        base, full = report.row(split, "baseline"), report.row(split, "full")
        if base is None or full is None:
            ax.set_visible(False)
            continue

        def gap(r):
            return gap_recovered(r.loss, base.loss, full.loss)

        def x(r):
            return r.layers if speed is None else speed.get(r.model)

        loop = sorted((r for r in report.splits[split] if r.steps is not None and r.model.split("@")[-1].isdigit()
                       and x(r) is not None), key=x)
        if loop:
            ax.plot([x(r) for r in loop], [gap(r) for r in loop], "o-", color="C3", lw=1.4, ms=5,
                    label=f"the recursion ({stored.get('ouroboros', '?')} stored layers)")
            for r in loop:
                ax.annotate(f"depth {r.depth}", (x(r), gap(r)), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color="C3")
        for i, r in enumerate(r for r in report.splits[split] if r.model.startswith("heal")):
            if x(r) is not None:
                ax.plot([x(r)], [gap(r)], "s", color=f"C{i}", ms=7, label=f"{r.model.split(', LoRA')[0]}")
        for r, marker in ((base, "v"), (full, "^")):
            if x(r) is None:
                continue
            ax.plot([x(r)], [0.0 if r is base else 100.0], marker, color="0.35", ms=7)
            ax.annotate(f"{'pruned' if r is base else 'full'} ({stored.get(r.model, int(r.layers))})",
                        (x(r), 0.0 if r is base else 100.0), textcoords="offset points", xytext=(5, 2), fontsize=7)
        ax.set_title(split)
        ax.set_xlabel("decoder-layer passes per token" if speed is None else
                      "decode speed vs the full model (measured, stock transformers)")
        ax.set_ylabel("gap recovered (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(splits):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title or "Quality against compute: every model of the table", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    save_figure(fig, path, 120)
    plt.close(fig)
    return path
