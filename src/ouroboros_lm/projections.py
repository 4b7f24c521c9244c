"""The seven projections of a decoder layer (q, k, v, o, gate, up, down), whatever modules hold them.

Most families have one nn.Linear per projection. Phi-3 / Phi-4-mini fuse q/k/v into `qkv_proj`
and gate/up into `gate_up_proj`: there each projection is a `ProjectionSlice`, rows of the fused
weight, so the SVD bases are factored and the low-rank paths applied per projection (q, k and v
keep their own bases) while the layer's own forward still calls one fused module. The seven-name
view (`get_projection`, `TARGETS`) is the one the rest of the package and the user see.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .families import FAMILIES, SEPARATE, family_of, submodule

# Names of the seven projections and their modules in a layer with one module each.
PROJECTIONS = {targets[0]: path for path, targets in SEPARATE.items()}
# Every projection module name some family has (PEFT LoRA targets these on the outer layers).
MODULE_NAMES = tuple(dict.fromkeys(path.rsplit(".", 1)[-1] for f in FAMILIES.values() for path in f.projections))


class ProjectionSlice:
    """Rows [start, stop) of a fused nn.Linear, standing for one projection: `weight`, `bias`,
    `in_features`, `out_features` and a call, like the nn.Linear a separate projection is."""

    def __init__(self, linear: nn.Linear, start: int, stop: int):
        self.linear, self.start, self.stop = linear, start, stop
        self.in_features, self.out_features = linear.in_features, stop - start

    @property
    def weight(self):
        return self.linear.weight[self.start : self.stop]

    @property
    def bias(self):
        return None if self.linear.bias is None else self.linear.bias[self.start : self.stop]

    @property
    def base_layer(self) -> "ProjectionSlice":
        """Under PEFT LoRA (the fused module wrapped whole): the same rows of the frozen module it wraps."""
        inner = getattr(self.linear, "base_layer", None)
        if inner is None:
            raise AttributeError("base_layer")  # not wrapped: getattr(slice, "base_layer", slice) is the slice
        return ProjectionSlice(inner, self.start, self.stop)

    def rows(self, y):
        """This projection's part of the fused module's output y [..., out]."""
        return y[..., self.start : self.stop]

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias)


def split_sizes(layer: nn.Module, targets: tuple[str, ...], linear: nn.Linear) -> list[int]:
    """Output rows of each target in a fused module: q then k, v of equal size (grouped-query heads);
    gate and up halves."""
    if targets == ("q", "k", "v"):
        attn = layer.self_attn
        q = attn.config.num_attention_heads * attn.head_dim
        return [q, (linear.out_features - q) // 2, (linear.out_features - q) // 2]
    return [linear.out_features // len(targets)] * len(targets)


def projection_modules(layer: nn.Module) -> dict[str, list]:
    """{module path: [(target, nn.Linear or ProjectionSlice), ...]} for the layer's projection modules."""
    out = {}
    for path, targets in family_of(layer).projections.items():
        linear = submodule(layer, path)
        if len(targets) == 1:
            out[path] = [(targets[0], linear)]
            continue
        parts, start = [], 0
        for t, n in zip(targets, split_sizes(layer, targets, linear)):
            parts.append((t, ProjectionSlice(linear, start, start + n)))
            start += n
        out[path] = parts
    return out


def projections_of(layer: nn.Module) -> dict:
    """{target: nn.Linear or ProjectionSlice} for the seven targets."""
    return {t: p for parts in projection_modules(layer).values() for t, p in parts}


def get_projection(layer: nn.Module, target: str):
    return projections_of(layer)[target]


def projection_linears(layer: nn.Module) -> list[nn.Linear]:
    """The layer's projection modules themselves (4 for a fused layer, 7 otherwise)."""
    return [submodule(layer, path) for path in family_of(layer).projections]
