"""The recurrent block: one frozen decoder layer applied N times, made step-aware.

Each step s:
    d      = Controller(pool(h), s)   |  static vectors[s]  |  nothing
    h_new  = layer(h; norms = step_norms[s], projections + (alpha/r) B diag(d) A)
    h      = g * h_new + (1 - g) * h,   g = sigmoid(W_g [h_new; h] + b_g)   (or h = h_new)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import OuroborosConfig
from .controller import Controller, PoolState, StaticModulation, pool
from .families import step_norm_names
from .layers import AttentionContext, KVSlot, decoder_layer
from .memory import activations_fit
from .lora import SVDLoRABases


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
        out_dtype, dt = h_new.dtype, self.bias.dtype  # the gate computes in its own (float32) precision
        h_new, h_old = h_new.to(dt), h_old.to(dt)
        # Out of place on purpose: under autocast the matmuls run in bf16/fp16, and an in-place
        # addmm_ into a low-precision result with float32 operands would fail.
        z = torch.addmm(torch.addmm(self.bias, h_new.flatten(0, -2), self.weight_new.t()), h_old.flatten(0, -2), self.weight_old.t())
        g = torch.sigmoid(z.to(dt)).view_as(h_new)
        return torch.lerp(h_old, h_new, g).to(out_dtype)  # g*h_new + (1-g)*h_old

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
    """A separate pair of RMSNorm weights (pre-attention, pre-MLP) for every step, each
    initialised from the recurrent layer's own, so a fresh model normalises as the base does."""

    def __init__(self, input_norm: torch.Tensor, post_norm: torch.Tensor, max_steps: int):
        super().__init__()
        w = torch.stack([input_norm.detach().float(), post_norm.detach().float()])  # [2, H]
        self.weight = nn.Parameter(w.unsqueeze(0).repeat(max_steps, 1, 1))

    def forward(self, step: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight[step].to(dtype)
        return w[0], w[1]


CHECKPOINTING = ("auto", "always", "never")


class RecurrentBlock(nn.Module):
    def __init__(self, layer: nn.Module, window: int | None, bases: SVDLoRABases | None, config: OuroborosConfig, hidden_size: int):
        super().__init__()
        self.config = config
        self.layer = layer.requires_grad_(False)  # the recurrent layer itself stays frozen
        self.window = window
        self.bases = bases
        self.controller = None
        self.static = None
        if config.variant == "controller":
            self.controller = Controller(hidden_size, config.controller_hidden, config.style_dim, config.rank, config.max_steps)
        elif config.variant == "static":
            self.static = StaticModulation(config.rank, config.max_steps)
        self.gate = RecurrenceGate(hidden_size, config.gate_bias) if config.gate else None
        self.step_norms = (
            StepNorms(*(getattr(layer, n).weight for n in step_norm_names(layer)), config.max_steps)
            if config.step_norm
            else None
        )
        self.checkpointing = "auto"

    def set_checkpointing(self, mode: str) -> None:
        if mode not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {', '.join(CHECKPOINTING)}; got {mode!r}")
        self.checkpointing = mode

    def trainable_parts(self) -> dict[str, nn.Module]:
        parts = {"controller": self.controller, "static": self.static, "gate": self.gate, "step_norms": self.step_norms}
        return {k: m for k, m in parts.items() if m is not None}

    def modulation(self, h: torch.Tensor, step: int, mask, pool_state: PoolState | None) -> torch.Tensor | None:
        if self.controller is not None:
            return self.controller(pool(h, self.config.pooling, mask, pool_state), step)
        if self.static is not None:
            return self.static(step)
        return None

    def step(self, h: torch.Tensor, s: int, ctx: AttentionContext, mask, kv: KVSlot | None = None, pool_state: PoolState | None = None) -> torch.Tensor:
        d = self.modulation(h, s, mask, pool_state)
        project = self.bases.modulated(d) if d is not None else None
        norms = self.step_norms(s, h.dtype) if self.step_norms is not None else None
        h_new = decoder_layer(self.layer, h, ctx, window=self.window, project=project, norm_weights=norms, kv=kv)
        return self.gate(h_new, h) if self.gate is not None else h_new

    def plain(self, h: torch.Tensor, ctx: AttentionContext, kv: KVSlot | None = None) -> torch.Tensor:
        """The recurrent layer applied once with nothing added (the pruned baseline)."""
        return decoder_layer(self.layer, h, ctx, window=self.window, kv=kv)

    def uses_checkpointing(self, h: torch.Tensor, depth: int) -> bool:
        if not (self.training and torch.is_grad_enabled()) or self.checkpointing == "never":
            return False
        return self.checkpointing == "always" or not activations_fit(h, depth, self.layer)

    def forward(self, h: torch.Tensor, ctx: AttentionContext, depth: int, mask=None, cache=None) -> torch.Tensor:
        """cache: optional list of `cache.StepCache`, one per step (cached decoding)."""
        use_ckpt = cache is None and self.uses_checkpointing(h, depth)
        for s in range(depth):
            if use_ckpt:
                h = checkpoint(self.step, h, s, ctx, mask, use_reentrant=False)
            elif cache is not None:
                h = self.step(h, s, ctx, mask, cache[s].kv, cache[s].pool)
            else:
                h = self.step(h, s, ctx, mask)
        return h
