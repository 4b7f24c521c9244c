"""Per-token adaptive depth: each position stops recurring once its state has converged (or a
trained halter says so), and keeps its last state from then on.

A position that has stopped still takes part in later steps' attention: its keys and values
there are those of the last step it computed (as in Huginn's adaptive exit), and the Controller's
causal pooled view sees its frozen state. Every decision is causal (it depends only on the
position's own state), so cached decoding makes the same decisions as a full forward, and a
token that stopped early really skips the remaining steps there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MAX_DEPTH
from .settings import setting, validate_fields

RULES = ("converged", "halter")


@dataclass
class ExitRule:
    """When a position stops recurring (up to the forward's depth, which acts as the maximum)."""

    rule: str = setting("converged", "converged: the relative change of the state ||h_s - h_(s-1)|| / ||h_(s-1)|| "
                        "falls below the threshold; halter: the trained halter's stop probability exceeds it",
                        choices=RULES, flag="--exit-rule")
    threshold: float = setting(0.05, "the rule's threshold", above=0, high=1e6, flag="--exit-threshold")
    min_steps: int = setting(1, "steps every position takes before it may stop", low=1, high=MAX_DEPTH,
                             flag="--exit-min-steps")

    def __post_init__(self) -> None:
        validate_fields(self)


def relative_change(h_new: torch.Tensor, h_old: torch.Tensor) -> torch.Tensor:
    """||h_new - h_old|| / ||h_old|| per position, in float32."""
    diff = (h_new.float() - h_old.float()).norm(dim=-1)
    return diff / h_old.float().norm(dim=-1).clamp(min=1e-6)


class TokenExits:
    """The exit state of one forward over positions [B, T].

    rule: an ExitRule deciding from the states; or `forced` [B, T]: the number of steps each
    position takes (to replay recorded decisions). `steps` counts the steps each position ran."""

    def __init__(self, shape, device, rule: ExitRule | None = None, forced: torch.Tensor | None = None):
        if (rule is None) == (forced is None):
            raise ValueError("give exactly one of an exit rule or forced exit steps")
        if forced is not None and tuple(forced.shape) != tuple(shape):
            raise ValueError(f"exit_steps must have the shape of input_ids {tuple(shape)}; got {tuple(forced.shape)}")
        self.rule, self.forced = rule, None if forced is None else forced.to(device)
        self.active = torch.ones(shape, dtype=torch.bool, device=device)
        self.steps = torch.zeros(shape, dtype=torch.long, device=device)
        self.last_k = self.last_v = None

    def start_step(self, s: int) -> None:
        if self.forced is not None:
            self.active = self.active & (self.forced > s)

    def all_stopped(self) -> bool:
        return not bool(self.active.any())

    def extend(self, slot, k: torch.Tensor, v: torch.Tensor):
        """Keys/values of this step for the new positions, the last computed ones where a position
        has stopped; appended to `slot` (a KVSlot) when decoding with a cache."""
        if self.last_k is not None:
            keep = self.active[:, None, :, None]
            k, v = torch.where(keep, k, self.last_k), torch.where(keep, v, self.last_v)
        self.last_k, self.last_v = k, v
        return slot.extend(k, v) if slot is not None else (k, v)

    def update(self, s: int, h_old: torch.Tensor, h_new: torch.Tensor, halter=None) -> torch.Tensor:
        """The states after step s: new where the position is active, frozen elsewhere; then decide
        who stops (`halter`: the model's trained Halter, for the "halter" rule)."""
        h = torch.where(self.active[..., None], h_new, h_old)
        self.steps += self.active.long()
        if self.rule is not None and s + 1 >= self.rule.min_steps:
            if self.rule.rule == "converged":
                stop = relative_change(h_new, h_old) < self.rule.threshold
            else:
                if halter is None:
                    raise ValueError("exit rule 'halter' needs a model with a trained halter (ouroboros train-halter)")
                stop = halter(h_new, h_old, s) > self.rule.threshold
            self.active = self.active & ~stop
        return h


class ExitKV:
    """The `kv` a decoder layer sees at one step under adaptive exit: substitutes stopped
    positions' keys/values, then extends the step's cache slot (if any)."""

    def __init__(self, exits: TokenExits, slot=None):
        self.exits, self.slot = exits, slot

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        return self.exits.extend(self.slot, k, v)
