"""The experiment grid as one command: `ouroboros sweep SPEC.yaml`.

A spec names the base, the layer split, the data, one training budget and the grid. Every run
gets the same data, seed and budget, goes into its own subfolder (adapter, metrics, eval),
and the sweep can be rerun at any time: finished runs are skipped, an interrupted one resumes
from its last checkpoint. The full model and the pruned baseline are evaluated once, on the
same blocks as every run. `report.py` turns the folder into tables and plots.

Spec (YAML):
    name: smollm2-sotu-cpu
    base: smollm2-135m
    split: {n_prelude: 7, recurrent_layer: 15, n_coda: 7}
    data: {train: ["{cache}/sotu/1*.txt"], heldout: ["{cache}/sotu/202*.txt"], seq_len: 128}
    train: {steps: 150, batch_size: 4, lr: 1.0e-3, warmup_steps: 15}
    eval: {depths: [1, 4, 8, 16], blocks: 16, modulation_inputs: 6}
    defaults: {variant: controller, gate: true, pooling: prefix_mean, rank: 32, depths: [2, 4, 8]}
    grid: {variant: [controller, static], gate: [true, false]}     # cartesian product, and/or
    runs: [{variant: none}, {rank: 8}]                               # explicit extra runs
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .config import OuroborosConfig

GRID_KEYS = {"variant", "gate", "pooling", "rank", "depths", "lr", "step_norm", "alpha", "gate_bias"}
RESULT = "result.json"
REFERENCE = "reference.json"


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

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep spec not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping (name, base, split, data, train, eval, defaults, grid, runs)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        for req in ("name", "base", "split", "data"):
            if req not in raw:
                raise ValueError(f"{path}: missing required key {req!r}")
        spec = cls(**raw)
        spec.validate(path)
        return spec

    def validate(self, path) -> None:
        for key in list(self.grid) + [k for r in self.runs for k in r] + list(self.defaults):
            if key not in GRID_KEYS:
                raise ValueError(f"{path}: {key!r} cannot vary in a sweep; allowed: {', '.join(sorted(GRID_KEYS))}")
        for k, v in self.grid.items():
            if not isinstance(v, list) or not v:
                raise ValueError(f"{path}: grid.{k} must be a non-empty list")
        if "train" not in self.data:
            raise ValueError(f"{path}: data.train must list the training sources")
        for run in self.expand():  # every run's configuration must be valid before anything starts
            run.model_config(self)

    def expand(self) -> list["Run"]:
        keys = list(self.grid)
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(self.grid[k] for k in keys))] if keys else []
        seen, out = set(), []
        for overrides in combos + [dict(r) for r in self.runs]:
            run = Run({**self.defaults, **overrides})
            if run.name not in seen:
                seen.add(run.name)
                out.append(run)
        if not out:
            raise ValueError("the sweep has no runs: give a grid or a runs list")
        return out

    def sources(self, key: str) -> list[str] | None:
        vals = self.data.get(key)
        if vals is None:
            return None
        from .loading import cache_dir

        return [os.path.expanduser(str(v).replace("{cache}", str(cache_dir()))) for v in vals]


@dataclass
class Run:
    settings: dict

    def get(self, key, default=None):
        return self.settings.get(key, default)

    @property
    def name(self) -> str:
        s = self.settings
        parts = [s.get("variant", "controller"), "gate" if s.get("gate", True) else "nogate", s.get("pooling", "prefix_mean"),
                 f"r{s.get('rank', 32)}", "d" + "_".join(str(d) for d in s.get("depths", (4, 8, 16)))]
        if "lr" in s:
            parts.append(f"lr{s['lr']:g}")
        if s.get("step_norm", True) is False:
            parts.append("nonorm")
        return "-".join(str(p) for p in parts)

    def model_config(self, spec: SweepSpec) -> OuroborosConfig:
        kw = {k: v for k, v in self.settings.items() if k != "lr"}
        if "depths" in kw:
            kw["depths"] = tuple(kw["depths"])
        return OuroborosConfig(**spec.split, **kw, seed=spec.seed)


@torch.no_grad()
def capture_modulation(model, blocks: torch.Tensor, depth: int) -> dict | None:
    """The Controller's modulation vectors on some held-out inputs: per input and step, d
    averaged over positions -> [inputs, steps, targets, rank]."""
    ctrl = model.recurrent.controller
    if ctrl is None:
        return None
    seen: list[torch.Tensor] = []
    handle = ctrl.register_forward_hook(lambda mod, args, out: seen.append(out.mean(dim=1).float().cpu()))
    try:
        model.eval()
        model(blocks.to(model.device), depth=depth)
    finally:
        handle.remove()
    d = torch.stack(seen, dim=1)  # [inputs, steps, 7, r]
    return {"depth": depth, "d": d}


def run_sweep(spec_path: str | Path, out: str | Path | None = None, only: list[str] | None = None, progress: bool = True) -> Path:
    from .data import build_corpus
    from .evaluate import evaluate
    from .loading import load_base_model, load_tokenizer
    from .model import OuroborosModel
    from .report import write_report
    from .train import TrainConfig, list_checkpoints, train

    spec = SweepSpec.load(spec_path)
    runs = spec.expand()
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise ValueError(f"--only: no run named {', '.join(unknown)}; runs are {', '.join(r.name for r in runs)}")
        runs = [r for r in runs if r.name in only]
    out = Path(out or Path("runs") / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(Path(spec_path).read_text())
    seq_len = int(spec.data.get("seq_len", 2048 if torch.cuda.is_available() else 256))
    tok = load_tokenizer(spec.base)
    corpus = build_corpus(spec.sources("train"), tok, seq_len, heldout=spec.sources("heldout"),
                          heldout_fraction=float(spec.data.get("heldout_fraction", 0.1)), seed=spec.seed,
                          text_field=spec.data.get("text_field", "text"))
    print(f"sweep {spec.name}: {len(runs)} runs into {out}; {corpus.describe()}")
    ev = {"depths": [1, 4, 8, 16], "blocks": 16, "batch_size": 4, "modulation_inputs": 6, **spec.eval}
    splits = corpus.eval_splits(min(ev["blocks"], corpus.train.shape[0], corpus.heldout.shape[0]), spec.seed + 1)

    ref_path = out / REFERENCE
    if not ref_path.is_file():  # full model and pruned baseline: once, on the same blocks as every run
        model = OuroborosModel.from_base(load_base_model(spec.base), runs[0].model_config(spec).replace(variant="none"))
        rep = evaluate(model, splits, depths=(), full_model=load_base_model(spec.base), batch_size=ev["batch_size"], progress=progress)
        ref = {split: {r.model: r.loss for r in rows} for split, rows in rep.splits.items()}
        ref["tokens"] = rep.tokens
        ref_path.write_text(json.dumps(ref, indent=2) + "\n")
        del model
    reference = json.loads(ref_path.read_text())

    for i, run in enumerate(runs, 1):
        rdir = out / "runs" / run.name
        if (rdir / RESULT).is_file():
            print(f"[{i}/{len(runs)}] {run.name}: done, skipped")
            continue
        resume = bool(list_checkpoints(rdir))
        print(f"[{i}/{len(runs)}] {run.name}: {'resuming' if resume else 'training'}")
        cfg = run.model_config(spec)
        if resume:
            model = OuroborosModel.load_adapter(rdir, base=load_base_model(spec.base))
        else:
            model = OuroborosModel.from_base(load_base_model(spec.base), cfg)
            model.save_adapter(rdir)
        tc = TrainConfig(**{"seed": spec.seed, "progress": progress, **spec.train, **({"lr": run.get("lr")} if "lr" in run.settings else {})})
        summary = train(model, corpus, rdir, tc, resume=resume)
        known = {split: {k: reference[split][k] for k in ("full", "baseline")} for split in splits}
        rep = evaluate(model, splits, depths=tuple(d for d in ev["depths"] if d <= cfg.max_steps), batch_size=ev["batch_size"],
                       progress=progress, known=known)
        mod = capture_modulation(model, corpus.heldout[: ev["modulation_inputs"]], max(cfg.depths))
        if mod is not None:
            torch.save(mod, rdir / "modulation.pt")
        result = {
            "name": run.name, "settings": run.settings, "config": cfg.to_dict(),
            "trainable_parameters": model.num_trainable_parameters(), "wall_s": summary["wall_s"],
            "steps": summary["steps_done"], "seq_len": seq_len, "batch_size": tc.batch_size,
            "losses": {split: {r.model: r.loss for r in rows} for split, rows in rep.splits.items()},
            "reference": reference,
        }
        rep.write(rdir)
        (rdir / RESULT).write_text(json.dumps(result, indent=2) + "\n")  # written last: marks the run finished
    write_report(out)
    return out
