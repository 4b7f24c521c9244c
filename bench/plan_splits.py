"""The untrained pruned stacks a plan proposed, scored on text the plan never saw (issue #33's first target).

For each plan file, every candidate rule's kept layers, run once with nothing added (the pruned stack), on every
evaluation split of a sweep spec (held-out text and its extra domains, the same blocks a sweep scores), beside
the full model: loss in nats per token.

    python bench/plan_splits.py configs/fair-loop.yaml runs/plan15.json runs/plan16.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ouroboros_lm.loading import load_base_model  # noqa: E402
from ouroboros_lm.plan import Stack, compact, read_plan  # noqa: E402
from ouroboros_lm.runtime import choose_runtime  # noqa: E402
from ouroboros_recipes.sweep import SweepSpec, sweep_corpus  # noqa: E402


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("plans", nargs="+")
    p.add_argument("--batch", type=int, default=8, help="blocks per forward pass")
    args = p.parse_args(argv)
    spec = SweepSpec.load(args.spec)
    _, splits, _ = sweep_corpus(spec, choose_runtime())
    splits.pop("train", None)
    base = load_base_model(spec.base).eval()
    L = len(base.model.layers)
    rows = {"full model": list(range(L))}
    for path in args.plans:
        plan = read_plan(path)
        for c in plan["candidates"]:
            rows.setdefault(f"{c['rule']} ({len(c['keep_layers'])})" + (" *" if c["rule"] == plan["rule"] else ""),
                            c["keep_layers"])
    print("| kept layers | rule (layers) | " + " | ".join(splits) + " |")
    print("|---|---|" + "---|" * len(splits))
    for name, layers in rows.items():
        losses = []
        for blocks in splits.values():
            total = 0.0
            for i in range(0, len(blocks), args.batch):
                chunk = blocks[i:i + args.batch]
                total += Stack(base, chunk).loss_of(layers) * len(chunk)
            losses.append(total / len(blocks))
        print(f"| {compact(layers)} | {name} | " + " | ".join(f"{x:.3f}" for x in losses) + " |", flush=True)


if __name__ == "__main__":
    main()
