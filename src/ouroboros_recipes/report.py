"""`ouroboros report DIR`: a sweep folder -> results.csv / results.json / results.md and plots
(`ReportConfig`: the command's settings; the compute-curve pieces come from `ouroboros_lm.plots`).

Plots (PNG, matplotlib):
  training_curves.png      training loss vs step per run, with the pruned-baseline and full-model
                           losses (training distribution) as horizontal lines
  gap_by_variant_depth.png held-out gap recovered, runs x evaluation depth (grouped bars)
  gap_by_rank.png          held-out gap recovered by rank (runs that differ only in rank)
  controller_heatmaps.png  the Controller's modulation (targets x rank) per step, several inputs
  controller_spread.png    per step: spread of the modulation across inputs vs its size
  compute.png              loss against mean recurrence steps per token (fixed depths as curves,
                           adaptive exit as points), training distribution and held out
  summary.md / summary.json  per configuration (its seeds pooled): mean +- standard deviation over
                           seeds of the gap recovered on every split (train, held-out, each extra
                           domain) at each depth, and of the Controller's input dependence
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from ouroboros_lm.atomic import read_json, write_json, write_text
from ouroboros_lm.evaluate import gap_recovered, reduction_vs_baseline
from ouroboros_lm.plots import pyplot
from ouroboros_lm.settings import REQUIRED, setting

from .sweep_plots import plot_compute, plot_controller, plot_gap, plot_training_curves


@dataclass
class ReportConfig:
    """What `ouroboros report` reads and compares."""

    dir: str = setting(REQUIRED, "sweep folder", positional=True)
    against: str | None = setting(None, "another sweep folder scored on the same blocks: paired-by-seed differences "
                                  "of each configuration against the same one there (or its only one) -> "
                                  "paired_vs_<DIR>.md/json", metavar="DIR")
    reference: str | None = setting(None, "the configuration summary.md pairs every other one against, seed by seed "
                                    "(its name, or a part only it has; default: the one with the fewest trained "
                                    "weights)", metavar="CONFIG")

    def run(self) -> None:
        for d in (self.dir, self.against):
            if d is not None and not Path(d).is_dir():
                raise FileNotFoundError(f"sweep folder not found: {d}")
        write_report(self.dir, reference=self.reference)
        if self.against:
            compare_sweeps(self.dir, self.against)


RUN_COLUMNS = ["name", "variant", "gate", "pooling", "rank", "train_depths", "lr", "trainable_parameters", "steps", "wall_s"]
DEPTH_COLUMNS = ["train_loss", "heldout_loss", "train_reduction_pct", "heldout_reduction_pct",
                 "train_gap_recovered_pct", "heldout_gap_recovered_pct"]


def wide_rows(table: list[dict]) -> tuple[list[str], list[dict]]:
    """One row per run: run columns, then every metric at every evaluation depth."""
    depths = sorted({r["eval_depth"] for r in table})
    columns = RUN_COLUMNS + [f"{m}@{d}" for d in depths for m in DEPTH_COLUMNS]
    out: dict[str, dict] = {}
    for r in table:
        row = out.setdefault(r["name"], {k: r[k] for k in RUN_COLUMNS})
        for m in DEPTH_COLUMNS:
            row[f"{m}@{r['eval_depth']}"] = r[m]
    return columns, list(out.values())


CORE_KEYS = {"name": str, "losses": dict, "reference": dict, "trainable_parameters": int}  # what comparing needs
RESULT_KEYS = {**CORE_KEYS, "config": dict, "settings": dict, "steps": int, "wall_s": (int, float)}


def check_result(path: Path, r, keys: dict = RESULT_KEYS) -> dict:
    """A run's result.json as the tables need it, or a ValueError naming the file and the key."""
    if not isinstance(r, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(r).__name__}")
    for key, kind in keys.items():
        if not isinstance(r.get(key), kind) or isinstance(r.get(key), bool):
            raise ValueError(f"{path}: {key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    for split, losses in r["losses"].items():
        ref = r["reference"].get(split)
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not isinstance(losses, dict) or not all(number(v) for v in losses.values()) or \
                not isinstance(ref, dict) or not all(number(ref.get(m)) for m in ("full", "baseline")):
            raise ValueError(f"{path}: the losses or reference of split {split!r} are missing or not numbers")
    if keys is RESULT_KEYS and ("heldout" not in r["losses"] or "train" not in r["losses"]):
        raise ValueError(f"{path}: 'losses' lacks the train or heldout split")
    return r


def load_results(sweep_dir: Path, keys: dict = RESULT_KEYS) -> list[dict]:
    return [check_result(path, read_json(path, "run result"), keys)
            for path in sorted((sweep_dir / "runs").glob("*/result.json"))]


def metrics(result: dict, split: str, depth_key: str) -> tuple[float, float, float]:
    ref = result["reference"][split]
    loss = result["losses"][split][depth_key]
    gap = gap_recovered(loss, ref["baseline"], ref["full"])
    return loss, reduction_vs_baseline(loss, ref["baseline"]), float("nan") if gap is None else gap


HEAL = "heal"  # a heal run's one row (no recursion: it stands beside the recursion at every depth)


def fixed_rows(losses: dict, depths) -> dict[int, str]:
    """The fixed-depth rows of one split of a run, by depth: its `ouroboros@d` rows, or a heal run's one
    row at each of `depths` (adaptive rows are left to the compute plot)."""
    if HEAL in losses:
        return {d: HEAL for d in depths}
    return {int(k.split("@")[1]): k for k in losses if k.startswith("ouroboros@") and k.split("@")[1].isdigit()}


def recursion_depths(results: list[dict]) -> list[int]:
    """Every fixed depth the recursive runs were evaluated at (where a heal run's row is shown); [1] if none."""
    found = {d for r in results for losses in r["losses"].values() for d in fixed_rows(losses, ())}
    return sorted(found) or [1]


def train_depths(result: dict) -> list[int]:
    """The run's training depths (results written before they moved to the training settings
    kept them in the model config)."""
    return result.get("train_config", result["config"])["depths"]


def rows(results: list[dict]) -> list[dict]:
    out, depths = [], recursion_depths(results)
    for r in results:
        c = r["config"]
        for depth, key in fixed_rows(r["losses"]["heldout"], depths).items():
            tl, tr, tg = metrics(r, "train", key)
            hl, hr, hg = metrics(r, "heldout", key)
            out.append({
                "name": r["name"], "variant": c["variant"], "gate": c["gate"], "pooling": c["pooling"], "rank": c["rank"],
                "train_depths": "/".join(map(str, train_depths(r))), "lr": r["settings"].get("lr", ""),
                "trainable_parameters": r["trainable_parameters"], "steps": r["steps"], "wall_s": round(r["wall_s"], 1),
                "eval_depth": depth, "train_loss": round(tl, 4), "heldout_loss": round(hl, 4),
                "train_reduction_pct": round(tr, 2), "heldout_reduction_pct": round(hr, 2),
                "train_gap_recovered_pct": round(tg, 1), "heldout_gap_recovered_pct": round(hg, 1),
            })
    for row in out:
        if row["lr"] == "":
            row["lr"] = "default"
    return out


def write_tables(sweep_dir: Path, table: list[dict], results: list[dict]) -> None:
    columns, wide = wide_rows(table)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(wide)
    write_text(sweep_dir / "results.csv", buf.getvalue())
    write_json(sweep_dir / "results.json", {"rows": table, "runs": results})
    ref = results[0]["reference"] if results else {}
    lines = []
    if ref:
        lines.append(f"Reference on the same tokens: full model {ref['train']['full']:.4f} (train) / {ref['heldout']['full']:.4f} "
                     f"(held-out); pruned baseline {ref['train']['baseline']:.4f} / {ref['heldout']['baseline']:.4f}.\n")
    head = ["run", "params", "wall s", "depth", "train loss", "held-out loss", "held-out vs baseline", "held-out gap recovered"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        lines.append(f"| {r['name']} | {r['trainable_parameters']:,} | {r['wall_s']:.0f} | {r['eval_depth']} | {r['train_loss']:.4f} | "
                     f"{r['heldout_loss']:.4f} | {r['heldout_reduction_pct']:+.2f}% | {r['heldout_gap_recovered_pct']:+.1f}% |")
    write_text(sweep_dir / "results.md", "\n".join(lines) + "\n")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def spread_cell(stat, one_seed: bool, fmt: str = "+.1f") -> str:
    """A table cell for (mean, std, ...): the mean alone when there was one seed (no spread to show)."""
    if stat is None:
        return ""
    return f"{stat[0]:{fmt}}" if one_seed else f"{stat[0]:{fmt}} ± {stat[1]:{fmt.lstrip('+')}}"


def by_config(results: list[dict], reference: str | None = None) -> dict[str, list[dict]]:
    """Runs grouped by configuration (runs that differ only in seed), smallest configuration first, or
    first the `reference` one (its name, or a part of it that names only one configuration)."""
    groups: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: (r["trainable_parameters"], r.get("config_name", r["name"]))):
        groups.setdefault(r.get("config_name", r["name"]), []).append(r)
    if reference is not None:
        match = [k for k in groups if k == reference] or [k for k in groups if reference in k]
        if len(match) != 1:
            raise ValueError(f"--reference {reference!r} names {len(match)} of the configurations "
                             f"({', '.join(match or groups)}); give one configuration's name or a part only it has")
        groups = {match[0]: groups.pop(match[0]), **groups}
    return groups


def paired_differences(runs: list[dict], reference: list[dict], depths=None) -> dict:
    """Gap recovered minus the reference configuration's, seed by seed (same seed: same data order and
    initialisation draw), as (mean, std, per seed) per split and depth; only seeds both have."""
    ref = {r.get("seed"): r for r in reference}
    depths = depths or recursion_depths(runs + reference)  # where a heal run's row stands
    out: dict[str, tuple] = {}
    for r in runs:
        other = ref.get(r.get("seed"))
        if other is None:
            continue
        for split, losses in r["losses"].items():
            theirs = fixed_rows(other["losses"].get(split, {}), depths)
            for d, key in fixed_rows(losses, depths).items():
                if d in theirs:
                    diff = metrics(r, split, key)[2] - metrics(other, split, theirs[d])[2]
                    out.setdefault(f"{split}@{d}", []).append(diff)
    return {k: (*mean_std(v), v) for k, v in out.items()}


def seed_summary(results: list[dict], reference: str | None = None) -> list[dict]:
    """One entry per configuration (runs that differ only in seed), by size: for every split and fixed
    depth the gap recovered as mean, std and the values per seed, the same for its difference to the
    smallest (or the `reference`) configuration paired by seed, and the Controller's input dependence."""
    groups, depths = by_config(results, reference), recursion_depths(results)
    out = []  # smallest configuration first: the one the paired differences are taken against
    for name, runs in groups.items():
        entry = {"config": name, "seeds": [r.get("seed") for r in runs], "trainable_parameters": runs[0]["trainable_parameters"],
                 "gap": {}, "loss": {}}
        for split in runs[0]["losses"]:
            for d, key in fixed_rows(runs[0]["losses"][split], depths).items():
                gaps = [metrics(r, split, key)[2] for r in runs]
                entry["gap"][f"{split}@{d}"] = (*mean_std(gaps), gaps)
                entry["loss"][f"{split}@{d}"] = mean_std([r["losses"][split][key] for r in runs])
        entry["paired"] = paired_differences(runs, groups[next(iter(groups))], depths)
        spreads = [sp for r in runs if (sp := r.get("modulation_spread")) and None not in sp.values()]  # Controller runs
        if spreads:
            entry["input_dependence"] = {split: mean_std([sp[split]["input_dependence"] for sp in spreads])
                                         for split in spreads[0]}
        out.append(entry)
    return out


def write_summary(sweep_dir: Path, results: list[dict], reference: str | None = None) -> None:
    summary = seed_summary(results, reference)
    write_json(sweep_dir / "summary.json", summary)
    splits = list(results[0]["losses"])
    depths = sorted({int(k.split("@")[1]) for e in summary for k in e["gap"]})
    ref = results[0]["reference"]
    lines = ["Gap recovered (%, mean ± std over seeds; a bare number: one seed) per split; reference losses (full / pruned): "
             + "; ".join(f"{s} {ref[s]['full']:.3f} / {ref[s]['baseline']:.3f}" for s in splits) + ".", ""]
    for d in depths:
        head = ["configuration", "seeds", "params"] + splits + ["input dependence (held-out)"]
        lines += [f"**depth {d}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in summary:
            cells = [e["config"], str(len(e["seeds"])), f"{e['trainable_parameters']:,}"]
            one = len(e["seeds"]) == 1
            cells += [spread_cell(e["gap"].get(f"{s}@{d}"), one) for s in splits]
            cells.append(spread_cell(e.get("input_dependence", {}).get("heldout"), one, ".3f"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        first = summary[0]["config"]
        head = ["configuration"] + splits
        lines += [f"*depth {d}: gap recovered minus `{first}`'s, paired by seed (mean ± std of the per-seed differences)*",
                  "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in summary[1:]:
            cells = [e["config"]]
            for s in splits:
                g = e["paired"].get(f"{s}@{d}")
                cells.append(spread_cell(g, g is not None and len(g[2]) == 1))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    write_text(sweep_dir / "summary.md", "\n".join(lines))


def compare_sweeps(sweep_dir: str | Path, against: str | Path) -> Path:
    """Two sweeps that differ in what the spec holds fixed (training data, budget): each configuration
    of `sweep_dir` minus the same configuration of `against` (or its only one), paired by seed, on
    the splits and depths both evaluated. Refused unless the splits they share were scored on the same
    blocks (equal full-model and pruned-baseline losses; a split whose text differs, such as each sweep's
    own training text, is left out and named). Writes paired_vs_<name>.md/json in sweep_dir."""
    sweep_dir, against = Path(sweep_dir), Path(against)
    ours, theirs = load_results(sweep_dir, CORE_KEYS), load_results(against, CORE_KEYS)
    for d, res in ((sweep_dir, ours), (against, theirs)):
        if not res:
            raise ValueError(f"{d} holds no finished runs (runs/*/result.json)")
    ref_a, ref_b = ours[0]["reference"], theirs[0]["reference"]
    common = [s for s in ours[0]["losses"] if s in theirs[0]["losses"]]
    differ = [s for s in common if any(abs(ref_a[s][m] - ref_b[s][m]) > 1e-6 for m in ("full", "baseline"))]
    shared = [s for s in common if s not in differ]
    if not shared:
        raise ValueError(f"{sweep_dir} and {against} share no split scored on the same blocks"
                         + (f" ({', '.join(differ)}: their full model / pruned baseline losses differ)" if differ else ""))
    mine, other = seed_summary(ours), {e["config"]: e for e in seed_summary(theirs)}
    ours_by, groups = by_config(ours), by_config(theirs)
    out = []
    for e in mine:
        name = e["config"] if e["config"] in groups else (next(iter(groups)) if len(groups) == 1 else None)
        if name is None:
            continue
        runs = ours_by[e["config"]]
        diffs = {k: v for k, v in paired_differences(runs, groups[name], recursion_depths(ours + theirs)).items()
                 if k.split("@")[0] in shared}
        if diffs:
            out.append({"config": e["config"], "against": name, "seeds": sorted(
                {r.get("seed") for r in runs} & {r.get("seed") for r in groups[name]}, key=str),
                "gap": {k: e["gap"][k] for k in diffs}, "against_gap": {k: other[name]["gap"][k] for k in diffs},
                "paired": diffs})
    if not out:
        raise ValueError(f"no configuration of {sweep_dir} has a counterpart with the same seeds in {against}")
    stem = f"paired_vs_{against.resolve().name}"
    write_json(sweep_dir / f"{stem}.json", out)
    keys = sorted({k for e in out for k in e["paired"]}, key=lambda k: (int(k.split("@")[1]), shared.index(k.split("@")[0])))
    lines = [f"Gap recovered (%) in `{sweep_dir.name}` minus `{against.name}`, paired by seed (mean ± std of the "
             "per-seed differences; the same evaluation blocks)."
             + (f" Not compared, scored on different text in the two sweeps: {', '.join(differ)}." if differ else ""), "",
             "| configuration | against | seeds | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 3)]
    for e in out:
        cells = [e["config"], e["against"], str(len(e["seeds"]))]
        for k in keys:
            g = e["paired"].get(k)
            cells.append(spread_cell(g, g is not None and len(g[2]) == 1))
        lines.append("| " + " | ".join(cells) + " |")
    write_text(sweep_dir / f"{stem}.md", "\n".join(lines) + "\n")
    print(f"paired differences against {against} -> {sweep_dir / stem}.{{md,json}}")
    return sweep_dir / f"{stem}.md"


def write_report(sweep_dir: str | Path, reference: str | None = None) -> Path:
    plt = pyplot()
    sweep_dir = Path(sweep_dir)
    results = load_results(sweep_dir)
    if not results:
        raise ValueError(f"{sweep_dir} holds no finished runs (runs/*/result.json)")
    by_config(results, reference)  # a --reference that names no single configuration: refused before writing
    table = rows(results)
    write_tables(sweep_dir, table, results)
    write_summary(sweep_dir, results, reference)
    plot_training_curves(sweep_dir, results, plt)
    plot_gap(sweep_dir, table, plt)
    plot_controller(sweep_dir, results, plt)
    if any("mean_steps" in r for r in results):
        plot_compute(sweep_dir, results, plt)
    print(f"report: {len(results)} runs -> {sweep_dir}/results.{{csv,json,md}} and plots")
    return sweep_dir
