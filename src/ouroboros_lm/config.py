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
INJECTIONS = ("none", "diagonal", "linear")
STATE_SCALES = ("free", "anchored")
LOOP_STARTS = ("gate", "stack", "rezero")
POOLINGS = ("prefix_mean", "token", "mean_and_token", "sequence_mean")
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MAX_LAYERS = 1024
MAX_DEPTH = 1024
MAX_WIDTH = 65536


def check_depth(depth, max_depth: int, name: str = "depth") -> int:
    """The one depth check: an integer in [1, max_depth] (ValueError naming `name` otherwise)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= max_depth:
        raise ValueError(f"{name} must be an integer in [1, max_depth={max_depth}]; got {depth!r}")
    return depth


@dataclass
class OuroborosConfig:
    """Configuration of an Ouroboros model (see `help` of each field, or `ouroboros convert --help`).

    pooling "sequence_mean" (the mean over the whole sequence, as the published code does)
    LEAKS FUTURE TOKENS into every position and is kept only to reproduce that code.
    """

    n_prelude: int = setting(8, "frozen layers kept before the recurrent block", low=0, high=MAX_LAYERS,
                             structural=True, sweep=False)
    recurrent_layer: int = setting(18, "index of the base layer applied N times", low=0, high=MAX_LAYERS,
                                   structural=True)
    block_layers: int = setting(1, "consecutive base layers, from recurrent_layer on, that form the recurrent block "
                                "and run in order at every step (Huginn and retrofitted recurrence loop 2-4); each "
                                "gets its own SVD bases, modulation and step norms", low=1, high=MAX_LAYERS,
                                structural=True)
    n_coda: int = setting(8, "frozen layers kept after the recurrent block", low=0, high=MAX_LAYERS,
                          structural=True, sweep=False)
    keep_layers: tuple[int, ...] | None = setting(
        None, "the base layers kept, in order (e.g. `ouroboros plan`'s choice; default: the first n_prelude, the "
        "block, the last n_coda): the prelude is the kept layers before the recurrent block, the coda those after it "
        "(n_prelude and n_coda become their counts); the block (recurrent_layer on, block_layers of them) must be "
        "kept. A heal model keeps exactly these layers (its recurrent_layer, if not kept, becomes the middle kept one)",
        low=0, high=MAX_LAYERS - 1, structural=True, metavar="I,J,...")
    rank: int = setting(32, "rank r of the SVD LoRA bases", low=1, high=4096, structural=True)
    alpha: float = setting(16.0, "LoRA scale alpha (delta = alpha/r * B diag(d) A x)", above=0, high=1e4,
                           structural=True)
    variant: str = setting("controller", "where the modulation comes from: the Controller (input-dependent), "
                           "static per-step vectors, or none", choices=VARIANTS, structural=True)
    gate: bool = setting(True, "gated recurrence h = g*h_new + (1-g)*h_old (--no-gate: h = h_new)", structural=True)
    gate_bias: float = setting(-2.0, "initial gate bias b_g (-2 keeps 88%% of the old state; "
                               "with loop_start stack, the bias of steps 2 on)", low=-30.0, high=30.0)
    loop_start: str = setting("gate", "where the loop starts: gate (every step behind the recurrence gate at "
                              "gate_bias: the paper's; at -2 a fresh loop keeps 88%% of the state at every step, step 1 "
                              "included, so depth 1 is not its layers run once); stack (step 1 is the block itself, "
                              "ungated: depth 1 equals the same kept layers run once, exactly, at init; each later step "
                              "updates the state behind the gate at gate_bias); rezero (step 1 as in stack; each later "
                              "step s adds a_s * (its block output - h), a_s a learned per-channel scale per step, zero "
                              "at init, so every depth starts at the stack; needs the gate off: --no-gate, --model.gate false)",
                              choices=LOOP_STARTS, structural=True)
    injection: str = setting("none", "input injection: every step's layer reads h + W_e e + b_e (linear, H^2 + H "
                             "weights) or h + a * e (diagonal, H), e the prelude's output, zero at init (none: h alone)",
                             choices=INJECTIONS, structural=True)
    state_scale: str = setting("free", "the recurrent state's scale: free (each step's residual output grows it), or "
                               "anchored (from step 2 on, every step's state is rescaled, per token, to the RMS of "
                               "step 1's output times a learned per-step factor, 1 at init; depth 1 is unchanged)",
                               choices=STATE_SCALES, structural=True)
    step_norm: bool = setting(True, "a separate pair of RMSNorm weights per recurrence step", structural=True)
    pooling: str = setting("prefix_mean", "what the Controller reads: the prefix mean, the token's own state, "
                           "both side by side (mean_and_token), or the whole-sequence mean (sequence_mean leaks "
                           "future tokens; reproduction only)", choices=POOLINGS, structural=True)
    style_dim: int = setting(128, "Controller style / step-embedding width", low=1, high=MAX_WIDTH, structural=True)
    controller_hidden: int = setting(256, "Controller hidden width", low=1, high=MAX_WIDTH, structural=True)
    lora_rank: int = setting(0, "rank of plain LoRA (PEFT) on the seven projections of every adapted layer: the "
                             "coda, the prelude's tail (prelude_lora_layers), the recurrent layer (recurrent_lora), "
                             "every kept layer of a heal model (0: none)", low=0, high=1024, structural=True)
    lora_alpha: float = setting(8.0, "scale alpha of that plain LoRA (delta = alpha/rank B A x)", above=0,
                                high=1e4, structural=True)
    prelude_lora_layers: int = setting(0, "how many of the last prelude layers (the prelude's tail) also get LoRA",
                                       low=0, high=MAX_LAYERS, structural=True)
    recurrent_lora: bool = setting(False, "plain LoRA (PEFT, rank lora_rank) on the recurrent layer's seven "
                                   "projections too, one set shared by every step (beside the step's modulation)",
                                   structural=True)
    recurrent_lora_steps: int = setting(1, "how many sets of the recurrent block's plain LoRA (recurrent_lora) "
                                        "there are: step s (past the trained depths, the last trained step) uses "
                                        "set min(s, n - 1), each zero at init; the training depth gives every step its "
                                        "own low-rank update of the shared frozen block (the relaxation of Relaxed "
                                        "Recursive Transformers); 1: one set shared by every step",
                                        low=1, high=MAX_DEPTH, structural=True)
    heal_layers: int = setting(0, "build the heal model instead of the recursion: the pruned stack run once, with "
                               "heal_layers distinct middle layers (1: the recurrent layer alone, the same weights as "
                               "the recursion; N: N base layers evenly spaced over the removed ones, the compute of "
                               "depth N) and plain LoRA of rank lora_rank on every kept layer (0: the recursion)",
                               low=0, high=MAX_LAYERS, structural=True)
    tune_layers: tuple[int, ...] | None = setting(
        None, "a heal model's kept layers (base indices, listed in keep_layers) trained in full instead of through "
        "LoRA: every weight of each, as W + a delta zero at init (the layers around each cut, the last layers, or a "
        "replacement layer kept for a removed span: LLM-Streamline); the other kept layers keep their LoRA",
        low=0, high=MAX_LAYERS - 1, structural=True, metavar="I,J,...")
    lora_ranks: tuple[int, ...] | None = setting(
        None, "a heal model's LoRA rank per kept layer, in keep_layers' order (default: lora_rank for every one): "
        "more where a cut hurts most at the same total; each layer's alpha keeps lora_alpha / lora_rank (a layer in "
        "tune_layers ignores its entry)", low=1, high=1024, structural=True, metavar="R,R,...")
    halter: bool = setting(False, "a trained per-token halter for adaptive depth (added by `ouroboros train-halter`)",
                           structural=True, cli=False, sweep=False)
    max_depth: int = setting(64, "largest recurrence depth the model can run", low=1, high=MAX_DEPTH, structural=True)
    init_seed: int = setting(0, "seed of the trainable parts' initialisation", low=0, high=2**63 - 1)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, num_layers: int | None = None) -> None:
        """Raise ValueError naming the field and its allowed range.

        Without `num_layers` only the checks that need no base model run; `from_base`
        calls it again with the base model's layer count before touching any weight.
        """
        validate_fields(self)
        if self.keep_layers is not None:
            self._follow_keep_layers()
        if self.prelude_lora_layers > self.n_prelude:
            raise ValueError(f"prelude_lora_layers must be in [0, n_prelude={self.n_prelude}]; got {self.prelude_lora_layers}")
        if self.prelude_lora_layers and not self.lora_rank:
            raise ValueError("prelude_lora_layers needs lora_rank > 0 (the LoRA rank of every adapted outer layer)")
        if self.heal_layers and self.block_layers > 1:
            raise ValueError("heal_layers builds the pruned stack without a recurrent block: block_layers must be 1")
        for name in ("recurrent_lora", "heal_layers"):
            if getattr(self, name) and not self.lora_rank:
                raise ValueError(f"{name} needs lora_rank > 0 (the rank of the plain LoRA it adds)")
        if self.recurrent_lora_steps > 1 and not (self.recurrent_lora and not self.heal_layers):
            raise ValueError("recurrent_lora_steps > 1 gives each recurrence step its own set of the recurrent block's "
                             "plain LoRA: it needs recurrent_lora (and a recursion, not heal_layers); got "
                             f"recurrent_lora={self.recurrent_lora}, heal_layers={self.heal_layers}")
        if not self.heal_layers and self.loop_start == "stack" and not self.gate:
            raise ValueError("loop_start stack puts every step after the first behind the recurrence gate: it needs "
                             "gate (or use loop_start rezero, whose later steps need no gate)")
        if not self.heal_layers and self.loop_start == "rezero" and self.gate:
            raise ValueError("loop_start rezero scales each later step's update itself (a_s, zero at init) in place "
                             "of the recurrence gate: it needs the gate off (gate false: --no-gate, --model.gate false)")
        self._check_heal_levers()
        if self.recurrent_lora_steps > self.max_depth:
            raise ValueError(f"recurrent_lora_steps must be in [1, max_depth={self.max_depth}] (one set per step at "
                             f"most); got {self.recurrent_lora_steps}")
        if num_layers is None:
            return
        L = num_layers
        if self.keep_layers is not None:
            if self.keep_layers[-1] >= L:
                raise ValueError(f"keep_layers must name layers of the base model, in [0, {L - 1}] ({L} layers); "
                                 f"got {self.keep_layers[-1]}")
            return  # the split is the kept layers themselves: the checks below hold by construction
        k = self.block_layers
        if self.n_prelude + self.n_coda + k > L:
            raise ValueError(
                f"n_prelude + n_coda + block_layers must be <= the base model's {L} layers; "
                f"got {self.n_prelude} + {self.n_coda} + {k} = {self.n_prelude + self.n_coda + k}"
            )
        if self.heal_layers > L - self.n_prelude - self.n_coda:
            raise ValueError(f"heal_layers must be in [0, {L - self.n_prelude - self.n_coda}] (the layers between the "
                             f"prelude and the coda of the base's {L}); got {self.heal_layers}")
        lo, hi = self.n_prelude, L - self.n_coda - k
        if not lo <= self.recurrent_layer <= hi:
            block = "" if k == 1 else f" (its block of {k} layers ending before the coda)"
            raise ValueError(
                f"recurrent_layer must lie between the prelude and the coda{block}, in [{lo}, {hi}] "
                f"(n_prelude={self.n_prelude}, n_coda={self.n_coda}, {L} layers); got {self.recurrent_layer}"
            )

    def _follow_keep_layers(self) -> None:
        """Check `keep_layers` (sorted, distinct; the block kept) and set the split's counts from it."""
        keep = self.keep_layers
        if any(b <= a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"keep_layers must be sorted and without duplicates; got {','.join(map(str, keep))}")
        if self.heal_layers > 1:
            raise ValueError("keep_layers names every kept layer: use heal_layers 1 with it (not "
                             f"{self.heal_layers}), and list the heal model's middle layers in keep_layers")
        if self.heal_layers and self.recurrent_layer not in keep:
            self.recurrent_layer = keep[len(keep) // 2]  # a heal model runs every kept layer once: any kept one serves
        block = list(range(self.recurrent_layer, self.recurrent_layer + self.block_layers))
        if not set(block) <= set(keep):
            what = f"the recurrent layer {block[0]}" if len(block) == 1 else f"the recurrent block {block[0]}-{block[-1]}"
            raise ValueError(f"keep_layers must keep {what} (consecutive base layers, recurrent_layer on, block_layers "
                             f"of them); got {','.join(map(str, keep))}")
        self.n_prelude = sum(i < block[0] for i in keep)
        self.n_coda = sum(i > block[-1] for i in keep)

    def _check_heal_levers(self) -> None:
        """tune_layers and lora_ranks: a heal model's kept layers, named or counted right."""
        if self.lora_ranks is not None and (not self.heal_layers or self.keep_layers is None
                                            or len(self.lora_ranks) != len(self.keep_layers)):
            raise ValueError("lora_ranks gives a heal model's kept layers one LoRA rank each: it needs heal_layers 1, "
                             f"keep_layers, and as many ranks as kept layers; got {len(self.lora_ranks)} rank(s) for "
                             f"{'no keep_layers' if self.keep_layers is None else len(self.keep_layers)}")
        tune = self.tune_layers
        if tune is None:
            return
        if not self.heal_layers or self.keep_layers is None:
            raise ValueError("tune_layers trains kept layers of a heal model in full: it needs heal_layers 1 and "
                             "keep_layers (the layers it names are base indices among the kept ones)")
        if any(b <= a for a, b in zip(tune, tune[1:])):
            raise ValueError(f"tune_layers must be sorted and without duplicates; got {','.join(map(str, tune))}")
        if missing := [i for i in tune if i not in self.keep_layers]:
            raise ValueError(f"tune_layers must name kept layers (keep_layers); {','.join(map(str, missing))} "
                             f"{'is' if len(missing) == 1 else 'are'} not kept")

    def tuned_positions(self) -> dict[str, list[int]]:
        """Where the tuned layers sit in a heal model: indices within the prelude and the coda, and
        "block" [0] when it is the recurrent (middle) layer."""
        out = {"prelude": [], "block": [], "coda": []}
        if not self.tune_layers:
            return out
        for i, k in enumerate(self.keep_layers):
            if k in self.tune_layers:
                part, j = (("prelude", i) if i < self.n_prelude else ("block", 0) if i == self.n_prelude
                           else ("coda", i - self.n_prelude - 1))
                out[part].append(j)
        return out

    def lora_rank_of(self, part: str, i: int = 0) -> int:
        """The LoRA rank of a heal model's prelude / coda layer i, or of its middle layer ("block")."""
        if self.lora_ranks is None:
            return self.lora_rank
        return self.lora_ranks[{"prelude": i, "block": self.n_prelude, "coda": self.n_prelude + 1 + i}[part]]

    def split_text(self) -> str:
        """The layer split in words, for messages: the counts, or the kept layers when they are listed."""
        if self.keep_layers is not None:
            return f"keep_layers={','.join(map(str, self.keep_layers))}, recurrent_layer={self.recurrent_layer}"
        return f"n_prelude={self.n_prelude}, recurrent_layer={self.recurrent_layer}, n_coda={self.n_coda}"

    def prelude_layers(self, num_layers: int) -> list[int]:
        """Base indices of the prelude's layers (a heal model's middle layers but the last come after them)."""
        return list(self.keep_layers[:self.n_prelude]) if self.keep_layers else list(range(self.n_prelude))

    def coda_layers(self, num_layers: int) -> list[int]:
        """Base indices of the coda's layers."""
        if self.keep_layers:
            return list(self.keep_layers[len(self.keep_layers) - self.n_coda:])
        return list(range(num_layers - self.n_coda, num_layers))

    def lora_layers(self) -> dict[str, list[int]]:
        """Indices (within the prelude and the coda) of the outer layers that get plain LoRA. A heal
        model adapts every kept layer (its middle layers but the last run as the prelude's tail)."""
        if not self.lora_rank:
            return {"prelude": [], "coda": []}
        if self.heal_layers:
            tuned = self.tuned_positions()
            return {"prelude": [i for i in range(self.n_prelude + self.heal_layers - 1) if i not in tuned["prelude"]],
                    "coda": [i for i in range(self.n_coda) if i not in tuned["coda"]]}
        return {"prelude": list(range(self.n_prelude - self.prelude_lora_layers, self.n_prelude)),
                "coda": list(range(self.n_coda))}

    @property
    def lora_on_recurrent_layer(self) -> bool:
        """Whether the recurrent layer (a heal model's last middle layer, unless tuned in full) carries plain LoRA."""
        return bool(self.lora_rank and (self.recurrent_lora or self.heal_layers) and not self.tuned_positions()["block"])

    @property
    def adapts_outer_layers(self) -> bool:
        """Whether anything outside the recurrent block trains (outer LoRA)."""
        return bool(self.lora_rank)

    def check_depth(self, depth, name: str = "depth") -> int:
        """`depth`, if the model can run it (an integer in [1, max_depth]); ValueError naming `name`."""
        return check_depth(depth, self.max_depth, name)

    def check_depth_flag(self, depth, name: str = "--depth") -> int:
        """`check_depth` of a depth the user asked for: a heal model (its kept layers run once, no recursion) has
        none to ask for, whatever its max_depth says."""
        if self.heal_layers:
            raise ValueError(f"{name} {depth}: a heal model runs its kept layers once and has no depth; leave "
                             f"{name} out")
        return self.check_depth(depth, name)

    # ------------------------------------------------------------------ layout
    def middle_layers(self, num_layers: int) -> list[int]:
        """The base layers between the prelude and the coda that are kept: the recurrent block's
        (`block_layers` from the recurrent layer on), or a heal model's `heal_layers` layers (N > 1:
        evenly spaced, the middle of each of N equal spans of the removed range)."""
        if self.heal_layers <= 1:
            return list(range(self.recurrent_layer, self.recurrent_layer + self.block_layers))
        span = num_layers - self.n_prelude - self.n_coda
        return [self.n_prelude + (2 * i + 1) * span // (2 * self.heal_layers) for i in range(self.heal_layers)]

    def removed_layers(self, num_layers: int) -> list[int]:
        """Indices of the base layers dropped by the surgery (their residuals feed the SVD)."""
        kept = set(self.kept_layers(num_layers))
        return [i for i in range(num_layers) if i not in kept]

    def kept_layers(self, num_layers: int) -> list[int]:
        return self.prelude_layers(num_layers) + self.middle_layers(num_layers) + self.coda_layers(num_layers)

    def pruned_stack(self) -> "OuroborosConfig":
        """The floor every gap is measured from: the same split with the recurrent layer once and nothing
        added (P + 1 + C layers, whatever block or heal model this config builds)."""
        keep = None
        if self.keep_layers is not None:
            keep = tuple(i for i in self.keep_layers if not self.recurrent_layer < i < self.recurrent_layer + self.block_layers)
        return OuroborosConfig(n_prelude=self.n_prelude, recurrent_layer=self.recurrent_layer, n_coda=self.n_coda,
                               keep_layers=keep, variant="none", gate=False, step_norm=False)

    def layer_passes(self, depth: int | None) -> int:
        """Decoder-layer applications per token: the pruned stack (depth None: the recurrent layer
        once, whatever the block), the recursion at `depth`, or a heal model's stack."""
        middle = self.heal_layers or (1 if depth is None else self.block_layers * depth)
        return self.n_prelude + middle + self.n_coda

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OuroborosConfig":
        return from_dict(cls, migrate(d), "OuroborosConfig")

    def replace(self, **changes) -> "OuroborosConfig":
        return dataclasses.replace(self, **changes)


RENAMED = {"max_steps": "max_depth", "coda_lora_rank": "lora_rank", "coda_lora_alpha": "lora_alpha"}  # old: new
LEGACY_POLICY = ("default_depth", "step_damping", "trained_depth")  # moved to `policy.RecursionPolicy`
RETIRED = {"coda_norms": False, "coda_lora_layers": 0, "step_dropout": None}  # removed: never measured to help


def migrate(d: dict) -> dict:
    """An architecture dict as this release writes it, from any earlier adapter's:
    format 1 (first releases) carried `depths`, `checkpoint_from_depth` and `seed` (the seed is
    `init_seed` now; the depths and checkpointing are training settings); `max_steps` is
    `max_depth` and `coda_lora_rank` / `coda_lora_alpha` are `lora_rank` / `lora_alpha` (they set
    every adapted layer's LoRA, not only the coda's); the inference knobs (`default_depth`, `step_damping`, `trained_depth`) moved to
    the adapter's `RecursionPolicy` (`policy.legacy_policy` reads them) and are dropped here;
    retired features are dropped when off and refused, with the reason, when an adapter used them."""
    if not isinstance(d, dict):
        return d
    d = dict(d)
    d.pop("depths", None)
    d.pop("checkpoint_from_depth", None)
    if "seed" in d and "init_seed" not in d:
        d["init_seed"] = d.pop("seed")
    for old, new in RENAMED.items():
        if old in d and new not in d:
            d[new] = d.pop(old)
    for name in LEGACY_POLICY:
        d.pop(name, None)
    for name, off in RETIRED.items():
        value = d.pop(name, off)
        if name == "coda_lora_layers" and value == d.get("n_coda"):
            value = 0  # LoRA on every coda layer: what 0 meant, and what this release does
        if off is not None and value != off:
            raise ValueError(f"{name}={value!r}: this adapter uses a feature retired after ouroboros-lm 0.1.0 "
                             "(never measured to help); load it with that release")
    return d
