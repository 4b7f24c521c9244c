"""Exit rules compared at equal compute (`ouroboros eval-exits`).

For each rule, a sweep of thresholds (log-spaced over the rule's usual range, `exits.THRESHOLD_RANGES`,
then bisected between the two thresholds that bracket each target) measures the held-out loss and
the steps each token took; each rule's loss is then read at the same mean steps per token (linear
between the two sweep points around it), beside the fixed depths at those means. Every point keeps
its histogram of steps per token: a rule that stops every token at the same step is a fixed depth
in disguise, one that measures difficulty spreads them.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import ensure_dir, write_text, write_with
from .config import MAX_DEPTH
from .exits import RULES, THRESHOLD_RANGES, ExitRule
from .loss import scored_tokens
from .settings import setting, validate_fields


@dataclass
class ExitEvalConfig:
    rules: tuple[str, ...] = setting(("converged", "acceleration", "kl", "entropy"),
                                     f"exit rules compared, of {', '.join(RULES)} (halter: an adapter with a trained "
                                     "halter, `ouroboros train-halter`)", flag="--exit-rules")
    max_depth: int = setting(16, "the most steps a rule may take", low=1, high=MAX_DEPTH, flag="--exit-max-depth")
    depths: tuple[int, ...] = setting((1, 2, 3, 4, 5, 6, 7, 8), "fixed depths measured beside the rules", low=1,
                                      high=MAX_DEPTH)
    targets: tuple[float, ...] = setting((2.0, 3.0, 4.0, 6.0, 8.0), "mean steps per token at which the rules are "
                                         "compared", above=0, high=MAX_DEPTH)
    points: int = setting(8, "thresholds per rule in the first sweep", low=2, high=1000)
    refine: int = setting(2, "rounds of bisection (in log threshold) towards each target", low=0, high=50)
    min_steps: int = setting(1, "steps every token takes before it may stop", low=1, high=MAX_DEPTH,
                             flag="--exit-min-steps")
    blocks: int = setting(32, "blocks evaluated", low=1, high=10**7)
    batch_size: int = setting(4, "blocks per forward pass", low=1, high=65536)
    split: str = setting("heldout", "the split evaluated", choices=("heldout", "train"))
    eval_seed: int = setting(0, "seed choosing the training-distribution blocks", low=0, high=2**63 - 1)

    def __post_init__(self) -> None:
        validate_fields(self)
        bad = [r for r in self.rules if r not in RULES]
        if bad:
            raise ValueError(f"rules must be among {', '.join(RULES)}; got {', '.join(bad)}")
        if max(self.depths) > self.max_depth or self.min_steps > self.max_depth:
            raise ValueError(f"depths and min_steps must be at most max_depth={self.max_depth}")

    def check_model(self, config) -> None:
        """Refuse, before any work, what the adapter's model cannot run."""
        config.check_depth(self.max_depth, "max_depth")
        if "halter" in self.rules and not config.halter:
            raise ValueError("exit rule halter needs an adapter with a trained halter (run `ouroboros train-halter` first)")


@dataclass
class Point:
    """One measurement: a rule at a threshold (rule "fixed": a fixed depth), its loss and the number
    of tokens that took each number of steps (hist[s])."""

    rule: str
    threshold: float | None
    loss: float
    hist: list[int]

    @property
    def mean_steps(self) -> float:
        return sum(s * n for s, n in enumerate(self.hist)) / max(sum(self.hist), 1)

    def quantile(self, q: float) -> int:
        total, seen = sum(self.hist), 0
        for s, n in enumerate(self.hist):
            seen += n
            if seen >= q * total:
                return s
        return len(self.hist) - 1

    @property
    def modal_share(self) -> float:
        """The share of tokens at the most common step (1: every token stops at the same step)."""
        return max(self.hist) / max(sum(self.hist), 1)

    def to_dict(self) -> dict:
        return {"rule": self.rule, "threshold": self.threshold, "loss": self.loss, "mean_steps": self.mean_steps,
                "steps_histogram": self.hist}


@torch.no_grad()
def measure(model, blocks: torch.Tensor, batch_size: int, depth: int, rule: ExitRule | None = None,
            runtime=None) -> Point:
    """Token-weighted loss over `blocks` at `depth` (the maximum under `rule`), and the steps histogram
    over every position."""
    total, count, hist = 0.0, 0, torch.zeros(depth + 1, dtype=torch.long)
    amp = runtime.autocast() if runtime is not None else contextlib.nullcontext()
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size].to(model.device)
        with amp:
            out = model(ids, labels=ids, depth=depth, exit_rule=rule)
        n = scored_tokens(ids)
        total, count = total + out.loss.item() * n, count + n
        steps = out.steps if out.steps is not None else torch.full_like(ids, depth)
        hist += torch.bincount(steps.flatten().cpu(), minlength=depth + 1)
    return Point(rule.rule if rule else "fixed", rule.threshold if rule else None, total / count, hist.tolist())


def bracket(points: list[Point], target: float) -> tuple[Point, Point] | None:
    """The two points adjacent in threshold whose mean steps lie on either side of `target` (the
    closest such pair), or None."""
    ordered = sorted(points, key=lambda p: p.threshold if p.threshold is not None else p.mean_steps)
    pairs = [(a, b) for a, b in zip(ordered, ordered[1:]) if (a.mean_steps - target) * (b.mean_steps - target) <= 0]
    return min(pairs, key=lambda ab: abs(ab[0].mean_steps - ab[1].mean_steps)) if pairs else None


def loss_at(points: list[Point], target: float) -> float | None:
    """The loss at `target` mean steps, linear between the two points around it (None: not reached)."""
    pair = bracket(points, target)
    if pair is None:
        return None
    a, b = pair
    if abs(b.mean_steps - a.mean_steps) < 1e-9:
        return (a.loss + b.loss) / 2
    w = (target - a.mean_steps) / (b.mean_steps - a.mean_steps)
    return a.loss + w * (b.loss - a.loss)


def sweep_rule(name: str, cfg: ExitEvalConfig, run) -> list[Point]:
    """A rule's sweep: `cfg.points` thresholds over its range, then `cfg.refine` rounds of bisection
    towards each target. run(threshold) -> Point."""
    lo, hi = THRESHOLD_RANGES[name]
    points = [run(lo * (hi / lo) ** (i / (cfg.points - 1))) for i in range(cfg.points)]
    for _ in range(cfg.refine):
        todo = set()
        for target in cfg.targets:
            pair = bracket(points, target)
            if pair is not None and abs(pair[0].mean_steps - pair[1].mean_steps) > 0.05:
                todo.add((pair[0].threshold * pair[1].threshold) ** 0.5)
        points += [run(t) for t in sorted(todo - {p.threshold for p in points})]
    return sorted(points, key=lambda p: p.threshold)


@dataclass
class ExitComparison:
    """Every rule's sweep and the fixed depths, on the same blocks."""

    max_depth: int
    targets: tuple[float, ...]
    tokens: int
    fixed: list[Point]
    rules: dict[str, list[Point]] = field(default_factory=dict)

    def at(self, target: float) -> dict[str, float | None]:
        """Each row's loss at `target` mean steps: "fixed depth" and every rule."""
        return {"fixed depth": loss_at(self.fixed, target), **{r: loss_at(p, target) for r, p in self.rules.items()}}

    def reference_point(self, points: list[Point]) -> Point:
        """The point whose mean steps are closest to the middle target (what the histogram shows)."""
        middle = sorted(self.targets)[len(self.targets) // 2]
        return min(points, key=lambda p: abs(p.mean_steps - middle))

    def equal_steps_table(self) -> list[list[str]]:
        rows = [["loss at mean steps/token"] + [f"{t:g}" for t in self.targets]]
        cells = {t: self.at(t) for t in self.targets}
        for name in ["fixed depth", *self.rules]:
            row = [name]
            for t in self.targets:
                loss, fixed = cells[t][name], cells[t]["fixed depth"]
                delta = f" ({loss - fixed:+.4f})" if loss is not None and fixed is not None and name != "fixed depth" else ""
                row.append("—" if loss is None else f"{loss:.4f}{delta}")
            rows.append(row)
        return rows

    def sweep_table(self) -> list[list[str]]:
        rows = [["rule", "threshold", "mean steps", "loss", "steps p10 / p50 / p90", "tokens at the modal step"]]
        for name, points in [("fixed", self.fixed), *self.rules.items()]:
            for p in points:
                rows.append([name, "" if p.threshold is None else f"{p.threshold:.3g}", f"{p.mean_steps:.2f}",
                             f"{p.loss:.4f}", f"{p.quantile(0.1)} / {p.quantile(0.5)} / {p.quantile(0.9)}",
                             f"{100 * p.modal_share:.0f}%"])
        return rows

    def table(self, markdown: bool = False) -> str:
        head = (f"Exit rules at equal mean steps per token (at most {self.max_depth} steps, {self.tokens:,} tokens; "
                "in brackets: against the fixed depth at the same mean)")
        return "\n\n".join([head, render(self.equal_steps_table(), markdown), render(self.sweep_table(), markdown)])

    def to_dict(self) -> dict:
        return {"max_depth": self.max_depth, "targets": list(self.targets), "tokens": self.tokens,
                "at_equal_steps": {f"{t:g}": self.at(t) for t in self.targets},
                "fixed": [p.to_dict() for p in self.fixed],
                "rules": {r: [p.to_dict() for p in pts] for r, pts in self.rules.items()}}

    def write(self, directory: str | Path) -> list[Path]:
        """exits.json, exits.md, exits_compute.png (loss against mean steps) and exits_steps.png (the
        steps histogram of each rule near the middle target) in `directory`."""
        d = ensure_dir(directory)
        out = [write_text(d / "exits.json", json.dumps(self.to_dict(), indent=2) + "\n"),
               write_text(d / "exits.md", self.table(markdown=True) + "\n")]
        return out + plot_comparison(self, d)


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def plot_comparison(cmp: ExitComparison, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, points) in enumerate([("fixed depth", cmp.fixed), *cmp.rules.items()]):
        ordered = sorted(points, key=lambda p: p.mean_steps)
        ax.plot([p.mean_steps for p in ordered], [p.loss for p in ordered], "o-" if i else "s--", ms=3,
                color=f"C{i}", label=name)
    ax.set_xlabel("mean recurrence steps per token")
    ax.set_ylabel("loss")
    ax.set_title("Exit rules against fixed depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [write_with(directory / "exits_compute.png", lambda f: fig.savefig(f, format="png", dpi=120))]
    plt.close(fig)
    fig, axes = plt.subplots(len(cmp.rules), 1, figsize=(7, 1.8 * len(cmp.rules) + 0.6), sharex=True, squeeze=False)
    for ax, (name, points) in zip(axes[:, 0], cmp.rules.items()):
        p = cmp.reference_point(points)
        total = max(sum(p.hist), 1)
        ax.bar(range(len(p.hist)), [n / total for n in p.hist], color="C1")
        ax.set_title(f"{name} < {p.threshold:.3g}: {p.mean_steps:.2f} steps/token, loss {p.loss:.4f}", fontsize=8)
        ax.set_ylabel("tokens")
    axes[-1, 0].set_xlabel("steps before exit")
    fig.tight_layout()
    paths.append(write_with(directory / "exits_steps.png", lambda f: fig.savefig(f, format="png", dpi=120)))
    plt.close(fig)
    return paths


def compare_exits(model, blocks: torch.Tensor, cfg: ExitEvalConfig, runtime=None, progress: bool = True) -> ExitComparison:
    """Each fixed depth of `cfg.depths` and each rule's sweep on the same `blocks` (the model in eval mode)."""
    cfg.check_model(model.config)
    was_training = model.training
    model.eval()
    bar = tqdm(desc="exit rules", disable=not progress, unit="pass")

    def run(depth: int, rule: ExitRule | None = None) -> Point:
        bar.set_postfix_str(f"{rule.rule} < {rule.threshold:.3g}" if rule else f"depth {depth}")
        point = measure(model, blocks, cfg.batch_size, depth, rule, runtime)
        bar.update(1)
        return point

    try:
        cmp = ExitComparison(cfg.max_depth, cfg.targets, int(blocks[:, 1:].numel()), [run(d) for d in cfg.depths])
        for name in cfg.rules:
            cmp.rules[name] = sweep_rule(name, cfg, lambda t: run(cfg.max_depth, ExitRule(name, t, cfg.min_steps)))
    finally:
        bar.close()
        model.train(was_training)
    return cmp
