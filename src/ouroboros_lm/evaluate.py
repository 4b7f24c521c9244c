"""Next-token loss of the full base model, the pruned baseline and Ouroboros at several
depths, on the same tokens, for the training distribution and the held-out split.

`EvalConfig` is how an evaluation runs, declared once for `ouroboros eval`, a sweep spec's
`eval:` section and the demo's."""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_text, ensure_dir
from .config import MAX_DEPTH
from .exits import ExitRule
from .generate import check_exit_rule
from .families import OWN_HEAD_TYPES
from .loss import causal_lm_loss, head_token_losses, scored_tokens
from .settings import setting, validate_fields

DEFAULT_EVAL_DEPTHS = (1, 4, 8, 16)


@dataclass
class EvalConfig:
    """How an evaluation runs. `sweep=False` fields are the command line's alone (a sweep spec
    evaluates every run the same way: the full model once, its own seed, each run's own damping)."""

    depths: tuple[int, ...] = setting(DEFAULT_EVAL_DEPTHS, "Ouroboros depths to evaluate", low=1, high=MAX_DEPTH)
    exit_thresholds: tuple[float, ...] | None = setting(None, "also evaluate adaptive exit (--exit-rule) at each "
                                                        "threshold, up to --exit-max-depth steps", above=0,
                                                        metavar="T[,T...]")
    exit_max_depth: int | None = setting(None, "most steps under adaptive exit (default: the largest of --depths; "
                                         "at most the adapter's max_depth)", low=1)
    blocks: int = setting(32, "blocks evaluated per split", low=1, high=1 << 20)
    batch_size: int = setting(4, "blocks per forward pass", low=1, high=65536)
    step_damping: float | None = setting(None, "override the adapter's step_damping (updates past trained_depth "
                                         "scaled geometrically; default: the adapter's)", low=0.0, high=1.0,
                                         sweep=False)
    full: bool = setting(True, "evaluate the full base model too (--no-full: skip its row)", sweep=False)
    seed: int = setting(0, "seed choosing the training-distribution blocks", low=0, high=2**63 - 1, flag="--eval-seed",
                        sweep=False)

    def __post_init__(self) -> None:
        validate_fields(self)

    @property
    def top(self) -> int:
        """The most steps adaptive exit may take."""
        return self.exit_max_depth or max(self.depths)

    def check(self, cfg, rule: ExitRule | None = None) -> None:
        """Refuse, before anything is loaded, depths the model `cfg` cannot run and an exit rule it cannot follow."""
        for d in self.depths:
            cfg.check_depth(d, "--depths")
        twice = sorted({d for d in self.depths if self.depths.count(d) > 1})
        if twice:
            raise ValueError(f"--depths lists depth {twice[0]} more than once (each depth is one row)")
        if self.exit_thresholds:
            check_exit_rule(cfg, rule or ExitRule(), cfg.check_depth(self.top, "--exit-max-depth"))

    def exit_rules(self, rule: ExitRule | None = None) -> list[tuple[ExitRule, int]]:
        """(rule at each threshold, the most steps): the adaptive rows (`rule` gives the rule and its minimum)."""
        rule = rule or ExitRule()
        return [(ExitRule(rule.rule, t, rule.min_steps), self.top) for t in self.exit_thresholds or ()]



def gap_recovered(loss: float, baseline: float, full: float) -> float | None:
    """Share (in %) of the pruned baseline's loss gap to the full model that `loss` closes;
    None when the two references coincide."""
    if abs(baseline - full) <= 1e-12:
        return None
    return 100.0 * (baseline - loss) / (baseline - full)


def reduction_vs_baseline(loss: float, baseline: float) -> float:
    return 100.0 * (baseline - loss) / baseline


@torch.no_grad()
def mean_loss(loss_sum, blocks: torch.Tensor, batch_size: int, device, desc: str | None = None,
              progress: bool = True) -> float:
    """Token-weighted mean next-token loss over blocks; `loss_sum(input_ids)` is the sum of a batch's next-token
    losses (`model_loss`, `hf_loss`: from chunks of the vocabulary, never the [batch, seq, vocab] float32 logits)."""
    total, count = 0.0, 0
    batches = range(0, blocks.shape[0], batch_size)
    for i in tqdm(batches, desc=desc, leave=False, disable=not progress or desc is None):
        ids = blocks[i : i + batch_size].to(device)
        total += float(loss_sum(ids))
        count += scored_tokens(ids)
    return total / count


def model_loss(model, **run):
    """`loss_sum` of an OuroborosModel run so (depth, baseline, exit_rule): its loss, chunked over the vocabulary
    (`model.head`), times the positions it scores."""
    return lambda ids: model(ids, labels=ids, **run).loss.double() * scored_tokens(ids)


def hf_loss(full_model):
    """`loss_sum` of a Hugging Face causal LM: its final hidden states through its LM head chunk by chunk
    (`loss.head_token_losses`); the plain form for heads that scale or soft-cap their logits."""
    device = next(full_model.parameters()).device
    head = getattr(full_model, "lm_head", None)
    plain = full_model.config.model_type not in OWN_HEAD_TYPES and head is not None and hasattr(full_model, "model")

    def loss_sum(ids):
        ids = ids.to(device)
        if not plain:
            return causal_lm_loss(full_model(ids, use_cache=False).logits, ids, reduction="sum")
        hidden = full_model.model(ids, use_cache=False).last_hidden_state
        return head_token_losses(hidden, head, ids).double().sum()

    return loss_sum


@dataclass
class EvalRow:
    model: str
    loss: float
    depth: int | None = None  # the fixed depth, or the maximum under an exit rule
    steps: float | None = None  # mean recurrence steps per token (compute), None for full / baseline
    layers: float | None = None  # mean decoder-layer passes per token (prelude + steps + coda, or the stack's)
    trainable: int | None = None  # the model's trained weights (None: the frozen references)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


@dataclass
class EvalReport:
    """Per split (e.g. "train", "heldout"): rows for full, baseline and each depth."""

    splits: dict[str, list[EvalRow]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def row(self, split: str, model: str) -> EvalRow | None:
        return next((r for r in self.splits[split] if r.model == model), None)

    def curve(self, split: str) -> list[EvalRow]:
        """The Ouroboros rows of a split: loss against mean recurrence steps per token."""
        return [r for r in self.splits[split] if r.steps is not None]

    def derived(self, split: str, row: EvalRow) -> tuple[float | None, float | None]:
        """(loss reduction vs pruned baseline in %, gap recovered in %)."""
        base, full = self.row(split, "baseline"), self.row(split, "full")
        if base is None or row.model in ("baseline",):
            return None, None
        gap = gap_recovered(row.loss, base.loss, full.loss) if full is not None and row.model != "full" else None
        return reduction_vs_baseline(row.loss, base.loss), gap

    def to_dict(self) -> dict:
        out = {"meta": self.meta, "tokens": self.tokens, "splits": {}}
        for split, rows in self.splits.items():
            out["splits"][split] = []
            for r in rows:
                red, gap = self.derived(split, r)
                out["splits"][split].append(
                    {"model": r.model, "depth": r.depth, "mean_steps": r.steps, "layer_passes": r.layers,
                     "trainable": r.trainable, "loss": r.loss, "perplexity": r.perplexity,
                     "reduction_vs_baseline_pct": red, "gap_recovered_pct": gap}
                )
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "EvalReport":
        """The inverse of `to_dict` (derived columns are recomputed, not read)."""
        splits = {split: [EvalRow(r["model"], r["loss"], r.get("depth"), r.get("mean_steps"), r.get("layer_passes"),
                                  r.get("trainable")) for r in rows]
                  for split, rows in d.get("splits", {}).items()}
        return cls(splits=splits, tokens=dict(d.get("tokens", {})), meta=dict(d.get("meta", {})))

    def table(self, markdown: bool = False) -> str:
        head = ["split", "model", "steps/token", "layers/token", "trained weights", "loss", "ppl", "vs baseline",
                "gap recovered"]
        lines = []
        for split, rows in self.splits.items():
            for r in rows:
                red, gap = self.derived(split, r)
                lines.append([
                    f"{split} ({self.tokens.get(split, 0):,} tok)", r.model, "" if r.steps is None else f"{r.steps:.2f}",
                    "" if r.layers is None else f"{r.layers:g}" if r.steps is None else f"{r.layers:.2f}",
                    "" if r.trainable is None else f"{r.trainable:,}",
                    f"{r.loss:.4f}", f"{r.perplexity:.1f}",
                    "" if red is None else f"{red:+.2f}%", "" if gap is None else f"{gap:+.1f}%",
                ])
        if markdown:
            out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(l) + " |" for l in lines]
            return "\n".join(out)
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])

    def write(self, directory: str | Path, stem: str = "eval") -> tuple[Path, Path]:
        directory = ensure_dir(directory)  # never a link
        j, m = directory / f"{stem}.json", directory / f"{stem}.md"
        atomic_write_text(j, json.dumps(self.to_dict(), indent=2) + "\n")  # replaces a link, never writes through it
        atomic_write_text(m, self.table(markdown=True) + "\n")
        return j, m


def exit_name(rule: ExitRule, max_depth: int) -> str:
    """The row of a rule: a token stops once the rule's score falls below the threshold (`exits`)."""
    return f"ouroboros@auto({rule.rule}<{rule.threshold:g},max{max_depth})"


def ouroboros_job(model, depth: int, rule: ExitRule | None = None):
    """(loss_sum for mean_loss, its list of (steps summed, positions) per batch)."""
    seen: list[tuple[float, int]] = []

    def loss_sum(ids):
        out = model(ids, labels=ids, depth=depth, exit_rule=rule)
        steps = out.steps if out.steps is not None else torch.full(ids.shape, depth)
        seen.append((float(steps.float().sum()), steps.numel()))
        return out.loss.double() * scored_tokens(ids)

    return loss_sum, seen


def evaluate(model, splits: dict[str, torch.Tensor], depths=DEFAULT_EVAL_DEPTHS, full_model=None,
             batch_size: int = 4, progress: bool = True, meta: dict | None = None,
             known: dict[str, dict[str, float]] | None = None, runtime=None,
             exit_rules: list[tuple[ExitRule, int]] = ()) -> EvalReport:
    """Evaluate every row on exactly the same blocks of each split (under `runtime`'s autocast):
    the full model, the pruned baseline, Ouroboros at each fixed depth and under each
    (exit rule, maximum depth); Ouroboros rows carry their mean recurrence steps per token.

    known: losses already measured on these very blocks ({split: {"full": .., "baseline": ..}}),
    reused instead of recomputed (a sweep evaluates the references once for all runs)."""
    was_training = model.training
    model.eval()
    report = EvalReport(meta=dict(meta or {}))
    jobs = []
    if full_model is not None:
        jobs.append(("full", None, hf_loss(full_model)))
        report.meta.setdefault("full_layers", full_model.config.num_hidden_layers)
    if not known:
        jobs.append(("baseline", None, model_loss(model, baseline=True)))
    if model.config.heal_layers:  # no recursion: the healed stack is one row, whatever the depths
        jobs.append(("heal", None, model_loss(model)))
    else:
        jobs += [(f"ouroboros@{d}", d, (d, None)) for d in depths]
        jobs += [(exit_name(rule, d), d, (d, rule)) for rule, d in exit_rules]
    bar = tqdm(total=len(splits) * len(jobs), desc="evaluating", disable=not progress)
    for split, blocks in splits.items():
        report.splits[split] = [describe_row(EvalRow(name, loss), model, measured=False)
                                for name, loss in (known or {}).get(split, {}).items()]
        report.tokens[split] = int(blocks[:, 1:].numel())
        for name, depth, job in jobs:
            bar.set_postfix_str(f"{split}: {name}")
            row = run_row(model, name, depth, job, blocks, batch_size, runtime)
            report.splits[split].append(describe_row(row, model))
            bar.update(1)
    bar.close()
    model.train(was_training)
    return report


def describe_row(row: EvalRow, model, measured: bool = True) -> EvalRow:
    """Fill in a row's layer passes per token and, for a trained model's row, its trained weights. A
    baseline passed in as `known` is the pruned stack of the split (prelude + the recurrent layer once +
    coda), what sweeps and the demo share; one measured here is `model`'s own unadapted stack: the same
    for a recursion (block or not), a heal model's middle layers for a heal model."""
    cfg = model.config
    if row.model == "full":
        row.layers = model.base_config.num_hidden_layers  # the full model's config, kept from before the surgery
    elif row.model == "baseline":
        row.layers = (cfg if measured else cfg.pruned_stack()).layer_passes(None)
    else:
        row.layers = cfg.layer_passes(row.steps)  # mean steps under adaptive exit; a heal model: its stack
        row.trainable = model.trainable_parameter_breakdown()["total"]
    return row


def run_row(model, name: str, depth, job, blocks, batch_size: int, runtime) -> EvalRow:
    if callable(job):  # a reference row (a loss_sum): no recursion, no steps
        forward, seen = job, None
    else:
        forward, seen = ouroboros_job(model, *job)
    with runtime.autocast() if runtime is not None else contextlib.nullcontext():
        loss = mean_loss(forward, blocks, batch_size, model.device)
    steps = sum(s for s, _ in seen) / sum(n for _, n in seen) if seen else None
    return EvalRow(name, loss, depth, steps)
