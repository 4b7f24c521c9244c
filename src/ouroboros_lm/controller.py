"""Where the modulation vectors d come from: the Controller hypernetwork, or static vectors.

The Controller reads a pooled view of the hidden state entering a recurrence step and the
step index, and emits one r-vector per projection (q, k, v, o, gate, up, down). Its output
head is zero-initialised, so a fresh model is exactly the un-modulated recursion.

Pooling decides what "the hidden state" a position sees is:
  prefix_mean    mean of positions <= t (causal; the default)
  token          the position's own state (causal): per-token modulation
  mean_and_token both, side by side (each RMS-normalised): the context and the token itself
  sequence_mean  mean of the whole sequence, as the published code does: position t then
                 depends on tokens after t. Kept only to reproduce that code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TARGETS
from .layers import rms_normalize, rms_norm


class PoolState:
    """Running sum and count of the hidden states seen so far (one per recurrence step), so
    cached decoding can extend a prefix mean one token at a time."""

    __slots__ = ("sum", "count")

    def __init__(self):
        self.sum = None
        self.count = None


def pool(h: torch.Tensor, mode: str, mask: torch.Tensor | None = None, state: PoolState | None = None) -> torch.Tensor:
    """Pooled hidden states [B, T, H] (float32) that each position's Controller reads.

    mask [B, T] (1 = real token) keeps padding out of the means. `state` carries the
    running sum and count from earlier positions (prefix_mean only) and is updated.
    """
    if mode == "token":
        return h.float()
    if mode == "mean_and_token":
        return torch.cat([pool(h, "prefix_mean", mask, state), h.float()], dim=-1)
    if mask is None:  # every position is a real token: no masking pass, counts are 1..T
        hm = h.float()
        m = None
    else:
        m = mask.to(h.device, torch.float32)
        hm = h.float() * m.unsqueeze(-1)
    if mode == "prefix_mean":
        sums = hm.cumsum(dim=1)
        if m is None:
            counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=torch.float32).expand(h.shape[:2])
        else:
            counts = m.cumsum(dim=1)
        if state is not None:
            if state.sum is not None:
                sums = sums + state.sum.unsqueeze(1)
                counts = counts + state.count.unsqueeze(1)
            state.sum, state.count = sums[:, -1].clone(), counts[:, -1].clone()  # not views: the prompt-long sums are freed
        return sums / counts.clamp(min=1.0).unsqueeze(-1)
    if mode == "sequence_mean":
        if state is not None:
            raise ValueError(
                "pooling='sequence_mean' is not causal (every position reads the whole sequence, "
                "future tokens included), so it cannot be decoded incrementally"
            )
        n = torch.full(h.shape[:1], h.shape[1], device=h.device, dtype=torch.float32) if m is None else m.sum(dim=1)
        mean = hm.sum(dim=1) / n.clamp(min=1.0).unsqueeze(-1)
        return mean.unsqueeze(1).expand_as(hm)
    raise ValueError(f"unknown pooling {mode!r}")


class _PrefixMeanRMSNorm(torch.autograd.Function):
    """weight * rms_norm(prefix mean of h) (pooling "prefix_mean" followed by the Controller's
    norm), saving h and the [.., 1] rsqrt for the backward pass instead of the float32 means
    (a fresh [B, T, H] float32 tensor); the backward recomputes them (one cumsum)."""

    @staticmethod
    def means(h, m):
        if m is None:
            counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=torch.float32).expand(h.shape[:2])
            return h.float().cumsum(dim=1), counts.clamp(min=1.0).unsqueeze(-1)
        return (h.float() * m.unsqueeze(-1)).cumsum(dim=1), m.cumsum(dim=1).clamp(min=1.0).unsqueeze(-1)

    @staticmethod
    def forward(ctx, h, m, weight, eps):
        sums, counts = _PrefixMeanRMSNorm.means(h, m)
        n, r = rms_normalize(sums / counts, eps)
        ctx.save_for_backward(h, m, weight, r)
        return weight * n

    @staticmethod
    def backward(ctx, gy):
        h, m, weight, r = ctx.saved_tensors
        sums, counts = _PrefixMeanRMSNorm.means(h, m)
        n = (sums / counts) * r
        gw = (gy * n).sum_to_size(weight.shape) if ctx.needs_input_grad[2] else None
        gh = None
        if ctx.needs_input_grad[0]:
            gn = gy * weight
            gs = r * (gn - n * (gn * n).mean(-1, keepdim=True)) / counts
            gh = gs.flip(1).cumsum(dim=1).flip(1)  # the cumsum's backward: a reversed cumsum
            if m is not None:
                gh = gh * m.unsqueeze(-1)
            gh = gh.to(h.dtype)
        return gh, None, gw, None


class Controller(nn.Module):
    """pooled h [B, T, H], step s  ->  d [B, T, 7, r].

    z = silu(W_in rmsnorm(h));  z = silu(W_mid z + e_s);  d = W_head z  (W_head = 0 at init)
    """

    def __init__(self, hidden_size: int, controller_hidden: int, style_dim: int, rank: int, max_depth: int,
                 pooling: str = "prefix_mean"):
        super().__init__()
        self.rank = rank
        self.views = 2 if pooling == "mean_and_token" else 1  # pooled views side by side, each normalised
        self.norm_weight = nn.Parameter(torch.ones(self.views * hidden_size))
        self.inp = nn.Linear(self.views * hidden_size, controller_hidden)
        self.mid = nn.Linear(controller_hidden, style_dim)
        self.step_embedding = nn.Embedding(max_depth, style_dim)
        self.head = nn.Linear(style_dim, len(TARGETS) * rank)
        nn.init.normal_(self.step_embedding.weight, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, pooled: torch.Tensor, step: int) -> torch.Tensor:
        x = pooled.to(self.norm_weight.dtype)  # in the Controller's own precision
        if self.views == 1:
            return self._mlp(rms_norm(x, self.norm_weight, 1e-6), step)
        parts = zip(x.chunk(self.views, dim=-1), self.norm_weight.chunk(self.views))
        return self._mlp(torch.cat([rms_norm(v, w, 1e-6) for v, w in parts], dim=-1), step)

    def from_hidden(self, h: torch.Tensor, step: int, pooling: str, mask=None, state: PoolState | None = None) -> torch.Tensor:
        """forward(pool(h, pooling, mask, state), step); while training with prefix-mean pooling,
        without keeping the float32 means for the backward pass (`_PrefixMeanRMSNorm`)."""
        w = self.norm_weight
        if pooling == "prefix_mean" and state is None and w.dtype == torch.float32 and torch.is_grad_enabled() \
                and (h.requires_grad or w.requires_grad):
            m = None if mask is None else mask.to(h.device, torch.float32)
            return self._mlp(_PrefixMeanRMSNorm.apply(h, m, w, 1e-6), step)
        return self(pool(h, pooling, mask, state), step)

    def _mlp(self, x: torch.Tensor, step: int) -> torch.Tensor:
        z = F.silu(self.inp(x))
        z = F.silu(self.mid(z) + self.step_embedding.weight[step])
        return self.head(z).unflatten(-1, (len(TARGETS), self.rank))


class StaticModulation(nn.Module):
    """The paper's ablation: one learned r-vector per step and projection, no input."""

    def __init__(self, rank: int, max_depth: int):
        super().__init__()
        self.vectors = nn.Parameter(torch.zeros(max_depth, len(TARGETS), rank))

    def forward(self, step: int) -> torch.Tensor:
        return self.vectors[step]
