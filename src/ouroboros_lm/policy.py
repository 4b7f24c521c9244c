"""`RecursionPolicy`: how a trained recursion runs when the caller does not say, recorded beside
the architecture in every adapter and exported model.

The architecture (`OuroborosConfig`) fixes what the weights are; the policy says how they are
used at inference: the depth when none is given, how far past the trained depths the per-step
parameters reach and how much each step past them may still change the state. Training writes
`trained_depth` on purpose (`Trainer.setup`, from its depth schedule); a user may override the
rest on load (`load_adapter(..., step_damping=0.5)`) without touching the architecture.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import MAX_DEPTH, check_depth
from .settings import from_dict, setting, to_dict, validate_fields


@dataclass
class RecursionPolicy:
    """The inference side of a recursive model (see `help` of each field)."""

    default_depth: int = setting(8, "recurrence depth used when none is given (evaluation, generation, export)",
                                 low=1, high=MAX_DEPTH)
    step_damping: float = setting(1.0, "past trained_depth, step s's update is scaled by step_damping^(s - "
                                  "trained_depth + 1), so deeper recursion settles (1: off; 0.5: the steps past it "
                                  "add at most one step's update in all)", low=0.0, high=1.0)
    trained_depth: int = setting(0, "steps at or past this depth reuse the last trained step's per-step parameters "
                                 "(0: every step its own; training sets it to its largest depth)", low=0,
                                 high=MAX_DEPTH, cli=False)

    def __post_init__(self) -> None:
        validate_fields(self)

    def check(self, max_depth: int) -> "RecursionPolicy":
        """Raise ValueError unless the policy fits a model that can run `max_depth` steps."""
        check_depth(self.default_depth, max_depth, "default_depth")
        if self.trained_depth > max_depth:
            raise ValueError(f"trained_depth must be in [0, max_depth={max_depth}]; got {self.trained_depth}")
        return self

    def parameter_step(self, s: int) -> int:
        """Whose per-step parameters step s (0-based) uses: its own, or, past the trained depths, the
        last trained step's, so that running deeper never reaches parameters that never saw a gradient."""
        return min(s, self.trained_depth - 1) if self.trained_depth else s

    def update_scale(self, s: int) -> float:
        """How much of step s's update is kept: 1 up to `trained_depth`, then `step_damping` ** (steps
        past it), so the recursion settles past the trained depths."""
        trained, damping = self.trained_depth, self.step_damping
        return 1.0 if not trained or s < trained or damping == 1.0 else damping ** (s - trained + 1)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RecursionPolicy":
        return from_dict(cls, d, "RecursionPolicy")

    def replace(self, **changes) -> "RecursionPolicy":
        return dataclasses.replace(self, **changes)


POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(RecursionPolicy))


def legacy_policy(config: dict) -> RecursionPolicy:
    """The policy an adapter written before the policy had its own block recorded inside its
    architecture dict (`default_depth`, `step_damping`, `trained_depth`; format 1 releases: the
    largest of `depths` as the default depth)."""
    d = {k: config[k] for k in POLICY_FIELDS if k in config}
    depths = config.get("depths")
    if depths and "default_depth" not in d:
        d["default_depth"] = max(depths) if isinstance(depths, (list, tuple)) else depths
    return RecursionPolicy.from_dict(d)
