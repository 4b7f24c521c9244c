"""Frozen SVD low-rank bases for the seven projections of the recurrent layer.

For each projection W (out x in) of the recurrent layer R, the mean residual of the removed
layers, M = mean_i (W_i - W_R), is factored by SVD and truncated to rank r:
    A = V_r^T            (r x in, the top-r right singular vectors)
    B = U_r diag(S_r)    (out x r)
so that B A is the best rank-r approximation of M. Both are frozen buffers. A modulation
vector d (r values per projection, from the Controller or a static per-step vector) turns
the projection into
    W x + (alpha / r) B diag(d) A x.

Projections that read the same input share one down-projection matmul: q, k and v read the
normed attention input, gate and up the normed MLP input. `ModulatedProjections` computes
x A^T once per group, and folds each up-projection into the layer's own matmul. A projection that
also carries plain LoRA (`recurrent_lora`, PEFT) adds its B A x on top.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TARGETS
from .layers import get_projection
from .peft_lora import plain_lora_delta

# Targets that read the same input, in TARGETS order.
GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
GROUP_OF = {t: g for g in GROUPS for t in g}


def mean_residual(recurrent: nn.Module, removed: list[nn.Module], target: str) -> torch.Tensor:
    """mean_i (W_i - W_R) in float32, for one projection."""
    w_r = get_projection(recurrent, target).weight.detach().to(torch.float32)
    acc = torch.zeros_like(w_r)
    for layer in removed:
        acc += get_projection(layer, target).weight.detach().to(torch.float32) - w_r
    return acc / len(removed)


def svd_bases(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of the rank-r truncation."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    return Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous()


class SVDBases(nn.Module):
    """Buffers A_<group> (concatenated over the group's targets) and B_<target>."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float, dtype, device=None):
        super().__init__()
        self.rank = rank
        self.scale = alpha / rank
        self._fused: dict[str, tuple] = {}  # target -> (key, [W | scale * B]); see fused_weight
        for group in GROUPS:
            in_features = shapes[group[0]][1]
            self.register_buffer(
                "A_" + group[0], torch.zeros(rank * len(group), in_features, dtype=dtype, device=device)
            )
        for t in TARGETS:
            out_features = shapes[t][0]
            self.register_buffer("B_" + t, torch.zeros(out_features, rank, dtype=dtype, device=device))

    @classmethod
    def from_layers(cls, recurrent: nn.Module, removed: list[nn.Module] | None, rank: int, alpha: float):
        """Factor the removed layers' mean residual; with removed=None only allocate (zeros)."""
        shapes = {t: tuple(get_projection(recurrent, t).weight.shape) for t in TARGETS}
        w = get_projection(recurrent, "q").weight
        bases = cls(shapes, rank, alpha, dtype=w.dtype, device=w.device)
        if w.is_meta or removed is None:  # shapes only: nothing to factor
            return bases
        for group in GROUPS:
            As = []
            for t in group:
                A, B = svd_bases(mean_residual(recurrent, removed, t), rank)
                As.append(A)
                getattr(bases, "B_" + t).copy_(B)
            getattr(bases, "A_" + group[0]).copy_(torch.cat(As))
        return bases

    def A(self, target: str) -> torch.Tensor:
        for group in GROUPS:
            if target in group:
                i = group.index(target)
                return getattr(self, "A_" + group[0])[i * self.rank : (i + 1) * self.rank]
        raise KeyError(target)

    def B(self, target: str) -> torch.Tensor:
        return getattr(self, "B_" + target)

    def fused_weight(self, target: str, linear: nn.Linear) -> torch.Tensor:
        """[W | (alpha/r) B] (out x (in + r)) for `target`, so that one matmul of [x | u] computes
        W x + (alpha/r) B u. Built on first use and rebuilt whenever W or B is replaced or
        modified in place (moved, cast, loaded); not saved (it is derived from frozen weights)."""
        W, B = linear.weight, self.B(target)
        key = (W.data_ptr(), W._version, W.dtype, B.data_ptr(), B._version)
        hit = self._fused.get(target)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                scaled = B.to(torch.promote_types(B.dtype, torch.float32)) * self.scale  # scaled in >= float32
                hit = (key, torch.cat([W, scaled.to(W.dtype)], dim=1))
            self._fused[target] = hit
        return hit[1]

    def _apply(self, fn, *args, **kwargs):
        self._fused.clear()  # moved or cast: drop the old folded copies now rather than at the next forward
        return super()._apply(fn, *args, **kwargs)

    def folded_weights(self) -> list[torch.Tensor]:
        """The cached [W | (alpha/r) B] matrices built so far (frozen, derived weights)."""
        return [w for _, w in self._fused.values()]

    def modulated(self, d: torch.Tensor, adapter: str | None = None) -> "ModulatedProjections":
        """A projection hook for `layers.decoder_layer`, for modulation d [..., 7, r] (TARGETS order); adapter:
        which set of the layer's plain LoRA is added (`peft_lora.step_adapter`; None: PEFT's active ones)."""
        return ModulatedProjections(self, d, adapter)


class ModulatedProjections:
    """Computes W_t x + (alpha/r) B_t diag(d_t) A_t x for each target t.

    * The down-projections x A^T of targets that read the same input are one matmul per group.
    * The up-projection is folded into the layer's own matmul: [x | d * x A_t^T] @ [W_t | (alpha/r) B_t]^T.
      Forward and backward are then one large matmul each per projection, instead of the
      layer's matmul plus a thin, memory-bound rank-r one and an addition over the output.

    d has shape [7, r] (static: same for every token) or [B, T, 7, r] (Controller).
    """

    def __init__(self, bases: SVDBases, d: torch.Tensor, adapter: str | None = None):
        self.bases = bases
        self.d = d
        self.adapter = adapter  # the recurrent block's plain-LoRA set this step uses (None: PEFT's active ones)
        self._group_x: dict[str, torch.Tensor] = {}
        self._group_u: dict[str, torch.Tensor] = {}

    def __call__(self, target: str, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        b = self.bases
        r = b.rank
        group = GROUP_OF[target]
        lead = group[0]
        if self._group_x.get(lead) is not x:
            first = TARGETS.index(lead)
            d = self.d[..., first : first + len(group), :].flatten(-2)  # [..., len(group)*r]
            self._group_u[lead] = (x @ getattr(b, "A_" + lead).to(x.dtype).t()) * d.to(x.dtype)
            self._group_x[lead] = x
        i = group.index(target)
        u = self._group_u[lead][..., i * r : (i + 1) * r]
        base = getattr(linear, "base_layer", linear)  # under plain LoRA (PEFT), the frozen layer it wraps
        out = F.linear(torch.cat([x, u], dim=-1), b.fused_weight(target, base), base.bias)
        return out if base is linear else out + plain_lora_delta(linear, x, self.adapter).to(out.dtype)
