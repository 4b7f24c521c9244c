"""Training a halter on top of a trained adapter, everything else frozen (`ouroboros train-halter`).

Each batch runs the model once to `max_depth` steps, reading out every step (`readout_steps`:
each position's loss had the recursion stopped there, and the halter's stop probability there;
the model is frozen, so only the halter's small graph is kept). The halter then learns by
gradient descent on one of the objectives of `halter.py`: the expected loss under its exit
distribution with an entropy term (and a ponder cost per step), or the fit of each step's stop
probability to whether the next step improves the loss. The adapter is saved with the halter.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import save_adapter
from .checkpoints import append_metrics
from .config import MAX_DEPTH
from .data import Corpus
from .halter import Halter, exit_entropy, expected_loss, expected_steps, improvement_loss, token_mean
from .loss import IGNORE, shift_labels
from .settings import setting, to_dict, validate_fields
from .checkpoints import run_lock

OBJECTIVES = ("expected", "improvement")


@dataclass
class HalterConfig:
    steps: int = setting(60, "optimizer steps", low=1, high=10**7)
    batch_size: int = setting(2, "blocks per step", low=1, high=65536)
    lr: float = setting(1e-2, "learning rate (AdamW)", above=0, high=10.0)
    objective: str = setting("expected", "expected: the expected loss under the halter's exit distribution, plus "
                             "ponder_cost per step, minus entropy_weight times the distribution's entropy (Ouro's "
                             "stage 1); improvement: each step's stop probability fit to whether the next step "
                             "improves the loss by more than improvement_margin (Ouro's stage 2, the model frozen)",
                             choices=OBJECTIVES)
    ponder_cost: float = setting(0.005, "loss in nats per token charged for each recurrence step (objective expected)",
                                 low=0, high=100.0)
    entropy_weight: float = setting(0.02, "beta: weight of the exit distribution's entropy, in nats of loss per nat "
                                    "(objective expected); 0 lets every token's exits collapse onto one step",
                                    low=0, high=100.0)
    improvement_margin: float = setting(0.005, "nats of loss the next step must gain for the halter to continue "
                                        "(objective improvement)", low=0, high=100.0)
    improvement_sharpness: float = setting(50.0, "k of the soft target sigmoid(k * (gain - margin)) to continue "
                                           "(objective improvement; Ouro: 50)", above=0, high=1e6)
    max_depth: int = setting(16, "steps the halter chooses among", low=2, high=MAX_DEPTH)
    seed: int = setting(0, "seed of the data order", low=0, high=2**63 - 1)
    progress: bool = setting(True, "show a progress bar", cli=False)

    def __post_init__(self) -> None:
        validate_fields(self)


def attach_halter(model) -> Halter:
    """Give `model` a fresh halter (or keep its own) and make it the only trainable part."""
    for p in model.parameters():
        p.requires_grad_(False)
    rec = model.recurrent
    if rec.halter is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.config.init_seed)
            rec.halter = Halter(model.embed_tokens.weight.shape[1], model.config.max_depth).to(model.device)
        model.config.halter = True
    rec.halter.requires_grad_(True)
    return rec.halter


def step_readouts(model, ids: torch.Tensor, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambdas, step_losses), both [max_depth, B, T], of every step of one batch: the model's halter
    with its graph, the losses without (the model is frozen)."""
    out = model(ids, labels=ids, depth=max_depth, readout_steps=range(1, max_depth + 1))
    if out.step_halts is None:
        raise ValueError("the model has no halter (attach_halter)")
    return out.step_halts, out.step_losses.detach()


def halter_objective(lambdas: torch.Tensor, step_losses: torch.Tensor, weights: torch.Tensor,
                     hc: HalterConfig) -> torch.Tensor:
    if hc.objective == "improvement":
        return improvement_loss(lambdas, step_losses, hc.improvement_margin, hc.improvement_sharpness, weights)
    return expected_loss(lambdas, step_losses, hc.ponder_cost, hc.entropy_weight, weights)


def halter_loss(model, ids: torch.Tensor, hc: HalterConfig) -> tuple[torch.Tensor, dict]:
    """(the objective, {expected_steps, exit_entropy, expected_loss}) on one batch: the exit
    distribution's mean steps per token, its mean entropy (nats) and the expected loss under it."""
    lambdas, step_losses = step_readouts(model, ids, hc.max_depth)
    weights = (shift_labels(ids) != IGNORE).float()  # the last position has no next token
    loss = halter_objective(lambdas, step_losses, weights, hc)
    with torch.no_grad():
        stats = {"expected_steps": float(token_mean(expected_steps(lambdas), weights)),
                 "exit_entropy": float(token_mean(exit_entropy(lambdas), weights)),
                 "expected_loss": float(expected_loss(lambdas, step_losses, weights=weights))}
    return loss, stats


def train_halter(model, corpus: Corpus, run_dir: str | Path, hc: HalterConfig) -> dict:
    """Train a halter for `model` (frozen otherwise) and save the adapter, halter included, to `run_dir`."""
    model.config.check_depth(hc.max_depth, "max_depth")
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        halter = attach_halter(model)
        model.eval()
        optimizer = torch.optim.AdamW(halter.parameters(), lr=hc.lr, weight_decay=0.0)
        sampler, t0, last = corpus.sampler(hc.seed), time.time(), {}
        for step in tqdm(range(hc.steps), desc="training the halter", disable=not hc.progress, unit="step"):
            ids = corpus.train[sampler.batch(step, hc.batch_size)].to(model.device)
            loss, stats = halter_loss(model, ids, hc)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last = {"halter_step": step + 1, "halter_loss": loss.item(), **stats, "elapsed_s": time.time() - t0}
            append_metrics(run_dir, last)
        save_adapter(model, run_dir)
    return {**last, "halter_config": to_dict(hc)}
