"""Per-step readout: each position's next-token loss had the recursion stopped after given steps.

`OuroborosModel.forward(ids, labels=ids, depth=D, readout_steps=(s1, s2, ...))` runs the coda and
the LM head on the state after each requested step (and only those: the other steps pay nothing;
the last step's readout reuses the forward's own coda pass) and returns `step_losses` [K, B, T],
with gradients when grad is enabled (the head's loss chunked, `loss.head_token_losses`), and,
for a model with a halter, `step_halts` [K, B, T], the halter's stop probability at each of those
steps. This is what the halter trains on (`halter_training.py`) and what per-step supervision
reads (the loss at sampled intermediate steps).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch


def check_readout_steps(steps, depth: int) -> tuple[int, ...]:
    """The requested steps as a tuple: 1-based step counts, strictly increasing, each <= depth."""
    try:
        out = tuple(operator.index(s) for s in steps)
    except TypeError:
        out = None
    if not out or any(isinstance(s, bool) for s in steps) or list(out) != sorted(set(out)) \
            or out[0] < 1 or out[-1] > depth:
        raise ValueError(f"readout_steps must be strictly increasing step counts in [1, depth={depth}]; got {steps!r}")
    return out


class StepReadout:
    """Collects one forward's readouts. `loss_of(h)` [B, T]: the per-position losses through coda and
    head from the recurrence's state h; `h0`: the state before step 1 (what the halter compares to)."""

    def __init__(self, steps, depth: int, loss_of: Callable, h0: torch.Tensor, halter=None):
        self.steps, self.depth = check_readout_steps(steps, depth), depth
        self.loss_of, self.halter, self.prev = loss_of, halter, h0
        self.losses: list[torch.Tensor] = []
        self.halts: list[torch.Tensor] = []

    def observe(self, s: int, h: torch.Tensor) -> None:
        """The recursion's callback with the state after step s (0-based)."""
        if s + 1 in self.steps:
            if self.halter is not None:
                self.halts.append(self.halter(h, self.prev, s))
            if s + 1 < self.depth:  # the last step's loss comes from the forward's own coda pass
                self.losses.append(self.loss_of(h))
        self.prev = h

    def finish(self, final_losses: Callable) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step_losses [K, B, T], step_halts [K, B, T] or None); `final_losses()`: the losses of the
        forward's final coda output, the readout of step `depth`."""
        if len(self.losses) < len(self.steps):
            self.losses.append(final_losses())
        return torch.stack(self.losses), torch.stack(self.halts) if self.halts else None
