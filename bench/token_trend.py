"""Does looping pay more as training tokens grow? (issue #32)

One constant-learning-rate run per configuration and seed of a sweep spec (its `train.steps` is the 1x budget),
trained to the largest multiple and evaluated at each multiple of the budget on every split of the spec (held-out
and the extra domains) at every depth of the spec's `eval.depths` and the run's default depth; then, per multiple
and split, every configuration's gap recovered at its best depth (chosen by the training split's loss, never by
held-out text) minus the first configuration's (the control), paired by seed. Resumable: a finished point is read back
from trend.json, an interrupted run resumes from its last checkpoint.

    python bench/token_trend.py configs/token-trend.yaml --out runs/token-trend --multiples 1,2,4,8
writes runs/token-trend/trend.json, trend.md and trend.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ouroboros_lm.adapter import load_adapter, save_adapter  # noqa: E402
from ouroboros_lm.atomic import ensure_dir, read_json, write_json, write_text  # noqa: E402
from ouroboros_lm.checkpoints import list_checkpoints  # noqa: E402
from ouroboros_lm.evaluate import evaluate, gap_recovered  # noqa: E402
from ouroboros_lm.loading import load_base_model  # noqa: E402
from ouroboros_lm.model import OuroborosModel  # noqa: E402
from ouroboros_lm.plots import pyplot, save_figure  # noqa: E402
from ouroboros_lm.runtime import choose_runtime  # noqa: E402
from ouroboros_lm.train import train  # noqa: E402
from ouroboros_recipes.reference import read_reference  # noqa: E402
from ouroboros_recipes.sweep import SweepSpec, reference_losses, sweep_corpus  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("--out", required=True)
    p.add_argument("--multiples", default="1,2,4,8", help="multiples of the spec's train.steps evaluated")
    args = p.parse_args(argv)
    multiples = sorted({int(m) for m in args.multiples.split(",")})
    spec, runtime = SweepSpec.load(args.spec), choose_runtime()
    out = ensure_dir(Path(args.out))
    runs = spec.expand()
    corpus, splits, ev = sweep_corpus(spec, runtime)
    reference = reference_losses(spec, runs, splits, out, ev, runtime, True, read_reference(out), corpus)
    trend_path = out / "trend.json"
    trend = read_json(trend_path, "trend") if trend_path.is_file() else {}
    unit = spec.train["steps"]
    for run in runs:
        points = trend.setdefault(run.name, {"config": run.config_name, "seed": run.seed_in(spec), "points": {}})["points"]
        todo = [m for m in multiples if str(m) not in points]
        if not todo:
            continue
        rdir = ensure_dir(out / "runs" / run.name, under=out)
        tc = run.train_config(spec)
        tc = dataclasses.replace(tc, steps=unit * multiples[-1], min_lr=tc.lr)  # constant after warmup
        if list_checkpoints(rdir):
            model = load_adapter(rdir, base=load_base_model(spec.base, dtype=runtime.dtype))
        else:
            model = OuroborosModel.from_base(load_base_model(spec.base, dtype=runtime.dtype), run.model_config(spec),
                                             base_name=spec.base, policy=run.policy())
            save_adapter(model, rdir)
        for m in todo:
            print(f"{run.name}: training to {m}x ({unit * m} steps)")
            train(model, corpus, rdir, dataclasses.replace(tc, stop_after=unit * m), resume=bool(list_checkpoints(rdir)))
            known = {s: {k: reference[s][k] for k in ("full", "baseline")} for s in splits}
            points[str(m)] = measure(model, splits, ev, known)
            write_json(trend_path, trend)
    summarize(trend, reference, list(splits), multiples, out)


def measure(model, splits, ev, known) -> dict:
    """{depth: {split: loss}} at every depth the loop is read at (the spec's eval depths and its default depth);
    the heal model has one row, filed under depth 1."""
    if model.config.heal_layers:
        rep = evaluate(model, splits, depths=(1,), batch_size=ev.batch_size, known=known)
        return {"1": {s: rep.row(s, "heal").loss for s in splits}}
    depths = sorted(set(ev.depths) | {model.policy.default_depth})
    rep = evaluate(model, splits, depths=depths, batch_size=ev.batch_size, known=known)
    return {str(d): {s: rep.row(s, f"ouroboros@{d}").loss for s in splits} for d in depths}


def best_depth(point: dict) -> tuple[str, dict]:
    """The depth whose loss on the training split is lowest (chosen without looking at held-out text), and its
    losses. A point written before depths were recorded ({split: loss}) is its own single depth."""
    if "train" in point and not isinstance(point["train"], dict):
        return "default", point
    d = min(point, key=lambda k: point[k]["train"])
    return d, point[d]


def summarize(trend: dict, reference: dict, splits: list[str], multiples: list[int], out: Path) -> None:
    configs = list(dict.fromkeys(r["config"] for r in trend.values()))
    control = configs[0]

    def gap(loss, split):
        return gap_recovered(loss, reference[split]["baseline"], reference[split]["full"])

    table = {}  # (config, multiple, split) -> [per-seed difference from the control]
    for r in trend.values():
        ctl = next((c for c in trend.values() if c["config"] == control and c["seed"] == r["seed"]), None)
        for m, point in r["points"].items():
            depth, losses = best_depth(point)
            table.setdefault((r["config"], int(m), "depth"), []).append(depth)
            paired = ctl is not None and m in ctl["points"] and r["config"] != control
            base = best_depth(ctl["points"][m])[1] if paired else None  # the control at its own best depth
            for s, loss in losses.items():
                table.setdefault((r["config"], int(m), s, "gap"), []).append(gap(loss, s))
                if paired:
                    table.setdefault((r["config"], int(m), s, "diff"), []).append(gap(loss, s) - gap(base[s], s))
            if paired and depth != "default":
                for d, at_d in point.items():  # and at every depth it was read at
                    for s, loss in at_d.items():
                        table.setdefault((r["config"], int(m), s, f"diff@{d}"), []).append(
                            gap(loss, s) - gap(base[s], s))

    def cell(values):
        if not values:
            return ""
        sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):+.1f}{sd}" + (f" (n={len(values)})" if len(values) > 1 else "")

    lines = [f"Gap recovered (%) at each multiple of the budget; control: `{control}`", ""]
    lines += ["| configuration | tokens | depth (by train loss, per seed) | " + " | ".join(splits) + " |",
              "|---|---|---|" + "---|" * len(splits)]
    for c in configs:
        for m in multiples:
            depth = ",".join(table.get((c, m, "depth"), []))
            lines.append(f"| {c} | {m}x | {depth} | "
                         + " | ".join(cell(table.get((c, m, s, "gap"), [])) for s in splits) + " |")
    lines += ["", "Minus the control, paired by seed (mean ± std over seeds)", "",
              "| configuration | tokens | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    for c in configs[1:]:
        for m in multiples:
            lines.append(f"| {c} | {m}x | " + " | ".join(cell(table.get((c, m, s, "diff"), [])) for s in splits) + " |")
    depths = sorted({k[3][5:] for k in table if len(k) == 4 and k[3].startswith("diff@")}, key=int)
    if depths:
        lines += ["", "Minus the control at each depth the configuration was read at (paired by seed)", "",
                  "| configuration | tokens | depth | " + " | ".join(splits) + " |", "|---|---|---|" + "---|" * len(splits)]
        for c in configs[1:]:
            for m in multiples:
                for d in depths:
                    if any((c, m, s, f"diff@{d}") in table for s in splits):
                        lines.append(f"| {c} | {m}x | {d} | " + " | ".join(
                            cell(table.get((c, m, s, f"diff@{d}"), [])) for s in splits) + " |")
    write_text(out / "trend.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = pyplot()
    loops = configs[1:]
    n = max(1, len(loops))
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.2), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], loops):  # one panel per configuration: each its own colours per split
        ax.set_title(short_name(c, control), fontsize=8)
        for i, s in enumerate(splits):
            pts = [(m, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                   for m in multiples if (v := table.get((c, m, s, "diff")))]
            ax.errorbar([p[0] * (1.03 ** i) for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        fmt="o-", capsize=3, color=f"C{i}", label=s)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training tokens (multiples of the demo-scale budget)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loop (best depth) minus same-layers heal\n(points of gap, mean ± sd over seeds)")
    fig.suptitle("Does looping pay more with more tokens?")
    fig.tight_layout()
    save_figure(fig, out / "trend.png", 120)
    plt.close(fig)
    write_json(out / "trend_table.json", {"|".join(map(str, k)): v for k, v in table.items()})


def short_name(config: str, control: str) -> str:
    """What sets a configuration apart from the control: the parts of its name the control's lacks."""
    mine = [part for part in config.split("-") if part not in control.split("-")]
    text = " ".join(mine) or config
    return text if len(text) <= 90 else text[:87] + "..."


if __name__ == "__main__":
    main()
