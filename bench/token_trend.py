"""Does looping pay more as training tokens grow? (issue #32)

One constant-learning-rate run per configuration and seed of a sweep spec (its `train.steps` is the 1x budget),
trained to the largest multiple and evaluated at each multiple of the budget on every split of the spec (held-out
and the extra domains) at each run's own default depth; then, per multiple and split, every configuration's gap
recovered minus the first configuration's (the control), paired by seed. Resumable: a finished point is read back
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
            rep = evaluate(model, splits, depths=(model.policy.default_depth,), batch_size=ev.batch_size, known=known)
            row = "heal" if model.config.heal_layers else f"ouroboros@{model.policy.default_depth}"
            points[str(m)] = {s: rep.row(s, row).loss for s in splits}
            write_json(trend_path, trend)
    summarize(trend, reference, list(splits), multiples, out)


def summarize(trend: dict, reference: dict, splits: list[str], multiples: list[int], out: Path) -> None:
    configs = list(dict.fromkeys(r["config"] for r in trend.values()))
    control = configs[0]

    def gap(loss, split):
        return gap_recovered(loss, reference[split]["baseline"], reference[split]["full"])

    table = {}  # (config, multiple, split) -> [per-seed difference from the control]
    for r in trend.values():
        ctl = next((c for c in trend.values() if c["config"] == control and c["seed"] == r["seed"]), None)
        for m, losses in r["points"].items():
            for s, loss in losses.items():
                table.setdefault((r["config"], int(m), s, "gap"), []).append(gap(loss, s))
                if ctl is not None and m in ctl["points"] and r["config"] != control:
                    table.setdefault((r["config"], int(m), s, "diff"), []).append(
                        gap(loss, s) - gap(ctl["points"][m][s], s))

    def cell(values):
        if not values:
            return ""
        sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):+.1f}{sd}" + (f" (n={len(values)})" if len(values) > 1 else "")

    lines = [f"Gap recovered (%) at each multiple of the budget; control: `{control}`", ""]
    lines += ["| configuration | tokens | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    for c in configs:
        for m in multiples:
            lines.append(f"| {c} | {m}x | " + " | ".join(cell(table.get((c, m, s, "gap"), [])) for s in splits) + " |")
    lines += ["", "Minus the control, paired by seed (mean ± std over seeds)", "",
              "| configuration | tokens | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    for c in configs[1:]:
        for m in multiples:
            lines.append(f"| {c} | {m}x | " + " | ".join(cell(table.get((c, m, s, "diff"), [])) for s in splits) + " |")
    write_text(out / "trend.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in configs[1:]:
        for i, s in enumerate(splits):
            pts = [(m, statistics.mean(v)) for m in multiples if (v := table.get((c, m, s, "diff")))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=s)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training tokens (multiples of the demo-scale budget)")
    ax.set_ylabel("gap recovered: loop minus same-layers heal (points)")
    ax.set_title("Does looping pay more with more tokens?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "trend.png", 120)
    plt.close(fig)
    write_json(out / "trend_table.json", {"|".join(map(str, k)): v for k, v in table.items()})


if __name__ == "__main__":
    main()
