"""A trained halter: per token and step, the probability that recurring further is not worth it.

    lambda_s = sigmoid(w . rmsnorm(h_s) + u * log(||h_s - h_(s-1)|| / ||h_(s-1)||) + b_s)

It reads the token's own state after step s and how much that step changed it (causal), has
H + max_depth + 1 parameters, and is trained on top of a trained adapter with everything else
frozen (`halter_training.py`), on each step's loss (`readout.py`). Its exit distribution is

    p(s) = lambda_s * prod_(j<s) (1 - lambda_j)   (the last step takes the remaining mass)

and it trains with one of two objectives (Ouro, arXiv 2510.25741):
- `expected_loss`: E_p[loss_s] + ponder_cost * E_p[s] - entropy_weight * H(p). Without the entropy
  term, training straight for the best step collapses every token's exits onto one step;
- `improvement_loss`: each lambda_s fit (binary cross-entropy) to whether step s + 1 improves the
  token's loss by less than a margin (a soft target, sigmoid(k * (gain - margin)) to continue).
At inference, `ExitRule(rule="halter", threshold=t)` stops a token once 1 - CDF_s = prod_(j<=s)
(1 - lambda_j) < t, that is once the exit distribution's mass up to step s reaches 1 - t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


def exit_entropy(lambdas: torch.Tensor) -> torch.Tensor:
    """H(p) [...] of each token's exit distribution (nats; log D at most for D steps), with a finite
    gradient where a step has no mass."""
    p = halting_distribution(lambdas)
    return -(p * p.clamp(min=1e-12).log()).sum(0)


def expected_steps(lambdas: torch.Tensor) -> torch.Tensor:
    """E_p[s] [...] of each token's exit distribution (steps counted from 1)."""
    p = halting_distribution(lambdas)
    steps = torch.arange(1, p.shape[0] + 1, device=p.device, dtype=p.dtype).view(-1, *[1] * (p.dim() - 1))
    return (p * steps).sum(0)


def token_mean(per_token: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_token.mean() if weights is None else (per_token * weights).sum() / weights.sum()


def expected_loss(lambdas: torch.Tensor, step_losses: torch.Tensor, ponder_cost: float = 0.0,
                  entropy_weight: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """E_p[loss_s] + ponder_cost * E_p[s] - entropy_weight * H(p), averaged over tokens (weighted by
    `weights` [B, T], e.g. 0 where nothing is scored). lambdas, step_losses: [D, B, T]."""
    per_token = (halting_distribution(lambdas) * step_losses).sum(0) + ponder_cost * expected_steps(lambdas)
    if entropy_weight:
        per_token = per_token - entropy_weight * exit_entropy(lambdas)
    return token_mean(per_token, weights)


def improvement_targets(step_losses: torch.Tensor, margin: float, sharpness: float) -> torch.Tensor:
    """[D - 1, B, T]: the probability of stopping after step s that the next step's gain warrants,
    1 - sigmoid(sharpness * (loss_s - loss_(s+1) - margin))."""
    gain = step_losses[:-1] - step_losses[1:]
    return 1 - torch.sigmoid(sharpness * (gain - margin))


def improvement_loss(lambdas: torch.Tensor, step_losses: torch.Tensor, margin: float, sharpness: float,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of lambda_s against `improvement_targets` over steps 1..D-1 (the last step
    always stops), averaged over steps and tokens. lambdas, step_losses: [D, B, T]."""
    target = improvement_targets(step_losses.detach(), margin, sharpness)
    lam = lambdas[:-1].clamp(1e-6, 1 - 1e-6)
    per_token = F.binary_cross_entropy(lam, target, reduction="none").mean(0)
    return token_mean(per_token, weights)
