"""Training a halter on top of a trained adapter, everything else frozen (`ouroboros train-halter`).

Each batch runs the model once to `max_depth` steps, keeping every step's state and every
position's loss had the recursion stopped there (no gradients: the model is frozen). The halter
then learns, by gradient descent on the ACT-style objective of `halter.ponder_loss`, where
stopping costs less than `ponder_cost` nats per extra step. The adapter is saved with the halter.
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
from .halter import Halter, halting_distribution, ponder_loss
from .settings import setting, to_dict, validate_fields
from .train import run_lock


@dataclass
class HalterConfig:
    steps: int = setting(60, "optimizer steps", low=1, high=10**7)
    batch_size: int = setting(2, "blocks per step", low=1, high=65536)
    lr: float = setting(1e-2, "learning rate (AdamW)", above=0, high=10.0)
    ponder_cost: float = setting(0.005, "loss in nats per token charged for each recurrence step", low=0, high=100.0)
    max_depth: int = setting(16, "steps the halter chooses among", low=1, high=MAX_DEPTH)
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


def halter_loss(model, halter: Halter, ids: torch.Tensor, hc: HalterConfig) -> tuple[torch.Tensor, float]:
    """(the objective, the expected steps per token) on one batch."""
    with torch.no_grad():
        out = model(ids, labels=ids, depth=hc.max_depth, per_step=True)
    lambdas = torch.stack([halter(out.states[s + 1], out.states[s], s) for s in range(hc.max_depth)])
    weights = torch.ones_like(ids, dtype=torch.float32)
    weights[:, -1] = 0  # the last position has no next token
    loss = ponder_loss(lambdas, out.step_losses, hc.ponder_cost, weights)
    with torch.no_grad():
        p = halting_distribution(lambdas)
        steps = torch.arange(1, hc.max_depth + 1, device=ids.device).view(-1, 1, 1)
        expected = float(((p * steps).sum(0) * weights).sum() / weights.sum())
    return loss, expected


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
            loss, expected = halter_loss(model, halter, ids, hc)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last = {"halter_step": step + 1, "halter_loss": loss.item(), "expected_steps": expected,
                    "elapsed_s": time.time() - t0}
            append_metrics(run_dir, last)
        save_adapter(model, run_dir)
    return {**last, "halter_config": to_dict(hc)}
