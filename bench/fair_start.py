"""Where an untrained loop starts (issue #44): the demo's loop on its planned layers (demo.yaml + demo_plan.json:
keep 0-2, 7-11, 20-24, 27-29, loop 20-21, injection, LoRA zero at init) read at depths 1..8 for each way of
starting it (`loop_start`, `gate_bias`), beside the same 16 layers run once (the heal model's start), the fixed
7 + 1 + 7 pruned floor every gap is measured from, and the full model; loss in nats per token on blocks of the
2001-2021 addresses (and of each extra domain, `--domains`). Nothing trains: a start that is not at its stack
begins behind the very model it is compared with.

    python bench/fair_start.py                                   # the issue's table, 8 held-out blocks
    python bench/fair_start.py --domains --trained-depth 2       # also the domains, read as training leaves the policy

Each depth is read off one run of the recursion (the coda and head on the state after every step), which equals
running the model at that depth (tests/test_loop_start.py checks the start itself).
"""
from __future__ import annotations

import argparse
import glob
import os

import torch

from ouroboros_lm.data import domain_blocks
from ouroboros_lm.loading import cache_dir, load_base_model, load_tokenizer
from ouroboros_lm.model import OuroborosModel
from ouroboros_lm.plan import planned_config
from ouroboros_recipes.demo import DemoRun, heal_arms, read_plan, SHIPPED_PLAN

# (row, OuroborosConfig changes over the demo's model section)
STARTS = {
    "gate b=-2 (today's demo)": dict(loop_start="gate", gate_bias=-2.0),
    "gate b=+8 (issue #44's open gate)": dict(loop_start="gate", gate_bias=8.0),
    "stack, later steps gated b=-2": dict(loop_start="stack", gate_bias=-2.0),
    "stack, later steps gated b=0": dict(loop_start="stack", gate_bias=0.0),
    "rezero (a_s = 0)": dict(loop_start="rezero", gate=False),
}


def heldout_blocks(tok, seq_len: int, n: int, seed: int) -> torch.Tensor:
    files = sorted(f for y in range(2001, 2100) for f in glob.glob(f"{cache_dir()}/sotu/{y}_*.txt"))
    return domain_blocks(files, tok, seq_len, n, seed)


@torch.no_grad()
def loss(model, blocks: torch.Tensor, batch: int, **kw) -> float:
    parts = [model(blocks[i:i + batch], labels=blocks[i:i + batch], **kw).loss.item() for i in range(0, len(blocks), batch)]
    return sum(parts) / len(parts)


@torch.no_grad()
def curve(model, blocks: torch.Tensor, depth: int, batch: int) -> list[float]:
    """The loss after each step 1..depth (coda + head on that step's state), averaged over batches of blocks."""
    sums = [0.0] * depth
    n = 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i:i + batch]
        h, ctx, mask = model.embed(ids)
        h = model.run_layers("prelude", h, ctx)
        states = []
        model.recurrent(h, ctx, depth, mask=mask, observe=lambda s, x: states.append(x))
        for s, x in enumerate(states):
            sums[s] += model.head(model.run_layers("coda", x, ctx), labels=ids).loss.item()
        n += 1
    return [v / n for v in sums]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256, help="the demo's")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=1, help="of the blocks drawn (the demo's eval seed: train.seed + 1)")
    p.add_argument("--domains", action="store_true", help="also each folder of the cache's domains/")
    p.add_argument("--trained-depth", type=int, default=0,
                   help="read with the policy training would leave (trained_depth, the demo's step_damping past it); "
                        "0: the policy as converted (every step its own parameters, no damping)")
    p.add_argument("--only", default=None, help="comma-separated substrings of the rows to run")
    args = p.parse_args()
    torch.manual_seed(0)
    run = DemoRun.load()
    plan = read_plan(SHIPPED_PLAN)
    loop = planned_config(plan, run.model)
    tok = load_tokenizer(run.demo.base)
    splits = {"heldout": heldout_blocks(tok, args.seq_len, args.blocks, args.seed)}
    if args.domains:
        for d in sorted((cache_dir() / "domains").iterdir()):
            if d.is_dir():
                splits[d.name] = domain_blocks([str(d)], tok, args.seq_len, args.blocks, args.seed)
    rows: dict[str, dict[str, list[float]]] = {}
    base = load_base_model(run.demo.base)
    rows["full model"] = {k: [loss(base, b, args.batch)] for k, b in splits.items()}
    del base
    floor = OuroborosModel.from_base(load_base_model(run.demo.base), run.model.pruned_stack()).eval()
    rows["pruned floor (7 + 1 + 7)"] = {k: [loss(floor, b, args.batch, baseline=True)] for k, b in splits.items()}
    del floor
    L = 30
    (_, name, probe), *_ = heal_arms(run, loop, L, plan)
    heal = OuroborosModel.from_base(load_base_model(run.demo.base), probe).eval()  # LoRA zero: its rank is moot
    rows[f"{name} once (the heal model's start)"] = {k: [loss(heal, b, args.batch)] for k, b in splits.items()}
    del heal
    policy = run.policy.replace(trained_depth=args.trained_depth) if args.trained_depth else run.policy.replace(
        step_damping=1.0)
    for row, changes in STARTS.items():
        if args.only and not any(o in row for o in args.only.split(",")):
            continue
        model = OuroborosModel.from_base(load_base_model(run.demo.base), loop.replace(**changes), policy=policy).eval()
        rows[row] = {k: curve(model, b, args.depth, args.batch) for k, b in splits.items()}
        print(f"  {row}: " + " ".join(f"{v:.3f}" for v in rows[row]["heldout"]), flush=True)
        del model
    read = (f"policy: trained_depth {args.trained_depth}, step_damping {run.policy.step_damping} past it"
            if args.trained_depth else "policy as converted: every step its own parameters, no damping")
    print(f"\n{args.blocks} blocks x {args.seq_len} tokens per split, seed {args.seed}; {read}; loss in nats per token\n")
    for split in splits:
        print(f"### {split}\n")
        print("| model (untrained) | " + " | ".join(f"depth {d}" for d in range(1, args.depth + 1)) + " |")
        print("|---|" + "---|" * args.depth)
        for row, by in rows.items():
            v = by[split]
            cells = [f"{x:.3f}" for x in v] if len(v) > 1 else [f"{v[0]:.3f}"] + [""] * (args.depth - 1)
            print(f"| {row} | " + " | ".join(cells) + " |")
        ref = rows[next(r for r in rows if r.endswith("(the heal model's start)"))][split][0]
        floor_loss = rows["pruned floor (7 + 1 + 7)"][split][0]
        for row in STARTS:
            if row in rows:
                v = rows[row][split]
                print(f"- {row}: depth 1 - stack {v[0] - ref:+.4f}, depth 2 - stack {v[1] - ref:+.4f}, "
                      f"worst depth {max(range(len(v)), key=lambda i: v[i]) + 1} ({max(v):.3f}; floor "
                      f"{floor_loss:.3f})")
        print()


if __name__ == "__main__":
    main()
