"""`OuroborosConfig`: the architecture of a recursive model, what an adapter records.

Defaults reproduce the paper's Qwen2.5-3B run: 8 prelude layers, layer 18 recurrent,
8 coda layers (17 of 36 kept), rank-32 SVD LoRA bases, alpha 16, gated recurrence.
How the model is trained (depths, checkpointing, learning rate...) lives in `TrainConfig`.
Every field is declared once with its help, range and whether it is structural (`settings`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .settings import from_dict, setting, to_dict, validate_fields

VARIANTS = ("controller", "static", "none")
POOLINGS = ("prefix_mean", "token", "mean_and_token", "sequence_mean")
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MAX_LAYERS = 1024
MAX_STEPS = 1024
MAX_WIDTH = 65536


@dataclass
class OuroborosConfig:
    """Configuration of an Ouroboros model (see `help` of each field, or `ouroboros convert --help`).

    pooling "sequence_mean" (the mean over the whole sequence, as the published code does)
    LEAKS FUTURE TOKENS into every position and is kept only to reproduce that code.
    """

    n_prelude: int = setting(8, "frozen layers kept before the recurrent block", low=0, high=MAX_LAYERS,
                             structural=True, sweep=False)
    recurrent_layer: int = setting(18, "index of the base layer applied N times", low=0, high=MAX_LAYERS,
                                   structural=True, sweep=False)
    n_coda: int = setting(8, "frozen layers kept after the recurrent block", low=0, high=MAX_LAYERS,
                          structural=True, sweep=False)
    rank: int = setting(32, "rank r of the SVD LoRA bases", low=1, high=4096, structural=True)
    alpha: float = setting(16.0, "LoRA scale alpha (delta = alpha/r * B diag(d) A x)", above=0, high=1e4,
                           structural=True)
    variant: str = setting("controller", "where the modulation comes from: the Controller (input-dependent), "
                           "static per-step vectors, or none", choices=VARIANTS, structural=True)
    gate: bool = setting(True, "gated recurrence h = g*h_new + (1-g)*h_old (--no-gate: h = h_new)", structural=True)
    gate_bias: float = setting(-2.0, "initial gate bias b_g (-2 keeps 88%% of the old state)", low=-30.0, high=30.0)
    step_norm: bool = setting(True, "a separate pair of RMSNorm weights per recurrence step", structural=True)
    pooling: str = setting("prefix_mean", "what the Controller reads: the prefix mean, the token's own state, "
                           "both side by side (mean_and_token), or the whole-sequence mean (sequence_mean leaks "
                           "future tokens; reproduction only)", choices=POOLINGS, structural=True)
    step_dropout: float = setting(0.0, "while training, the probability that a sequence's Controller gets no step "
                                  "embedding at a step (so the step index cannot carry all of the modulation)",
                                  low=0.0, high=1.0)
    style_dim: int = setting(128, "Controller style / step-embedding width", low=1, high=MAX_WIDTH, structural=True)
    controller_hidden: int = setting(256, "Controller hidden width", low=1, high=MAX_WIDTH, structural=True)
    coda_lora_rank: int = setting(0, "rank of plain LoRA (PEFT) on the adapted outer layers' seven projections "
                                  "(0: none)", low=0, high=1024, structural=True)
    coda_lora_alpha: float = setting(8.0, "LoRA scale alpha of the outer layers (delta = alpha/rank B A x)", above=0,
                                     high=1e4, structural=True)
    coda_lora_layers: int = setting(0, "how many of the last coda layers get LoRA (0: all n_coda)", low=0,
                                    high=MAX_LAYERS, structural=True)
    prelude_lora_layers: int = setting(0, "how many of the last prelude layers (the prelude's tail) also get LoRA",
                                       low=0, high=MAX_LAYERS, structural=True)
    recurrent_lora: bool = setting(False, "plain LoRA (PEFT, rank coda_lora_rank) on the recurrent layer's seven "
                                   "projections too, one set shared by every step (beside the step's modulation)",
                                   structural=True)
    heal_layers: int = setting(0, "build the heal model instead of the recursion: the pruned stack run once, with "
                               "heal_layers distinct middle layers (1: the recurrent layer alone, the same weights as "
                               "the recursion; N: N base layers evenly spaced over the removed ones, the compute of "
                               "depth N) and plain LoRA of rank coda_lora_rank on every kept layer (0: the recursion)",
                               low=0, high=MAX_LAYERS, structural=True)
    coda_norms: bool = setting(False, "train the coda layers' RMSNorm weights and the final norm (--coda-norms)",
                               structural=True)
    halter: bool = setting(False, "a trained per-token halter for adaptive depth (added by `ouroboros train-halter`)",
                           structural=True, cli=False, sweep=False)
    max_steps: int = setting(64, "largest recurrence depth the model can run", low=1, high=MAX_STEPS, structural=True)
    default_depth: int = setting(8, "recurrence depth used when none is given (evaluation, generation)",
                                 low=1, high=MAX_STEPS)
    step_damping: float = setting(1.0, "past trained_depth, step s's update is scaled by step_damping^(s - "
                                  "trained_depth + 1), so deeper recursion settles (1: off; 0.5: the steps past it "
                                  "add at most one step's update in all)", low=0.0, high=1.0)
    init_seed: int = setting(0, "seed of the trainable parts' initialisation", low=0, high=2**63 - 1)
    trained_depth: int = setting(0, "steps at or past this depth reuse the last trained step's per-step parameters "
                                 "(0: every step its own; training sets it to its largest depth)", low=0,
                                 high=MAX_STEPS)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, num_layers: int | None = None) -> None:
        """Raise ValueError naming the field and its allowed range.

        Without `num_layers` only the checks that need no base model run; `from_base`
        calls it again with the base model's layer count before touching any weight.
        """
        validate_fields(self)
        self.check_depth(self.default_depth, "default_depth")
        if self.trained_depth > self.max_steps:
            raise ValueError(f"trained_depth must be in [0, max_steps={self.max_steps}]; got {self.trained_depth}")
        if self.coda_lora_layers > self.n_coda:
            raise ValueError(f"coda_lora_layers must be in [0, n_coda={self.n_coda}]; got {self.coda_lora_layers}")
        if self.prelude_lora_layers > self.n_prelude:
            raise ValueError(f"prelude_lora_layers must be in [0, n_prelude={self.n_prelude}]; got {self.prelude_lora_layers}")
        if self.prelude_lora_layers and not self.coda_lora_rank:
            raise ValueError("prelude_lora_layers needs coda_lora_rank > 0 (the LoRA rank of every adapted outer layer)")
        for name in ("recurrent_lora", "heal_layers"):
            if getattr(self, name) and not self.coda_lora_rank:
                raise ValueError(f"{name} needs coda_lora_rank > 0 (the rank of the plain LoRA it adds)")
        if num_layers is None:
            return
        L = num_layers
        if self.heal_layers > L - self.n_prelude - self.n_coda:
            raise ValueError(f"heal_layers must be in [0, {L - self.n_prelude - self.n_coda}] (the layers between the "
                             f"prelude and the coda of the base's {L}); got {self.heal_layers}")
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

    def lora_layers(self) -> dict[str, list[int]]:
        """Indices (within the prelude and the coda) of the outer layers that get plain LoRA. A heal
        model adapts every kept layer (its middle layers but the last run as the prelude's tail)."""
        if not self.coda_lora_rank:
            return {"prelude": [], "coda": []}
        if self.heal_layers:
            return {"prelude": list(range(self.n_prelude + self.heal_layers - 1)), "coda": list(range(self.n_coda))}
        n_coda = self.coda_lora_layers or self.n_coda
        return {"prelude": list(range(self.n_prelude - self.prelude_lora_layers, self.n_prelude)),
                "coda": list(range(self.n_coda - n_coda, self.n_coda))}

    @property
    def lora_on_recurrent_layer(self) -> bool:
        """Whether the recurrent layer (a heal model's last middle layer) carries plain LoRA."""
        return bool(self.coda_lora_rank and (self.recurrent_lora or self.heal_layers))

    @property
    def adapts_outer_layers(self) -> bool:
        """Whether anything outside the recurrent block trains (outer LoRA or coda norms)."""
        return bool(self.coda_lora_rank or self.coda_norms)

    def check_depth(self, depth: int, name: str = "depth") -> int:
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= self.max_steps:
            raise ValueError(f"{name} must be an integer in [1, max_steps={self.max_steps}]; got {depth!r}")
        return depth

    # ------------------------------------------------------------------ layout
    def middle_layers(self, num_layers: int) -> list[int]:
        """The base layers between the prelude and the coda that are kept: the recurrent layer, or a
        heal model's `heal_layers` layers (N > 1: evenly spaced, the middle of each of N equal spans
        of the removed range)."""
        if self.heal_layers <= 1:
            return [self.recurrent_layer]
        span = num_layers - self.n_prelude - self.n_coda
        return [self.n_prelude + (2 * i + 1) * span // (2 * self.heal_layers) for i in range(self.heal_layers)]

    def removed_layers(self, num_layers: int) -> list[int]:
        """Indices of the base layers dropped by the surgery (their residuals feed the SVD)."""
        kept = set(self.middle_layers(num_layers))
        return [i for i in range(self.n_prelude, num_layers - self.n_coda) if i not in kept]

    def kept_layers(self, num_layers: int) -> list[int]:
        return list(range(self.n_prelude)) + self.middle_layers(num_layers) + list(range(num_layers - self.n_coda, num_layers))

    def layer_passes(self, depth: int | None) -> int:
        """Decoder-layer applications per token: the pruned stack (depth None), the recursion at
        `depth`, or a heal model's stack."""
        middle = self.heal_layers or (1 if depth is None else depth)
        return self.n_prelude + middle + self.n_coda

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OuroborosConfig":
        return from_dict(cls, migrate(d), "OuroborosConfig")

    def replace(self, **changes) -> "OuroborosConfig":
        return dataclasses.replace(self, **changes)


def migrate(d: dict) -> dict:
    """Adapters written before training settings left the architecture (format 1, first
    releases) carry `depths`, `checkpoint_from_depth` and `seed`: the largest training depth
    becomes `default_depth`, the seed `init_seed`, and checkpointing is a training setting now."""
    if not isinstance(d, dict):
        return d
    d = dict(d)
    depths = d.pop("depths", None)
    if depths and "default_depth" not in d:
        d["default_depth"] = max(depths) if isinstance(depths, (list, tuple)) else depths
    d.pop("checkpoint_from_depth", None)
    if "seed" in d and "init_seed" not in d:
        d["init_seed"] = d.pop("seed")
    return d
