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
from .ops import grad_needed, prefix_mean_rms_norm, prefix_sums, rms_norm


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
    m = None if mask is None else mask.to(h.device, torch.float32)  # None: every position is a real token
    if mode == "prefix_mean":
        sums, counts = prefix_sums(h, m)
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
        hm = h.float() if m is None else h.float() * m.unsqueeze(-1)
        n = torch.full(h.shape[:1], h.shape[1], device=h.device, dtype=torch.float32) if m is None else m.sum(dim=1)
        mean = hm.sum(dim=1) / n.clamp(min=1.0).unsqueeze(-1)
        return mean.unsqueeze(1).expand_as(hm)
    raise ValueError(f"unknown pooling {mode!r}")


class Controller(nn.Module):
    """pooled h [B, T, H], step s  ->  d [B, T, 7 k, r] (k: the recurrent block's layers, 7 per layer).

    z = silu(W_in rmsnorm(h));  z = silu(W_mid z + e_s);  d = W_head z  (W_head = 0 at init)
    """

    def __init__(self, hidden_size: int, controller_hidden: int, style_dim: int, rank: int, max_depth: int,
                 pooling: str = "prefix_mean", layers: int = 1):
        super().__init__()
        self.rank = rank
        self.outputs = layers * len(TARGETS)  # one r-vector per projection of every block layer
        self.views = 2 if pooling == "mean_and_token" else 1  # pooled views side by side, each normalised
        self.norm_weight = nn.Parameter(torch.ones(self.views * hidden_size))
        self.inp = nn.Linear(self.views * hidden_size, controller_hidden)
        self.mid = nn.Linear(controller_hidden, style_dim)
        self.step_embedding = nn.Embedding(max_depth, style_dim)
        self.head = nn.Linear(style_dim, self.outputs * rank)
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
        """forward(pool(h, pooling, mask, state), step); while training with prefix-mean pooling (and a
        float32 norm weight), through `ops.prefix_mean_rms_norm`, which does not keep the float32 means for
        the backward pass. (Without a gradient it calls forward itself, so forward hooks see every step.)"""
        w = self.norm_weight
        if pooling == "prefix_mean" and state is None and w.dtype == torch.float32 and grad_needed(h, w):
            m = None if mask is None else mask.to(h.device, torch.float32)
            return self._mlp(prefix_mean_rms_norm(h, m, w, 1e-6), step)
        return self(pool(h, pooling, mask, state), step)

    def _mlp(self, x: torch.Tensor, step: int) -> torch.Tensor:
        z = F.silu(self.inp(x))
        z = F.silu(self.mid(z) + self.step_embedding.weight[step])
        return self.head(z).unflatten(-1, (self.outputs, self.rank))


class StaticModulation(nn.Module):
    """The paper's ablation: one learned r-vector per step and projection (of every block layer), no input."""

    def __init__(self, rank: int, max_depth: int, layers: int = 1):
        super().__init__()
        self.vectors = nn.Parameter(torch.zeros(max_depth, layers * len(TARGETS), rank))

    def forward(self, step: int) -> torch.Tensor:
        return self.vectors[step]
