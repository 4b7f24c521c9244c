"""How much memory the recurrence's activations need, and whether they fit.

`checkpointing="auto"` (the default) checkpoints the recurrence steps of a training forward
only when keeping every step's activations would not fit a budget: `MEMORY_FRACTION` of the
device's free memory (on the CPU, of the available RAM), measured when the forward starts.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .projections import get_projection

MEMORY_FRACTION = 0.5


def step_activation_bytes(h: torch.Tensor, layer: nn.Module, controller_per_token: int = 0) -> int:
    """Estimated bytes one plain training step keeps for backward for hidden states `h` [B, T, H],
    per token from the layer's shapes (attributed with `bench/saved_attribution.py`): the gated MLP's
    two inputs, the norms' and attention's inputs and outputs, the gate's state and pre-activation,
    plus `controller_per_token` elements for the Controller's hidden layers."""
    dev = h.device.type
    amp = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
    elem = torch.finfo(torch.get_autocast_dtype(dev)).bits // 8 if amp else h.element_size()
    H = h.shape[-1]
    per_token = 2 * get_projection(layer, "gate").out_features + 7 * H + 2 * get_projection(layer, "k").out_features \
        + controller_per_token
    return h[..., 0].numel() * per_token * elem


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (available RAM for the CPU); None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def activations_fit(step_bytes: int, depth: int, device: torch.device, fraction: float = MEMORY_FRACTION) -> bool:
    """Whether `depth` steps of `step_bytes` each fit `fraction` of the free memory (True where unknown)."""
    free = free_bytes(device)
    return free is None or depth * step_bytes <= fraction * free


def trainable_parameter_count(config, hidden_size: int) -> int:
    """Parameters the trainable parts of `config` will have on a base of this hidden size,
    counted from the settings alone (before anything is allocated)."""
    from .config import TARGETS

    H, r, steps, n = hidden_size, config.rank, config.max_depth, 0
    if config.heal_layers:
        return 0  # a heal model builds nothing step-aware (its LoRA is counted by the caller)
    k = config.block_layers
    if config.variant == "controller":
        ch, sd = config.controller_hidden, config.style_dim
        Hc = 2 * H if config.pooling == "mean_and_token" else H  # what the Controller reads
        n += Hc + (Hc * ch + ch) + (ch * sd + sd) + steps * sd + (sd * k * len(TARGETS) * r + k * len(TARGETS) * r)
    elif config.variant == "static":
        n += steps * k * len(TARGETS) * r
    if config.gate:
        n += 2 * H * H + H
    if config.step_norm:
        n += steps * 2 * k * H
    n += {"none": 0, "diagonal": H, "linear": H * H + H}[config.injection]
    if config.state_scale == "anchored":
        n += steps
    if config.loop_start == "rezero":
        n += steps * H
    if config.halter:
        n += 2 * H + 1 + steps
    return n


def check_trainable_size(config, hidden_size: int, device: torch.device, extra: int = 0) -> None:
    """Refuse settings whose trainable parts (float32 weights, gradients and two AdamW moments; `extra`
    parameters outside the recurrent block) could not fit the memory free on `device`, before
    anything is allocated."""
    n = trainable_parameter_count(config, hidden_size) + extra
    need, free = 16 * n, free_bytes(device)
    if free is not None and need > free:
        raise ValueError(
            f"these settings give {n:,} trainable parameters ({need / 2**30:.1f} GiB with gradients and optimizer "
            f"state), more than the {free / 2**30:.1f} GiB free on {device}: lower controller_hidden, style_dim, "
            "max_depth or rank")
