"""How much memory the recurrence's activations need, and whether they fit.

`checkpointing="auto"` (the default) checkpoints the recurrence steps of a training forward
only when keeping every step's activations would not fit a budget: `MEMORY_FRACTION` of the
device's free memory (on the CPU, of the available RAM), measured when the forward starts.
"""
from __future__ import annotations

import os

import torch
from torch import nn

MEMORY_FRACTION = 0.5
# Tensors one recurrence step keeps for backward, per token, in units of hidden size H and MLP
# width I (measured with bench/saved_bytes-style counting: norms, q/k/v/o inputs and outputs,
# attention output, the MLP's three inputs, the gate's operands, the Controller's pooled view).
PER_TOKEN_H, PER_TOKEN_I = 14, 4


def step_activation_bytes(h: torch.Tensor, layer: nn.Module) -> int:
    """Estimated bytes one recurrence step keeps for backward for hidden states `h` [B, T, H]."""
    H = h.shape[-1]
    inter = layer.mlp.gate_proj.weight.shape[0]
    elem = torch.finfo(torch.get_autocast_dtype(h.device.type)).bits // 8 if torch.is_autocast_enabled(h.device.type) \
        else h.element_size()
    return h.shape[0] * h.shape[1] * (PER_TOKEN_H * H + PER_TOKEN_I * inter) * max(elem, 2)


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


def activations_fit(h: torch.Tensor, depth: int, layer: nn.Module, fraction: float = MEMORY_FRACTION) -> bool:
    """Whether `depth` steps' activations fit `fraction` of the free memory (True where unknown)."""
    free = free_bytes(h.device)
    return free is None or depth * step_activation_bytes(h, layer) <= fraction * free


def trainable_parameter_count(config, hidden_size: int) -> int:
    """Parameters the trainable parts of `config` will have on a base of this hidden size,
    counted from the settings alone (before anything is allocated)."""
    from .config import TARGETS

    H, r, steps, n = hidden_size, config.rank, config.max_steps, 0
    if config.variant == "controller":
        ch, sd = config.controller_hidden, config.style_dim
        n += H + (H * ch + ch) + (ch * sd + sd) + steps * sd + (sd * len(TARGETS) * r + len(TARGETS) * r)
    elif config.variant == "static":
        n += steps * len(TARGETS) * r
    if config.gate:
        n += 2 * H * H + H
    if config.step_norm:
        n += steps * 2 * H
    if config.halter:
        n += 2 * H + 1 + steps
    return n


def check_trainable_size(config, hidden_size: int, device: torch.device) -> None:
    """Refuse settings whose trainable parts (float32 weights, gradients and two AdamW moments)
    could not fit the memory free on `device`, before anything is allocated."""
    n = trainable_parameter_count(config, hidden_size)
    need, free = 16 * n, free_bytes(device)
    if free is not None and need > free:
        raise ValueError(
            f"these settings give {n:,} trainable parameters ({need / 2**30:.1f} GiB with gradients and optimizer "
            f"state), more than the {free / 2**30:.1f} GiB free on {device}: lower controller_hidden, style_dim, "
            "max_steps or rank")
