"""What a training step costs, side by side in one run: the recursion (the demo's architecture at
depth 4), the heal models (the pruned stack with plain LoRA on every kept layer: the same 15 layers,
and 7 + 4 + 7 distinct layers), each with and without distillation from the full model (the
teacher's forward on every batch). Steps are interleaved (one of each, round after round) so that a
busy machine slows them all alike; the ratios to the recursion without a teacher are what count.
These ratios turn "equal tokens" into "equal wall-clock" (docs/results.md, issue #21).

    python bench/heal_cost.py                      # SmolLM2-135M, 4 x 128 tokens (the sweep's batch), CPU
    python bench/heal_cost.py --seq-len 256 --rounds 6
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import SPLITS, base_model, sync
from ouroboros_lm import OuroborosConfig, OuroborosModel, RecursionPolicy
from ouroboros_lm.teacher import teacher_targets

ARMS = {  # name: (OuroborosConfig fields, training depth)
    "ouroboros@4 (Controller, gate, step norms, coda LoRA r2)": (dict(lora_rank=2), 4),
    "heal, equal weights (15 layers, LoRA r7)": (dict(heal_layers=1, lora_rank=7), 1),
    "heal, equal compute (18 layers, LoRA r6)": (dict(heal_layers=4, lora_rank=6), 1),
}


def step(model, optimizer, ids, depth, teacher):
    targets = teacher_targets(teacher, ids, 1.0) if teacher is not None else None
    model(ids, labels=ids, depth=depth, teacher=targets).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher = base_model("smollm2", "cpu", torch.float32)
    models = {}
    for name, (fields, depth) in ARMS.items():
        model = OuroborosModel.from_base(base_model("smollm2", "cpu", torch.float32),
                                         OuroborosConfig(**SPLITS["smollm2"], rank=32, **fields),
                                         policy=RecursionPolicy(default_depth=4)).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        models[name] = (model, opt, depth, model.num_trainable_parameters())
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch_size, args.seq_len))
    times = {(name, t): [] for name in models for t in (False, True)}
    for r in range(args.rounds + 1):  # the first round warms up, untimed
        for (name, distil), seen in times.items():
            model, opt, depth, _ = models[name]
            sync("cpu")
            t0 = time.perf_counter()
            step(model, opt, ids, depth, teacher if distil else None)
            if r:
                seen.append(time.perf_counter() - t0)
    ref = statistics.median(times[(next(iter(models)), False)])
    print(f"SmolLM2-135M, {args.batch_size} x {args.seq_len} tokens, {args.rounds} rounds, median step time "
          f"(ratio to the recursion without a teacher)")
    for (name, distil), seen in times.items():
        med = statistics.median(seen)
        print(f"  {name:58s} {'+ teacher' if distil else '         '}  {models[name][3]:>10,} trained  "
              f"{med:6.2f} s  {med / ref:5.2f}x")


if __name__ == "__main__":
    main()
