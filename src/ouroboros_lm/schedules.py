"""What a training run draws step by step, each a function of (seed, step) only so that a resumed
run continues exactly: the learning rate (linear warmup, cosine), the recurrence depth (uniform over
a list, or Huginn's log-normal Poisson), and the intermediate steps per-step supervision reads out.
`tc` is a `train.TrainConfig`.
"""
from __future__ import annotations

import math
import random

DEPTH_SCHEDULES = ("uniform", "lognormal_poisson")


def lr_lambda(tc):
    """Linear warmup to lr, then cosine down to min_lr at `steps`."""

    def f(step: int) -> float:
        if tc.warmup_steps and step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        span = max(1, tc.steps - tc.warmup_steps)
        progress = min(1.0, (step - tc.warmup_steps) / span)
        floor = tc.min_lr / tc.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def step_depth(tc, step: int) -> int:
    """The depth trained at `step`, a function of (seed, step) only (exact resume)."""
    rng = random.Random(tc.seed * 7_919 + step)
    lo, hi = min(tc.depths), max(tc.depths)
    if tc.depth_schedule == "lognormal_poisson":
        # Huginn's draw: rate = exp(N(log(mean - 1) - sigma^2 / 2, sigma)), so E[rate] = mean - 1; depth = 1 + Poisson(rate)
        sigma = 0.5
        rate = math.exp(rng.gauss(math.log(tc.depth_mean - 1.0) - sigma**2 / 2, sigma))
        return min(hi, max(lo, 1 + poisson(rng, rate)))
    return rng.choice(tc.depths)


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw (Knuth's method for small rates, a rounded normal for large ones)."""
    if lam > 50:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def readout_steps(tc, step: int, depth: int) -> tuple[int, ...]:
    """The intermediate steps read out at optimizer step `step` (per-step supervision): up to
    `step_loss_samples` distinct step counts in [1, depth), among those with gradients under
    truncated backprop; a function of (seed, step) only (exact resume). () when off."""
    if not (tc.step_loss_weight or tc.monotonic_weight):
        return ()
    first = max(1, depth - tc.backprop_steps) if tc.backprop_steps else 1
    window = list(range(first, depth))
    rng = random.Random(tc.seed * 104_729 + step)
    return tuple(sorted(rng.sample(window, min(tc.step_loss_samples, len(window)))))
