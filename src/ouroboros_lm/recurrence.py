"""The recurrent block: one frozen decoder layer applied N times, made step-aware.

Each step s:
    d      = Controller(pool(h), s)   |  static vectors[s]  |  nothing
    h_new  = layer(h; norms = step_norms[s], projections + (alpha/r) B diag(d) A)
    h      = g * h_new + (1 - g) * h,   g = sigmoid(W_g [h_new; h] + b_g)   (or h = h_new)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import OuroborosConfig
from .controller import Controller, PoolState, StaticModulation
from .layers import AttentionContext, KVSlot, decoder_layer
from .lora import SVDLoRABases

CHECKPOINT_SETTINGS = ("auto", "always", "never")


def free_memory(device: torch.device) -> int | None:
    """Bytes free for activations on `device` (None where unknown, e.g. meta)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return None
    return None


class _GateMix(torch.autograd.Function):
    """lerp(h_old, h_new, sigmoid(z)) computed in `dt`, saving z, h_new and h_old as they are (in
    their own, possibly bf16, precision; h_new and h_old are kept anyway for W_g's gradient)
    instead of float32 copies of the states and of g."""

    @staticmethod
    def forward(ctx, z, h_new, h_old, dt):
        ctx.save_for_backward(z, h_new, h_old)
        ctx.dt = dt
        g = torch.sigmoid(z.to(dt))
        return torch.lerp(h_old.to(dt), h_new.to(dt), g).to(h_new.dtype)  # g*h_new + (1-g)*h_old

    @staticmethod
    def backward(ctx, go):
        z, h_new, h_old = ctx.saved_tensors
        dt = ctx.dt
        g = torch.sigmoid(z.to(dt))
        go = go.to(dt)
        g_new = go * g
        gz = (go * (h_new.to(dt) - h_old.to(dt)) * g * (1 - g)).to(z.dtype)
        return gz, g_new.to(h_new.dtype), (go - g_new).to(h_old.dtype), None


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
        return _GateMix.apply(z, h_new, h_old, dt)

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
            StepNorms(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, config.max_steps)
            if config.step_norm
            else None
        )
        self.checkpointing = getattr(config, "checkpoint", None)  # see use_checkpoint
        self.memory_fraction = 0.5

    def modulation(self, h: torch.Tensor, step: int, mask, pool_state: PoolState | None) -> torch.Tensor | None:
        if self.controller is not None:
            return self.controller.from_hidden(h, step, self.config.pooling, mask, pool_state)
        if self.static is not None:
            return self.static(step)
        return None

    def step(self, h: torch.Tensor, s: int, ctx: AttentionContext, mask, kv: KVSlot | None = None, pool_state: PoolState | None = None) -> torch.Tensor:
        d = self.modulation(h, s, mask, pool_state)
        project = self.bases.modulated(d) if d is not None else None
        norms = self.step_norms(s, h.dtype) if self.step_norms is not None else None
        h_new = decoder_layer(self.layer, h, ctx, window=self.window, project=project, norm_weights=norms, kv=kv)
        return self.gate(h_new, h) if self.gate is not None else h_new

    def step_activation_bytes(self, h: torch.Tensor) -> int:
        """Estimated bytes one plain training step saves for backward (what checkpointing would
        free), from the layer's shapes: the gated MLP's two inputs, the norms' and attention's
        inputs and outputs, the gate's state and pre-activation, the Controller's hidden layers
        (counted per token, from this round's `bench/saved_attribution.py`)."""
        dev = h.device.type
        amp = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        e = torch.finfo(torch.get_autocast_dtype(dev)).bits // 8 if amp else h.element_size()
        attn, mlp, H = self.layer.self_attn, self.layer.mlp, h.shape[-1]
        per_token = e * (2 * mlp.gate_proj.out_features + 7 * H + 2 * attn.k_proj.out_features)
        if self.controller is not None:
            per_token += e * (2 * self.config.controller_hidden + self.config.style_dim)
        return h[..., 0].numel() * per_token

    def use_checkpoint(self, h: torch.Tensor, depth: int, cache=None) -> bool:
        """Whether this forward checkpoints its steps (each step's input kept, the step recomputed
        in the backward pass).

        `self.checkpointing` (prototype of a config setting `checkpoint`): "never"; "always";
        "auto": only when `depth` plain steps' activations (`step_activation_bytes`) would exceed
        `memory_fraction` of the device's free memory; None (the default until the config has
        the setting): the config's checkpoint_from_depth rule."""
        if not (self.training and torch.is_grad_enabled()) or cache is not None:
            return False
        setting = self.checkpointing
        if setting is None:
            return 0 < self.config.checkpoint_from_depth <= depth
        if setting not in CHECKPOINT_SETTINGS:
            raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINT_SETTINGS)}; got {setting!r}")
        if setting != "auto":
            return setting == "always"
        free = free_memory(h.device)
        return free is not None and depth * self.step_activation_bytes(h) > self.memory_fraction * free

    def forward(self, h: torch.Tensor, ctx: AttentionContext, depth: int, mask=None, cache=None) -> torch.Tensor:
        """cache: optional (list of KVSlot, list of PoolState), one entry per step."""
        use_ckpt = self.use_checkpoint(h, depth, cache)
        for s in range(depth):
            if use_ckpt:
                h = checkpoint(self.step, h, s, ctx, mask, use_reentrant=False)
            elif cache is not None:
                h = self.step(h, s, ctx, mask, cache[0][s], cache[1][s])
            else:
                h = self.step(h, s, ctx, mask)
        return h
