"""Which layer-choice rule at which count: each rule's proposal from `ouroboros plan`, untrained (the loss the plan
measured, by which it ranks the rules) beside healed (gap recovered per split, mean over seeds), and each rule paired
by seed against the one the plan chose.

    python bench/layer_rules.py runs/layer-rules/plan-12.json runs/layer-rules/plan-15.json runs/layer-rules/plan-21.json \
        --runs 'runs/layer-rules*/runs/*'

A run belongs to a (count, rule) when its kept layers are that rule's proposal in that count's plan; rules that
proposed the same layers share their runs. Every run must have scored the same blocks (checked). The untrained rank
is the plan's (lowest loss first, on its own scoring blocks of the training text); the healed rank is by held-out gap;
"trained in full" counts the run's `tune_layers` (under `--tune cuts`, the layers beside its cuts: more cuts, more).
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys

from paired_runs import SPLITS, column, gap


def healed(result: dict, split: str) -> float:
    """A heal run's gap recovered on `split` (its one column; a heal model has no depth)."""
    return gap(result["losses"][split], column(result, split, 0))


def load_runs(pattern: str) -> dict[tuple[int, ...], dict[int, dict]]:
    """{kept layers: {seed: result.json}} of every finished run the glob matches."""
    found: dict[tuple[int, ...], dict[int, dict]] = {}
    reference = None
    for folder in sorted(glob.glob(pattern)):
        try:
            result = json.load(open(f"{folder}/result.json"))
        except FileNotFoundError:
            continue  # an unfinished run
        ref = {s: (result["losses"][s]["full"], result["losses"][s]["baseline"]) for s in SPLITS}
        if reference is None:
            reference = ref
        elif any(abs(a - b) > 1e-9 for s in SPLITS for a, b in zip(ref[s], reference[s])):
            sys.exit(f"{folder}: scored other blocks than the first run (reference losses differ)")
        keep = tuple(result["settings"]["keep_layers"])
        if result["seed"] in found.get(keep, {}):
            sys.exit(f"{folder}: a second run of the same layers at seed {result['seed']}: narrow --runs")
        found.setdefault(keep, {})[result["seed"]] = result
    if not found:
        sys.exit(f"{pattern!r}: no finished run")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plans", nargs="+", help="`ouroboros plan` files, one per count")
    p.add_argument("--runs", required=True, help="glob of the heal runs' folders")
    args = p.parse_args()
    runs = load_runs(args.runs)
    f = lambda v: f"{statistics.mean(v):+.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:+.1f}"  # noqa: E731
    print("| kept | rule | kept layers | trained in full | untrained loss (rank) | seeds | " + " | ".join(SPLITS)
          + " | healed rank |")
    print("|---" * (7 + len(SPLITS)) + "|")
    paired = []
    for path in args.plans:
        plan = json.load(open(path))
        cands = sorted(plan["candidates"], key=lambda c: c["loss"])
        chosen = tuple(plan["keep_layers"])
        base = runs.get(chosen, {})
        rows = []
        for rank, c in enumerate(cands, 1):
            keep = tuple(c["keep_layers"])
            seeds = runs.get(keep, {})
            gaps = {s: [healed(seeds[x], s) for x in sorted(seeds)] for s in SPLITS}
            rows.append((c, rank, keep, seeds, gaps))
            if keep != chosen:
                both = sorted(set(seeds) & set(base))
                if both:
                    paired.append((plan["keep"], c["rule"], plan["rule"], both,
                                   {s: [healed(seeds[x], s) - healed(base[x], s) for x in both] for s in SPLITS}))
        order = sorted((i for i, r in enumerate(rows) if r[3]), key=lambda i: -statistics.mean(rows[i][4]["heldout"]))
        healed_rank = {i: n for n, i in enumerate(order, 1)}
        for i, (c, rank, keep, seeds, gaps) in enumerate(rows):
            cells = " | ".join(f"{statistics.mean(gaps[s]):.1f}" if seeds else "-" for s in SPLITS)
            tuned = {len(r["settings"].get("tune_layers") or ()) for r in seeds.values()}
            print(f"| {plan['keep']} | {c['rule']}{' (plan)' if keep == chosen else ''} | {','.join(map(str, keep))} | "
                  f"{'/'.join(map(str, sorted(tuned))) or '-'} | {c['loss']:.3f} ({rank}) | {len(seeds)} | {cells} | {healed_rank.get(i, '-')} |")
    print("\nPaired by seed against the plan's choice (points of gap, mean ± std of the per-seed differences):\n")
    print("| kept | rule − plan's | seeds | " + " | ".join(SPLITS) + " |\n|---|---|---|" + "---|" * len(SPLITS))
    for keep, rule, chosen_rule, seeds, diffs in paired:
        print(f"| {keep} | {rule} − {chosen_rule} | {len(seeds)} | " + " | ".join(f(diffs[s]) for s in SPLITS) + " |")


if __name__ == "__main__":
    main()
