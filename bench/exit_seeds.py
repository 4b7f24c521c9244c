"""Exit rules over seeds: each rule's loss minus the fixed depth's at the same mean steps per token,
paired by seed (mean +- std), and the spread of its steps per token, from `ouroboros eval-exits`
folders (one per seed, each holding exits.json).

    python bench/exit_seeds.py runs/exits/seed0/exits runs/exits/seed1/exits runs/exits/seed2/exits
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def spread(points: list[dict], target: float) -> str:
    """p10 / p50 / p90 of steps per token at the sweep point nearest to `target` mean steps."""
    p = min(points, key=lambda q: abs(q["mean_steps"] - target))
    hist = p["steps_histogram"]
    total, out, seen = sum(hist), [], 0
    marks = iter((0.1, 0.5, 0.9))
    mark = next(marks)
    for step, n in enumerate(hist):
        seen += n
        while mark is not None and seen >= mark * total:
            out.append(step)
            mark = next(marks, None)
    return "/".join(map(str, out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    args = p.parse_args()
    runs = [json.loads((Path(f) / "exits.json").read_text()) for f in args.folders]
    targets = [str(int(t)) if float(t).is_integer() else str(t) for t in runs[0]["targets"]]
    rules = [r for r in runs[0]["at_equal_steps"][targets[0]] if r != "fixed depth"]
    print(f"{len(runs)} seeds; loss minus the fixed depth's at equal mean steps (nats, mean ± std); "
          "steps p10/p50/p90 near the target, seed 0")
    print("| rule | " + " | ".join(f"{t} steps" for t in targets) + " | " +
          " | ".join(f"spread at {t}" for t in targets) + " |")
    print("|---|" + "---|" * (2 * len(targets)))
    fixed = [" / ".join(f"{r['at_equal_steps'][t]['fixed depth']:.3f}" for r in runs) for t in targets]
    print("| fixed depth (loss per seed) | " + " | ".join(fixed) + " | " + " | ".join("—" for _ in targets) + " |")
    for rule in rules:
        cells = []
        for t in targets:
            d = [r["at_equal_steps"][t][rule] - r["at_equal_steps"][t]["fixed depth"] for r in runs
                 if r["at_equal_steps"][t].get(rule) is not None]
            cells.append("—" if not d else f"{statistics.mean(d):+.3f} ± {statistics.stdev(d) if len(d) > 1 else 0:.3f}"
                         + ("" if len(d) == len(runs) else f" ({len(d)} seeds)"))
        spreads = [spread(runs[0]["rules"][rule], float(t)) for t in targets]
        print(f"| {rule} | " + " | ".join(cells) + " | " + " | ".join(spreads) + " |")


if __name__ == "__main__":
    main()
