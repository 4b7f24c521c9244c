"""A trained halter: per token and step, the probability that recurring further is not worth it.

    lambda_s = sigmoid(w . rmsnorm(h_s) + u * log(||h_s - h_(s-1)|| / ||h_(s-1)||) + b_s)

It reads the token's own state after step s and how much that step changed it (causal), has
H + max_depth + 1 parameters, and is trained on top of a trained adapter with everything else
frozen (`halter_training.py`), with an ACT-style objective: the expected loss under the halting
distribution plus `ponder_cost` times the expected number of steps. At inference,
`ExitRule(rule="halter", threshold=t)` stops a token once lambda_s > t.
"""
from __future__ import annotations

import torch
from torch import nn

from .exits import relative_change
from .ops import rms_norm


class Halter(nn.Module):
    def __init__(self, hidden_size: int, max_depth: int, bias: float = -2.0):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.proj = nn.Parameter(torch.zeros(hidden_size))
        self.change = nn.Parameter(torch.zeros(()))
        self.step_bias = nn.Parameter(torch.full((max_depth,), float(bias)))

    def forward(self, h_new: torch.Tensor, h_old: torch.Tensor, step: int) -> torch.Tensor:
        """lambda_s [B, T] (float32) for the states after step `step` (0-based) and before it."""
        x = rms_norm(h_new.float(), self.norm_weight, 1e-6)
        change = relative_change(h_new, h_old).clamp(min=1e-8).log()
        return torch.sigmoid(x @ self.proj + self.change * change + self.step_bias[step])


def halting_distribution(lambdas: torch.Tensor) -> torch.Tensor:
    """p_s = lambda_s * prod_(j<s) (1 - lambda_j) over steps [D, ...]; the last step takes the
    remaining mass, so the probabilities sum to 1."""
    keep = torch.cumprod(1 - lambdas, dim=0)
    before = torch.cat([torch.ones_like(keep[:1]), keep[:-1]], dim=0)
    p = lambdas * before
    return torch.cat([p[:-1], before[-1:]], dim=0)


def ponder_loss(lambdas: torch.Tensor, step_losses: torch.Tensor, ponder_cost: float, weights=None) -> torch.Tensor:
    """E_p[loss_s] + ponder_cost * E_p[s], averaged over tokens. lambdas, step_losses: [D, B, T]."""
    p = halting_distribution(lambdas)
    steps = torch.arange(1, p.shape[0] + 1, device=p.device, dtype=p.dtype).view(-1, *[1] * (p.dim() - 1))
    per_token = (p * (step_losses + ponder_cost * steps)).sum(0)
    if weights is None:
        return per_token.mean()
    return (per_token * weights).sum() / weights.sum()
