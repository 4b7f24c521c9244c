"""The recurrent block: one frozen decoder layer (or `block_layers` consecutive ones) applied N times,
made step-aware.

Each step s:
    d      = Controller(pool(h), s)   |  static vectors[s]  |  nothing
    x      = h + W_e e + b_e          (input injection of the prelude's output e; or x = h)
    h_new  = layer(x; norms = step_norms[s], projections + (alpha/r) B diag(d) A)
             (a block of k layers: each in turn, with its own norms, bases and slice of d;
              with recurrent_lora, plus the plain LoRA set of step s: one shared, or one per step)
    h      = g * h_new + (1 - g) * h,   g = sigmoid(W_g [h_new; h] + b_g)   (or h = h_new)
             (loop_start "stack": step 1 ungated, h = h_new, the gate from step 2 on;
              loop_start "rezero": step 1 ungated, then h = h + a_s * (h_new - h), a_s = 0 at init)
    h      = h * exp(a_s) * rms(h_1) / rms(h)   (state_scale "anchored", steps s >= 2; h_1: step 1's output)

How the steps run at inference (their per-step parameters past the trained depths, damping) is the
model's `RecursionPolicy`; how they are differentiated while training (checkpointing, truncated
backprop) is a `StepTraining` the trainer passes to `forward`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import TARGETS, OuroborosConfig
from .controller import Controller, PoolState, StaticModulation, pool
from .exits import ExitKV, TokenExits, block_key
from .families import step_norm_names
from .halter import Halter
from .layers import AttentionContext, KVSlot, attention_kind, decoder_layer
from .svd_bases import SVDBases
from .memory import activations_fit, step_activation_bytes
from .ops import gate_mix
from .peft_lora import step_adapter, step_adapter_projection
from .policy import RecursionPolicy


class RecurrenceGate(nn.Module):
    """g = sigmoid(W_g [h_new; h_old] + b_g); W_g = 0 and b_g = gate_bias at init, so a fresh
    gate keeps sigmoid(-gate_bias) of the old state (0.88 for the default -2).

    W_g (H x 2H) is held as its two halves, W_g = [weight_new | weight_old], so that
    W_g [h_new; h_old] = weight_new h_new + weight_old h_old is two matmuls with no
    concatenated copy of the states, and the backward pass writes each half's gradient
    directly (slices of one parameter would each need a zero-filled full-size gradient).
    Adapter files store W_g whole, as `proj.weight` (see `joined` / `load_joined`).
    """

    def __init__(self, hidden_size: int, bias: float):
        super().__init__()
        self.weight_new = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.weight_old = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.full((hidden_size,), float(bias)))

    def forward(self, h_new: torch.Tensor, h_old: torch.Tensor) -> torch.Tensor:
        dt = self.bias.dtype  # the gate computes in its own (float32) precision
        a, b = h_new, h_old
        if not (torch.amp.is_autocast_available(a.device.type) and torch.is_autocast_enabled(a.device.type)):
            a, b = a.to(dt), b.to(dt)  # (under autocast the matmuls cast, and these copies would be saved)
        # F.linear on the leaf parameters, so autocast casts each weight once per forward, not once per step
        z = F.linear(a, self.weight_new, self.bias) + F.linear(b, self.weight_old)
        return gate_mix(z, h_new, h_old, dt)  # saving z and the states as they are (`ops.gate_mix`)

    def joined(self) -> dict[str, torch.Tensor]:
        """{"proj.weight": W_g (H x 2H), "proj.bias": b_g}: the gate as the spec (and files) write it."""
        return {"proj.weight": torch.cat([self.weight_new.detach(), self.weight_old.detach()], dim=1),
                "proj.bias": self.bias.detach()}

    def load_joined(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        H = self.bias.shape[0]
        with torch.no_grad():
            self.weight_new.copy_(weight[:, :H])
            self.weight_old.copy_(weight[:, H:])
            self.bias.copy_(bias)


class StepNorms(nn.Module):
    """A separate pair of RMSNorm weights (pre-attention, pre-MLP) for every step and every layer of
    the block, each initialised from its layer's own, so a fresh model normalises as the base does.
    weight: [max_depth, 2 k, H] (layer j's pair at rows 2j, 2j + 1)."""

    def __init__(self, norms: list[torch.Tensor], max_depth: int):
        super().__init__()
        w = torch.stack([n.detach().float() for n in norms])  # [2 k, H]
        self.weight = nn.Parameter(w.unsqueeze(0).repeat(max_depth, 1, 1))

    def forward(self, step: int, dtype, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight[step, 2 * layer : 2 * layer + 2].to(dtype)
        return w[0], w[1]


class InputInjection(nn.Module):
    """Recall of the prelude's output e at every step: the layer reads x = h + W_e e + b_e (linear) or
    x = h + a * e (diagonal), so the recursion's fixed points can depend on the input (Huginn and
    retrofitted recurrence feed [state; e] through an adapter). Zero at init: a converted model
    starts exactly where it does without it."""

    def __init__(self, hidden_size: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.proj = nn.Linear(hidden_size, hidden_size)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.scale = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return h + self.proj(e.to(self.proj.weight.dtype)).to(h.dtype)
        return h + (self.scale * e.float()).to(h.dtype)


class ReZeroScale(nn.Module):
    """ReZero for the loop's later steps (loop_start "rezero"): step s >= 2 moves the state by a_s * (h_new - h),
    a_s a per-channel scale of its own, zero at init, so a fresh loop at any depth is its block run once (the same
    kept layers as the stack), and each extra step is a learned, initially vanishing change; the gradient reaches
    a_s at init (dL/da_s = (h_new - h) * dL/dh_s). weight: [max_depth, H] (row 0, step 1's, is never used: step 1
    is the block itself)."""

    def __init__(self, hidden_size: int, max_depth: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_depth, hidden_size))

    def forward(self, h_new: torch.Tensor, h_old: torch.Tensor, step: int) -> torch.Tensor:
        a = self.weight[step]
        dt = torch.promote_types(h_new.dtype, a.dtype)  # float32 under bf16 states, float64 in float64 checks
        old = h_old.to(dt)
        return (old + a.to(dt) * (h_new.to(dt) - old)).to(h_new.dtype)


class StateScale(nn.Module):
    """Scale-removing recurrence: every step's residual output adds to the state, so ||h|| grows with
    depth, and the coda's pre-norms hide that growth from the loss ("The Readout Blind Spot in Looped
    Language Models", arXiv 2606.24898). Anchored, each token's state after step s >= 2 is rescaled to
    the RMS its state had after step 1, times a learned factor exp(a_s) (a = 0 at init): the scale is
    a trained, bounded function of the step, not of how many residuals were added. Depth 1 is the
    converted model's; the rescale is per token, so causality and cached decoding are untouched."""

    eps = 1e-6

    def __init__(self, max_depth: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(max_depth))

    @classmethod
    def rms(cls, h: torch.Tensor) -> torch.Tensor:
        """[..., 1] float32 root mean square of each token's state."""
        return h.float().pow(2).mean(-1, keepdim=True).add(cls.eps).sqrt()

    def forward(self, h: torch.Tensor, step: int, anchor: torch.Tensor) -> torch.Tensor:
        return (h.float() * (anchor * self.log_scale[step].exp() / self.rms(h))).to(h.dtype)


CHECKPOINTING = ("auto", "always", "never")


@dataclass(frozen=True)
class StepTraining:
    """How the recursion's steps are differentiated while training; the trainer passes one to
    `forward` (no effect without gradients).

    checkpointing: recompute a step's activations in the backward pass instead of keeping them:
        "auto" (when depth x one step's activations would not fit the memory budget), "always", "never".
    backprop_steps: gradients through only the last k steps (0: all); earlier steps run without.
    """

    checkpointing: str = "auto"
    backprop_steps: int = 0

    def __post_init__(self) -> None:
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {', '.join(CHECKPOINTING)}; got {self.checkpointing!r}")
        if not isinstance(self.backprop_steps, int) or self.backprop_steps < 0:
            raise ValueError(f"backprop_steps must be an integer >= 0; got {self.backprop_steps!r}")


NO_TRAINING = StepTraining()


class RecurrentBlock(nn.Module):
    """The recurrent layer (`layer`, with its SVD `bases`), or a block of `block_layers` consecutive
    ones (`layer` first, then `tail_layers` with their `tail_bases`), and the trained parts that make
    each step step-aware (`trainable_parts`)."""

    def __init__(self, layers: list[nn.Module], windows: list[int | None], bases: list[SVDBases] | None,
                 config: OuroborosConfig, hidden_size: int, policy: RecursionPolicy | None = None):
        super().__init__()
        self.config = config
        self.policy = policy or RecursionPolicy()
        self.layer = layers[0].requires_grad_(False)  # the recurrent layer itself stays frozen
        self.tail_layers = nn.ModuleList([l.requires_grad_(False) for l in layers[1:]])
        self.windows = list(windows)
        self.window = self.windows[0]
        self.bases = bases[0] if bases else None
        self.tail_bases = nn.ModuleList(bases[1:]) if bases else None
        self.controller = None
        self.static = None
        k = len(layers)
        recursive = not config.heal_layers  # a heal model runs the layer once: nothing step-aware is built
        if recursive and config.variant == "controller":
            self.controller = Controller(hidden_size, config.controller_hidden, config.style_dim, config.rank,
                                         config.max_depth, config.pooling, layers=k)
        elif recursive and config.variant == "static":
            self.static = StaticModulation(config.rank, config.max_depth, layers=k)
        self.gate = RecurrenceGate(hidden_size, config.gate_bias) if config.gate and recursive else None
        self.rezero = (ReZeroScale(hidden_size, config.max_depth)
                             if config.loop_start == "rezero" and recursive else None)
        self.open_first_step = config.loop_start != "gate"  # step 1 is the block itself (stack, rezero)
        self.step_norms = (
            StepNorms([getattr(l, n).weight for l in layers for n in step_norm_names(l)], config.max_depth)
            if config.step_norm and recursive
            else None
        )
        self.injection = (InputInjection(hidden_size, config.injection)
                          if config.injection != "none" and recursive else None)
        self.state_scale = (StateScale(config.max_depth)
                            if config.state_scale == "anchored" and recursive else None)
        self.halter = Halter(hidden_size, config.max_depth) if config.halter and recursive else None

    @property
    def layers(self) -> list[nn.Module]:
        """The block's layers in the order each step runs them."""
        return [self.layer, *self.tail_layers]

    def block_bases(self) -> list[SVDBases | None]:
        return [self.bases, *self.tail_bases] if self.bases is not None else [None] * len(self.layers)

    @property
    def kind(self) -> str:
        """The recurrent layer's `layers.attention_kind` (Gemma 2/3's may be local or global)."""
        return attention_kind(self.window)

    def trainable_parts(self) -> dict[str, nn.Module]:
        parts = {"controller": self.controller, "static": self.static, "gate": self.gate, "step_norms": self.step_norms,
                 "injection": self.injection, "state_scale": self.state_scale, "rezero": self.rezero,
                 "halter": self.halter}
        return {k: m for k, m in parts.items() if m is not None}

    def modulation(self, h: torch.Tensor, step: int, mask, pool_state: PoolState | None) -> torch.Tensor | None:
        if self.controller is not None:
            return self.controller.from_hidden(h, step, self.config.pooling, mask, pool_state)
        if self.static is not None:
            return self.static(step)
        return None

    def lora_set(self, p: int) -> str | None:
        """The plain-LoRA set (PEFT adapter name) the block's layers use at parameter step p when each step has its
        own (`recurrent_lora_steps` > 1); None when one set (or none) serves every step."""
        steps = self.config.recurrent_lora_steps  # > 1 only with recurrent_lora on a recursion (OuroborosConfig)
        return step_adapter(min(p, steps - 1)) if steps > 1 else None

    def step(self, h: torch.Tensor, s: int, ctx: AttentionContext, mask, kv=None,
             pool_state: PoolState | None = None, e: torch.Tensor | None = None,
             anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Step s (0-based) on state h; kv: one cache slot per block layer (or None); e: the prelude's
        output (read by the input injection); anchor: the RMS of step 0's output per token
        (`anchor_of`; None at step 0 or without an anchored scale)."""
        p = self.policy.parameter_step(s)
        d = self.modulation(h, p, mask, pool_state)
        adapter = self.lora_set(p)
        x = self.injection(h, e) if self.injection is not None else h
        n = len(TARGETS)
        for j, (layer, bases, window) in enumerate(zip(self.layers, self.block_bases(), self.windows)):
            if d is not None:
                project = bases.modulated(d[..., j * n : (j + 1) * n, :], adapter)
            else:
                project = step_adapter_projection(adapter) if adapter is not None else None
            norms = self.step_norms(p, h.dtype, j) if self.step_norms is not None else None
            x = decoder_layer(layer, x, ctx, window=window, project=project, norm_weights=norms,
                              kv=kv[j] if kv is not None else None)
        out = self.update(x, h, s, p)
        damping = self.policy.update_scale(s)
        out = out if damping == 1.0 else torch.lerp(h, out, damping)  # h + damping * (out - h)
        return self.state_scale(out, p, anchor) if anchor is not None else out

    def update(self, x: torch.Tensor, h: torch.Tensor, s: int, p: int) -> torch.Tensor:
        """The state after step s (parameter step p) from its block output x and the state h before it: the block
        itself at step 1 of a loop that starts at the stack (loop_start stack / rezero), else behind the gate or
        the step's ReZero scale (or x, with neither)."""
        if s == 0 and self.open_first_step:
            return x
        if self.rezero is not None:
            return self.rezero(x, h, p)
        return self.gate(x, h) if self.gate is not None else x

    def anchor_of(self, h: torch.Tensor, s: int, anchor: torch.Tensor | None) -> torch.Tensor | None:
        """The scale anchor once step s has run: step 0's output RMS with an anchored scale (else None)."""
        if self.state_scale is None or s > 0:
            return anchor
        return StateScale.rms(h)

    def plain(self, h: torch.Tensor, ctx: AttentionContext, kv: list[KVSlot] | None = None) -> torch.Tensor:
        """The recurrent layer applied once with nothing added: the pruned baseline, prelude + recurrent
        layer + coda (`OuroborosConfig.pruned_stack`), the floor every gap is measured from, whatever
        the block (a block's other layers are the recursion's, not the floor's)."""
        return decoder_layer(self.layer, h, ctx, window=self.window, kv=kv[0] if kv is not None else None)

    def step_activation_bytes(self, h: torch.Tensor) -> int:
        """Estimated bytes one plain training step keeps for backward (what checkpointing frees)."""
        ctrl = 2 * self.config.controller_hidden + self.config.style_dim if self.controller is not None else 0
        return sum(step_activation_bytes(h, layer, ctrl if j == 0 else 0) for j, layer in enumerate(self.layers))

    def uses_checkpointing(self, h: torch.Tensor, depth: int, mode: str = "auto") -> bool:
        if not (self.training and torch.is_grad_enabled()) or mode == "never":
            return False
        return mode == "always" or not activations_fit(self.step_activation_bytes(h), depth, h.device)

    def forward(self, h: torch.Tensor, ctx: AttentionContext, depth: int, mask=None, cache=None,
                exits: TokenExits | None = None, observe=None, training: StepTraining = NO_TRAINING) -> torch.Tensor:
        """`depth` steps (at most, with `exits`: per-position adaptive depth) from the prelude's output h.
        cache: optional list of `cache.StepCache`, one per step (cached decoding).
        observe: optional callback observe(s, h) with the state after each step.
        training: how the steps are differentiated (`StepTraining`; only while training with gradients)."""
        e = h  # the prelude's output, recalled at every step by the input injection
        anchor = None  # step 0's output RMS (an anchored state scale)
        if exits is not None:
            for s in range(depth):
                h = self.exit_step(h, s, ctx, mask, cache[s] if cache is not None else None, exits, e, anchor)
                anchor = self.anchor_of(h, s, anchor)
            return h
        grad = self.training and torch.is_grad_enabled()
        first_grad = depth - training.backprop_steps if grad and training.backprop_steps else 0
        use_ckpt = cache is None and self.uses_checkpointing(h, depth - first_grad, training.checkpointing)
        for s in range(depth):
            slot = cache[s] if cache is not None else None
            with torch.no_grad() if s < first_grad else contextlib.nullcontext():  # truncated backprop
                if use_ckpt and s >= first_grad:
                    h = checkpoint(self.step, h, s, ctx, mask, None, None, e, anchor, use_reentrant=False)
                else:
                    h = self.step(h, s, ctx, mask, slot.kv if slot else None, slot.pool if slot else None, e, anchor)
                anchor = self.anchor_of(h, s, anchor)
            if observe is not None:
                observe(s, h)
        return h

    def exit_step(self, h: torch.Tensor, s: int, ctx: AttentionContext, mask, slot, exits: TokenExits,
                  e: torch.Tensor | None = None, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """One step under adaptive exit: stopped positions keep their state and lend their last
        keys/values to this step's attention; once every position has stopped, the step is skipped
        (with a cache, its slot still receives their keys/values and pooled states)."""
        exits.start_step(s)
        if exits.all_stopped():
            if slot is not None:
                exits.skip(slot)
                if self.controller is not None:
                    pool(h, self.config.pooling, mask, slot.pool)
            return h
        kv = [ExitKV(exits, k, block_key(j)) for j, k in
              enumerate(slot.kv if slot is not None else [None] * len(self.layers))]
        h_new = self.step(h, s, ctx, mask, kv, slot.pool if slot is not None else None, e, anchor)
        return exits.update(s, h, h_new, self.halter)
