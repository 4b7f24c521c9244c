"""Paired-by-seed differences between two configurations of (possibly) different sweeps, each read at
its own depth: gap recovered (points) and loss (nats) per split, mean ± std over the seeds both have.

`ouroboros report DIR --against OTHER` pairs the same configuration across two sweeps; this pairs any
two, at the depths that make the comparison fair (a block of two layers at depth 2 against one layer at
depth 4: the same layer passes). Both sweeps must score the same blocks (their reference losses agree;
checked).

    python bench/paired_runs.py runs/block/runs/*block_layers2*:2 runs/state-scale/runs/*injectionlinear-lora_rank2-step_damping0.5-seed*:4
    (a heal model has no depth: give any, e.g. :0)

A depth of `best` reads each seed's run at the depth with the lowest loss on the training split (never chosen on
held-out text). `--reference SWEEP/reference.json` measures every gap from that sweep's floor (its pruned baseline
on the same blocks; the full model's losses must agree), e.g. to pair runs of sweeps whose floors differ.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys

from ouroboros_lm.evaluate import gap_recovered

SPLITS = ("heldout", "shakespeare", "debian", "email")


def runs_of(arg: str) -> tuple[dict[int, dict], int | str]:
    """{seed: result.json} of the run folders the glob matches, and the depth to read (or "best")."""
    pattern, _, depth = arg.rpartition(":")
    if not pattern:
        sys.exit(f"{arg!r}: expected GLOB:DEPTH")
    found = {}
    for folder in sorted(glob.glob(pattern)):
        try:
            result = json.load(open(f"{folder}/result.json"))
        except FileNotFoundError:
            continue  # an unfinished run
        if result["seed"] in found and found[result["seed"]]["config_name"] != result["config_name"]:
            sys.exit(f"{pattern!r} matches two configurations ({result['config_name']}, "
                     f"{found[result['seed']]['config_name']}): narrow it")
        found[result["seed"]] = result
    if not found:
        sys.exit(f"{pattern!r}: no finished run")
    return found, depth if depth == "best" else int(depth)


def column(result: dict, split: str, depth: int | str) -> str:
    losses = result["losses"][split]
    keys = [k for k in losses if k not in ("full", "baseline")]
    if len(keys) == 1:
        return keys[0]  # a heal model has one column
    if depth == "best":  # the depth its training loss prefers, the same on every split
        train = result["losses"]["train"]
        return min((k for k in train if k.startswith("ouroboros@")), key=lambda k: train[k])
    return f"ouroboros@{depth}"


def gap(losses: dict, key: str) -> float:
    return gap_recovered(losses[key], losses["baseline"], losses["full"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="GLOB:DEPTH of the configuration measured")
    p.add_argument("b", help="GLOB:DEPTH of the one it is compared against")
    p.add_argument("--reference", default=None, metavar="REFERENCE.json",
                   help="a sweep's reference.json: every gap from its floor (the full model's losses must agree)")
    args = p.parse_args()
    (a, da), (b, db) = runs_of(args.a), runs_of(args.b)
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        sys.exit(f"only seeds {seeds} in both: a paired spread needs two or more")
    ref = json.load(open(args.reference)) if args.reference else None
    for s in seeds:
        for split in SPLITS:
            ra, rb = a[s]["losses"][split], b[s]["losses"][split]
            if ref is not None:
                if max(abs(ra["full"] - ref[split]["full"]), abs(rb["full"] - ref[split]["full"])) > 1e-9:
                    sys.exit(f"seed {s}, {split}: the runs and {args.reference} scored different blocks")
                for r in (ra, rb):
                    r["baseline"] = ref[split]["baseline"]
            elif abs(ra["baseline"] - rb["baseline"]) > 1e-9 or abs(ra["full"] - rb["full"]) > 1e-9:
                sys.exit(f"seed {s}, {split}: the two sweeps scored different blocks (reference losses differ)")
    name = lambda r, d: f"{next(iter(r.values()))['config_name']} @ {d}"  # noqa: E731
    print(f"A = {name(a, da)}\nB = {name(b, db)}\nseeds {seeds}; A - B, mean ± std of the per-seed differences")
    for r, d, label in ((a, da, "A"), (b, db, "B")):
        if d == "best":
            print(f"{label}'s depth by training loss: " + ", ".join(f"seed {s}: {column(r[s], 'train', d)}" for s in seeds))
    print()
    print("| split | A gap % | B gap % | A - B (points) | A - B (nats) |\n|---|---|---|---|---|")
    for split in SPLITS:
        ga, gb, dg, dl = [], [], [], []
        for s in seeds:
            la, lb = a[s]["losses"][split], b[s]["losses"][split]
            ka, kb = column(a[s], split, da), column(b[s], split, db)
            ga.append(gap(la, ka))
            gb.append(gap(lb, kb))
            dg.append(ga[-1] - gb[-1])
            dl.append(la[ka] - lb[kb])
        f = lambda v: f"{statistics.mean(v):+.1f} ± {statistics.stdev(v):.1f}"  # noqa: E731
        print(f"| {split} | {statistics.mean(ga):.1f} | {statistics.mean(gb):.1f} | {f(dg)} | "
              f"{statistics.mean(dl):+.3f} ± {statistics.stdev(dl):.3f} |")


if __name__ == "__main__":
    main()
