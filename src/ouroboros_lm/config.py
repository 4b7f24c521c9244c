"""`OuroborosConfig`: every knob of the recursive model, validated on construction.

Defaults reproduce the paper's Qwen2.5-3B run: 8 prelude layers, layer 18 recurrent,
8 coda layers (17 of 36 kept), rank-32 SVD LoRA bases, alpha 16, gated recurrence.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

VARIANTS = ("controller", "static", "none")
POOLINGS = ("prefix_mean", "token", "sequence_mean")
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class OuroborosConfig:
    """Configuration of an Ouroboros model.

    variant: "controller" (input-dependent modulation from the Controller hypernetwork),
        "static" (a learned r-vector per step and projection, no Controller: the paper's
        ablation) or "none" (no low-rank paths at all: only gate and step norms train).
    gate: gated recurrence h = g*h_new + (1-g)*h_old; False gives plain replacement h = h_new.
    pooling: what the Controller reads. "prefix_mean" (default, causal): position t sees the
        mean of the hidden states at positions <= t. "token": the position's own state.
        "sequence_mean": the mean over the whole sequence, as the published code does. It
        LEAKS FUTURE TOKENS into every position and is kept only to reproduce that code.
    depths: recurrence depths sampled (uniformly) per training step; eval uses the largest.
    checkpoint_from_depth: activation checkpointing per recurrence step while training at
        this depth or deeper (0 disables it).
    """

    n_prelude: int = 8
    recurrent_layer: int = 18
    n_coda: int = 8
    rank: int = 32
    alpha: float = 16.0
    variant: str = "controller"
    gate: bool = True
    gate_bias: float = -2.0
    step_norm: bool = True
    pooling: str = "prefix_mean"
    style_dim: int = 128
    controller_hidden: int = 256
    max_steps: int = 64
    depths: tuple[int, ...] = (4, 8, 16)
    checkpoint_from_depth: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.depths, int):
            self.depths = (self.depths,)
        self.depths = tuple(self.depths)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, num_layers: int | None = None) -> None:
        """Raise ValueError naming the field and its allowed range.

        Without `num_layers` only the checks that need no base model run; `from_base`
        calls it again with the base model's layer count before touching any weight.
        """
        _int_at_least("n_prelude", self.n_prelude, 0)
        _int_at_least("n_coda", self.n_coda, 0)
        _int_at_least("recurrent_layer", self.recurrent_layer, 0)
        _int_at_least("rank", self.rank, 1)
        _int_at_least("style_dim", self.style_dim, 1)
        _int_at_least("controller_hidden", self.controller_hidden, 1)
        _int_at_least("max_steps", self.max_steps, 1)
        _int_at_least("checkpoint_from_depth", self.checkpoint_from_depth, 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not _is_number(self.alpha) or self.alpha <= 0 or self.alpha != self.alpha:
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not _is_number(self.gate_bias) or abs(self.gate_bias) == float("inf") or self.gate_bias != self.gate_bias:
            raise ValueError(f"gate_bias must be a finite number, got {self.gate_bias!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}")
        for name in ("gate", "step_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not self.depths:
            raise ValueError("depths must list at least one depth in [1, max_steps]")
        for d in self.depths:
            if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= self.max_steps:
                raise ValueError(
                    f"depths: every depth must be an integer in [1, max_steps={self.max_steps}]; got {d!r}"
                )
        if num_layers is None:
            return
        L = num_layers
        if self.n_prelude + self.n_coda + 1 > L:
            raise ValueError(
                f"n_prelude + n_coda + 1 must be <= the base model's {L} layers; "
                f"got {self.n_prelude} + {self.n_coda} + 1 = {self.n_prelude + self.n_coda + 1}"
            )
        lo, hi = self.n_prelude, L - self.n_coda - 1
        if not lo <= self.recurrent_layer <= hi:
            raise ValueError(
                f"recurrent_layer must lie between the prelude and the coda, in [{lo}, {hi}] "
                f"(n_prelude={self.n_prelude}, n_coda={self.n_coda}, {L} layers); got {self.recurrent_layer}"
            )

    def check_depth(self, depth: int) -> int:
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= self.max_steps:
            raise ValueError(f"depth must be an integer in [1, max_steps={self.max_steps}]; got {depth!r}")
        return depth

    # ------------------------------------------------------------------ layout
    def removed_layers(self, num_layers: int) -> list[int]:
        """Indices of the base layers dropped by the surgery (their residuals feed the SVD)."""
        return [i for i in range(self.n_prelude, num_layers - self.n_coda) if i != self.recurrent_layer]

    def kept_layers(self, num_layers: int) -> list[int]:
        return list(range(self.n_prelude)) + [self.recurrent_layer] + list(range(num_layers - self.n_coda, num_layers))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["depths"] = list(self.depths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OuroborosConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OuroborosConfig field(s): {', '.join(unknown)}")
        d = dict(d)
        if "depths" in d:
            d["depths"] = tuple(d["depths"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes) -> "OuroborosConfig":
        return dataclasses.replace(self, **changes)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int_at_least(name: str, value, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}")
