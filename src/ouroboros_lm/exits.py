"""Per-token adaptive depth: each position stops recurring once its exit rule says so, and keeps
its last state from then on.

Every rule scores each position after each step and stops it once the score falls below the
threshold (so threshold 0 never stops anyone: the fixed depth; a larger one stops earlier):

    converged     ||h_s - h_(s-1)|| / ||h_(s-1)||, the relative change of the state
    acceleration  max(a_s, a_(s-1)), a_s = ||D_s - D_(s-1)|| / ||h_(s-1)||, D_s = h_s - h_(s-1): the
                  second-order difference of the state (arXiv 2509.23314's exit, relative to the
                  state's size, with its two-hit check: two consecutive small changes of the update);
                  it can stop from step 3
    kl            KL(p_s || p_(s-1)) of the next-token distributions read out after steps s and s-1
                  (Huginn's exit; its code measures KL(p_(s-1) || p_s), the same to first order); from step 2
    entropy       |H(p_s) - H(p_(s-1))|, the change of the prediction's entropy (Huginn's other one); from step 2
    halter        1 - CDF_s = prod_(j<=s) (1 - lambda_j), the probability under the trained halter's
                  exit distribution that the token is still running after step s (Ouro's inference
                  rule: stop once CDF_s >= 1 - threshold)

kl and entropy read a prediction at every step (coda + head on the step's state: `predict`, given by
the model). A position that has stopped still takes part in later steps' attention, in the
recurrent layer and in those readouts' coda layers: its keys and values there are those of the last
step it computed (as in Huginn's adaptive exit), and the Controller's causal pooled view sees its
frozen state. Every decision is causal (it depends only on the position's own states and
predictions, which see only earlier positions), so cached decoding makes the same decisions as a
full forward (for kl / entropy, with the per-step coda caches of `new_cache(..., readout=True)`),
and a token that stopped early really skips the remaining steps there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import MAX_DEPTH
from .settings import setting, validate_fields

RULES = ("converged", "acceleration", "kl", "entropy", "halter")
PREDICTING = ("kl", "entropy")  # the rules that read a prediction (coda + head) at every step
# Where each rule's threshold usually lies (a sweep's default grid, `exit_eval`).
THRESHOLD_RANGES = {"converged": (0.005, 0.5), "acceleration": (0.005, 0.5), "kl": (1e-5, 1.0),
                    "entropy": (1e-4, 1.0), "halter": (0.02, 0.98)}


@dataclass
class ExitRule:
    """When a position stops recurring (up to the forward's depth, which acts as the maximum)."""

    rule: str = setting("converged", "converged: relative state change; acceleration: second-order change "
                        "(two-hit); kl: KL between successive steps' next-token distributions; entropy: change "
                        "of their entropy; halter: the trained halter's probability of still running. A token "
                        "stops once the rule's score falls below the threshold", choices=RULES, flag="--exit-rule")
    threshold: float = setting(0.05, "the rule's threshold (0: never stop early)", low=0, high=1e6,
                               flag="--exit-threshold")
    min_steps: int = setting(1, "steps every position takes before it may stop", low=1, high=MAX_DEPTH,
                             flag="--exit-min-steps")

    def __post_init__(self) -> None:
        validate_fields(self)

    @property
    def reads_predictions(self) -> bool:
        """Whether the rule reads each step's next-token distribution (a coda pass per step)."""
        return self.rule in PREDICTING


def relative_change(h_new: torch.Tensor, h_old: torch.Tensor) -> torch.Tensor:
    """||h_new - h_old|| / ||h_old|| per position, in float32."""
    diff = (h_new.float() - h_old.float()).norm(dim=-1)
    return diff / h_old.float().norm(dim=-1).clamp(min=1e-6)


class RuleState:
    """What a rule carries from step to step, per position, and its score after each step."""

    def __init__(self, rule: ExitRule, predict: Callable | None = None):
        if rule.reads_predictions and predict is None:
            raise ValueError(f"exit rule {rule.rule!r} needs the model's per-step predictions")
        self.rule, self.predict = rule.rule, predict
        self.prev = self.prev_accel = None
        self.remaining = 1.0

    def score(self, s: int, h_old, h_new, h, active, halter=None) -> torch.Tensor | None:
        """[B, T] after step s (0-based; what an inactive position gets does not matter), or None
        when the rule cannot decide yet."""
        if self.rule == "converged":
            return relative_change(h_new, h_old)
        if self.rule == "acceleration":
            return self.acceleration(h_old, h_new)
        if self.rule == "halter":
            if halter is None:
                raise ValueError("exit rule 'halter' needs a model with a trained halter (ouroboros train-halter)")
            self.remaining = self.remaining * (1 - halter(h_new, h_old, s))
            return self.remaining
        return self.prediction_change(s, h, active)

    def acceleration(self, h_old, h_new) -> torch.Tensor | None:
        delta = h_new.float() - h_old.float()
        accel = None
        if self.prev is not None:
            accel = (delta - self.prev).norm(dim=-1) / h_old.float().norm(dim=-1).clamp(min=1e-6)
        score = torch.maximum(accel, self.prev_accel) if accel is not None and self.prev_accel is not None else None
        self.prev, self.prev_accel = delta, accel
        return score

    def prediction_change(self, s: int, h, active) -> torch.Tensor | None:
        """KL(p_s || p_(s-1)) or |H(p_s) - H(p_(s-1))| at the active positions (+inf elsewhere)."""
        logp = self.predict(s, h, active)  # [n_active, V] float32 log-probabilities
        p = logp.exp()
        now = torch.special.entr(p).sum(-1) if self.rule == "entropy" else logp
        if self.prev is None:
            self.prev = now.new_zeros(tuple(active.shape) + tuple(now.shape[1:]))
            score = None
        else:
            before = self.prev[active]
            kl = lambda: torch.where(p > 0, p * (logp - before), 0.0).sum(-1).clamp(min=0)  # noqa: E731
            change = (now - before).abs() if self.rule == "entropy" else kl()
            score = torch.full(active.shape, float("inf"), device=h.device)
            score[active] = change
        self.prev[active] = now
        return score


class TokenExits:
    """The exit state of one forward over positions [B, T].

    rule: an ExitRule deciding from the states (`predict(s, h, active)`: the active positions'
    next-token log-probabilities after step s, for the rules that read them); or `forced` [B, T]:
    the number of steps each position takes (to replay recorded decisions). `steps` counts the
    steps each position ran."""

    def __init__(self, shape, device, rule: ExitRule | None = None, forced: torch.Tensor | None = None,
                 predict: Callable | None = None):
        if (rule is None) == (forced is None):
            raise ValueError("give exactly one of an exit rule or forced exit steps")
        if forced is not None and tuple(forced.shape) != tuple(shape):
            raise ValueError(f"exit_steps must have the shape of input_ids {tuple(shape)}; got {tuple(forced.shape)}")
        self.rule, self.forced = rule, None if forced is None else forced.to(device)
        self.state = RuleState(rule, predict) if rule is not None else None
        self.active = torch.ones(shape, dtype=torch.bool, device=device)
        self.steps = torch.zeros(shape, dtype=torch.long, device=device)
        self.last: dict = {}  # layer key -> the keys and values each position last computed there

    def start_step(self, s: int) -> None:
        if self.forced is not None:
            self.active = self.active & (self.forced > s)

    def all_stopped(self) -> bool:
        return not bool(self.active.any())

    def extend(self, key, slot, k: torch.Tensor, v: torch.Tensor):
        """Keys/values of this step at layer `key` for the new positions, the last computed ones where
        a position has stopped; appended to `slot` (a KVSlot) when decoding with a cache."""
        if key in self.last:
            keep = self.active[:, None, :, None]
            last_k, last_v = self.last[key]
            k, v = torch.where(keep, k, last_k), torch.where(keep, v, last_v)
        self.last[key] = (k, v)
        return slot.extend(k, v) if slot is not None else (k, v)

    def skip(self, step_cache) -> None:
        """A step every position skips: its cache slots (the recurrent layer's and, when kept, its
        readout's coda layers') receive the positions' last keys and values."""
        slots = [(block_key(j), slot) for j, slot in enumerate(step_cache.kv)] + \
            [(("coda", i), slot) for i, slot in enumerate(step_cache.readout or [])]
        for key, slot in slots:
            slot.extend(*self.last[key])

    def update(self, s: int, h_old: torch.Tensor, h_new: torch.Tensor, halter=None) -> torch.Tensor:
        """The states after step s: new where the position is active, frozen elsewhere; then decide
        who stops (`halter`: the model's trained Halter, for the "halter" rule)."""
        h = torch.where(self.active[..., None], h_new, h_old)
        self.steps += self.active.long()
        if self.rule is not None:
            score = self.state.score(s, h_old, h_new, h, self.active, halter)  # every step: rules carry state
            if score is not None and s + 1 >= self.rule.min_steps:
                self.active = self.active & ~(score < self.rule.threshold)
        return h


def block_key(j: int):
    """The key of the recurrent block's layer j in `TokenExits.last`."""
    return "recurrent" if j == 0 else ("recurrent", j)


class ExitKV:
    """The `kv` a decoder layer (`key`: the recurrent layer, or ("coda", i) in a step's readout) sees
    at one step under adaptive exit: substitutes stopped positions' keys/values, then extends the
    step's cache slot (if any)."""

    def __init__(self, exits: TokenExits, slot=None, key="recurrent"):
        self.exits, self.slot, self.key = exits, slot, key

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        return self.exits.extend(self.key, self.slot, k, v)
