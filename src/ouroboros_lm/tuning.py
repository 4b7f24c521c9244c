"""Full fine-tuning of chosen kept layers of a heal model (`tune_layers`), as a delta on frozen weights.

Every parameter of a tuned layer (its projections, their biases, its norms) reads `W + delta`, `delta` a
trainable tensor of W's shape, zero at init: torch's own parametrization (`register_parametrization`), so the
layer's forward, PEFT and the families' code see an ordinary `.weight`. Training `delta` with AdamW is
training W itself (the update is the same; only weight decay pulls toward the pretrained W instead of toward 0).
Keeping W apart is what lets the model still run as the base has it: the pruned baseline and
`adaptation_disabled` switch the deltas off, the base's fingerprints stay the base's, and an adapter stores the
deltas alone. `bake` merges them in (the plain export, in float64). These layers carry no LoRA.

The uses (issue #42): the layers around each cut, the last layers (the reverse-order pruning study's "head and
last few layers"), or a replacement layer kept for a removed span and trained in full (LLM-Streamline).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize

DELTA = ".delta"  # a tuned tensor's trainable part ends with this name: `...parametrizations.weight.0.delta`


class WeightDelta(nn.Module):
    """The parametrization W -> W + delta (delta zero at init; float32, like the LoRA weights)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype) if self.enabled else weight


def attach_deltas(layer: nn.Module) -> None:
    """Make every parameter of `layer` read `W + delta` (delta trainable, W frozen)."""
    for module in list(layer.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            if parametrize.is_parametrized(module, name):
                continue
            p.requires_grad_(False)
            parametrize.register_parametrization(module, name, WeightDelta(p), unsafe=True)
            getattr(module.parametrizations, name).original.requires_grad_(False)


def deltas_of(module: nn.Module) -> list[WeightDelta]:
    return [m for m in module.modules() if isinstance(m, WeightDelta)]


def tuned_parameters(model) -> dict[str, nn.Parameter]:
    """The tuned layers' deltas, by their names in `model` (what an adapter stores of them)."""
    return {n: p for n, p in model.named_parameters() if n.endswith(DELTA) and ".parametrizations." in n}


@contextlib.contextmanager
def deltas_disabled(model):
    """The tuned layers as the base has them (W alone), for the duration."""
    deltas = deltas_of(model)
    try:
        for d in deltas:
            d.enabled = False
        yield
    finally:
        for d in deltas:
            d.enabled = True


def bake(module: nn.Module, deltas: bool = True) -> nn.Module:
    """`module` with every delta merged into its weight (W + delta, in the weight's dtype; deltas=False: W
    alone) and the parametrizations gone: an ordinary layer again (in place; returns it)."""
    for m in list(module.modules()):
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, name, leave_parametrized=deltas)
    return module


def cut_neighbours(keep_layers, num_layers: int) -> tuple[int, ...]:
    """The kept layers beside a cut: each kept layer whose neighbour in the base (the layer before it, or after it)
    was removed. Keep 0-2, 8-11, 20-24, 27-29 of 30: layers 2, 8, 11, 20, 24 and 27."""
    kept = set(keep_layers)
    return tuple(i for i in sorted(kept)
                 if (i > 0 and i - 1 not in kept) or (i + 1 < num_layers and i + 1 not in kept))


def last_kept(keep_layers, n: int) -> tuple[int, ...]:
    """The last `n` kept layers (the reverse-order pruning study's "last few layers")."""
    return tuple(sorted(keep_layers)[-n:]) if n > 0 else ()


def tuned_parameter_count(layer: nn.Module, n_layers: int) -> int:
    """Weights `n_layers` tuned layers shaped like `layer` train."""
    return n_layers * sum(p.numel() for p in layer.parameters())
