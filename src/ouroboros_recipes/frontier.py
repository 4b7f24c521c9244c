"""The compression frontier as one command: `ouroboros frontier --base M --data D --keep 10,12,15,18,21,24 --out F`.

How many layers can a user drop, and what does it cost in quality, speed and size? For each layer count:
  1. the plan's layers: a given `--plan`'s rule at each count (`plan.ranked`), else `ouroboros plan` run once with
     `--rule` (greedy by default) at the SMALLEST count (greedy's ranking is its kept layers then the removed ones,
     last removed first: the layer sets of every larger count are nested in it; block_influence ranks every layer;
     angular records the span it drops at every size; the ends need nothing); saved as F/plan.json;
  2. healed at one budget: the kept layers beside each cut trained in full (`--tune cuts`, the default; issue #42's
     measurement at half the layers) and plain LoRA on the others, the same rank, scale alpha/r, steps, data, lr,
     tune_lr and seed for every count. This is a sweep (`sweep.py`): F/spec.yaml, one run per count, in F/sweep/
     (resumable: a finished count is skipped, `ouroboros report F/sweep` works on it);
  3. evaluated on the held-out text and every `--domains` folder, each gap recovered from ONE floor, the untrained
     P + 1 + C pruned stack (`--floor`, default the demo's 7 + 1 + 7 at 30 layers), and the full model;
  4. written as the base family's plain model (`export --format plain`: F/plain-N-layers) and measured beside the full
     model in one process, in interleaved rounds (`ouroboros_lm.speed`): decode and prompt tokens/s in stock
     transformers, bytes on disk, the ideal speed-up (weights each token reads), and the peak resident memory.
F/frontier.md (the table), F/frontier.json, F/frontier.png (gap recovered against measured decode speed, one panel
per split). Rerunning the same command continues: counts trained are not trained again, folders exported are not
exported again, and a measurement of the same folders is reused; a count added later is trained and everything is
measured again together. Bad input is refused in one line before anything is written.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ouroboros_lm.atomic import ensure_dir, read_json, write_json, write_text
from ouroboros_lm.config import MAX_LAYERS, OuroborosConfig
from ouroboros_lm.data import DataConfig, map_source, parse_item
from ouroboros_lm.evaluate import gap_recovered
from ouroboros_lm.plan import NESTED, RULES, PlanConfig, check_plan_base, compact, ranked, read_plan
from ouroboros_lm.settings import REQUIRED, add_flags, from_dict, from_flags, setting, to_dict
from ouroboros_lm.train import TrainConfig

from .deploy import measure_folders, prompt_of
from .reference import RESULT

SETTINGS = "frontier-settings.json"  # what the folder's frontier was made with: a rerun must match it
PLAN = "plan.json"
SPEC = "spec.yaml"
SPEED = "speed.json"
PLAIN = "plain-{n}-layers"
# The budget by default: the demo's (70 steps of 4 x 256 tokens, lr 3e-3, warmup 7), without mid-run evaluation
BUDGET = {"steps": 70, "batch_size": 4, "lr": 3e-3, "tune_lr": 3e-3, "warmup_steps": 7, "log_every": 10,
          "eval_every": 100000, "eval_blocks": 4, "save_every": 100000, "checkpoint": "never", "seed": 0}
DATA = {"seq_len": 256}
DEFAULT_RULE = "greedy"  # the plan rule a frontier chooses its layers by (configs/layer-rules.yaml)
TUNE_RULES = ("none", "cuts", "last")  # which kept layers a count trains in full (tuning.cut_neighbours, last_kept)
# TrainConfig's fields that only a recursion reads (a heal model runs its layers once)
# (distillation is not one of them: --distill-weight trains every count against the full model's stored predictions)
RECURSION_ONLY = ("depths", "depth_schedule", "depth_mean", "param_steps", "backprop_steps", "step_loss_weight",
                  "step_loss_samples", "monotonic_weight", "report_to", "keep_checkpoints", "time_budget", "eval_every",
                  "eval_blocks")


@dataclass
class FrontierConfig:
    """What `ouroboros frontier` builds, besides its data (DataConfig) and training budget (TrainConfig)."""

    base: str = setting(REQUIRED, "the base model: local HF folder, hub id, .gguf file, or alias (smollm2-135m)")
    keep: tuple[int, ...] = setting(REQUIRED, "layer counts to keep, one heal model each (10,12,15,18,21,24)", low=1,
                                    high=MAX_LAYERS, metavar="N[,N...]")
    out: str = setting(REQUIRED, "frontier folder (rerun the same command to continue in it)")
    plan: str | None = setting(None, "an `ouroboros plan` file whose rule chooses each count's layers (default: "
                               "`ouroboros plan --rules RULE` on --data at the smallest count, saved as "
                               "OUT/plan.json)", metavar="PLAN.json")
    rule: str = setting(DEFAULT_RULE, "the rule that chooses each count's layers when the frontier plans (configs/layer-"
                        "rules.yaml, 3 seeds: greedy heals best on text like the training text; on other text "
                        "block_influence at 15 of 30 layers, angular at 21)", choices=RULES)
    domains: tuple[str, ...] | None = setting(None, "evaluation-only text, NAME=FOLDER each (no count trains on it)",
                                              metavar="NAME=FOLDER")
    floor: tuple[int, ...] | None = setting(None, "the pruned floor every gap is measured from, P,R,C: the first P "
                                            "layers, layer R, the last C (default: the demo's 7,15,7 scaled to the "
                                            "base's layers)", low=0, high=MAX_LAYERS, metavar="P,R,C")
    lora_rank: int = setting(12, "LoRA rank on every kept layer, the same for every count", low=1, high=4096)
    lora_scale: float = setting(2.0, "LoRA scale alpha / r, the same for every count", above=0, high=1e4)
    tune: str = setting("cuts", "kept layers trained in full instead of through LoRA, at --tune-lr: cuts (the layers "
                        "beside each removed span; configs/half-layers.yaml: +3.5 points held out at 15 of 30 layers, "
                        "level elsewhere), last (the last three kept layers) or none (LoRA on every kept layer)",
                        choices=TUNE_RULES)
    eval_blocks: int = setting(16, "blocks evaluated per split (held out, each domain)", low=1, high=65536)
    eval_batch_size: int = setting(8, "evaluation batch size", low=1, high=4096)
    plan_blocks: int = setting(8, "calibration blocks of the plan made here (as many again score it)", low=1,
                               high=4096)
    measure: bool = setting(True, "export each heal model plain and measure its speed and size beside the full model "
                            "(--no-measure: quality only)")
    prompt_tokens: int = setting(128, "tokens of the measured prompt (the first held-out block's; at most --seq-len)",
                                 low=1, high=1 << 16)
    new_tokens: int = setting(32, "greedy tokens decoded per measured round", low=1, high=1 << 16)
    rounds: int = setting(3, "interleaved measured rounds (the median is reported; one warm-up round first)", low=1,
                          high=1000)
    peak_memory: bool = setting(True, "also measure each model's peak resident memory, in a fresh process each")

    def __post_init__(self) -> None:
        from ouroboros_lm.settings import validate_fields

        validate_fields(self)


def frontier_flags(p) -> None:
    add_flags(p, FrontierConfig)
    add_flags(p, DataConfig, "data (DataConfig)", defaults=DATA)
    add_flags(p, TrainConfig, "the training budget, the same for every count (TrainConfig)", skip=RECURSION_ONLY,
              defaults=BUDGET)


def run_from_flags(args) -> dict:
    return run_frontier(from_flags(FrontierConfig, args), from_flags(DataConfig, args),
                        from_flags(TrainConfig, args, base=TrainConfig(**BUDGET)))


# ---------------------------------------------------------------------- checks, before anything is written
def default_floor(L: int) -> tuple[int, int, int]:
    """The demo's 7 + 1 + 7 of 30 layers, scaled: P = C = round(7L/30), the recurrent layer L // 2."""
    ends = max(1, round(7 * L / 30))
    return ends, L // 2, ends


def floor_split(fc: FrontierConfig, L: int) -> dict:
    if fc.floor is not None and len(fc.floor) != 3:
        raise ValueError(f"--floor takes three numbers P,R,C; got {','.join(map(str, fc.floor))}")
    p, r, c = fc.floor if fc.floor is not None else default_floor(L)
    split = {"n_prelude": p, "recurrent_layer": r, "n_coda": c}
    try:
        OuroborosConfig(**split, variant="none").validate(L)
    except ValueError as e:
        raise ValueError(f"--floor {p},{r},{c}: {e}") from None
    return split


def check_counts(keep: tuple[int, ...], L: int) -> list[int]:
    dup = sorted({n for n in keep if keep.count(n) > 1})
    if dup:
        raise ValueError(f"--keep gives {', '.join(map(str, dup))} more than once; give each count once")
    bad = [n for n in keep if not 1 <= n < L]
    if bad:
        raise ValueError(f"--keep {', '.join(map(str, bad))}: counts must be in [1, {L - 1}] (the base has {L} layers)")
    return sorted(keep)


def domain_folders(fc: FrontierConfig) -> dict[str, str]:
    out = {}
    for item in fc.domains or ():
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--domains {item!r}: give NAME=FOLDER")
        if name in out or name in ("train", "heldout"):
            raise ValueError(f"--domains {name}: named twice, or a name of the corpus's own splits (train, heldout)")
        if not Path(folder).exists():
            raise ValueError(f"--domains {name}={folder}: no such file or folder")
        out[name] = str(Path(folder).resolve())
    return out


def absolute(items) -> list[str] | None:
    """Sources that are paths made absolute (a rerun from another folder finds them, and the settings compare)."""
    if items is None:
        return None
    return [map_source(s, lambda src: str(Path(src).resolve()) if os.path.exists(src) else src) for s in items]


def plan_config(fc: FrontierConfig, data: DataConfig, keep: int, out: Path) -> PlanConfig:
    """`ouroboros plan --rules RULE --keep <smallest count>` on the training text (names and weights dropped)."""
    return PlanConfig(base=fc.base, data=tuple(parse_item(s)[1] for s in data.train), keep=keep,
                      out=str(out / PLAN), rules=(fc.rule,), blocks=fc.plan_blocks,
                      seq_len=min(data.seq_len or 128, 128), seed=0, text_field=data.text_field)


def layer_sets(plan: dict, counts: list[int], where: str) -> dict[int, list[int]]:
    try:
        return {n: ranked(plan, n) for n in counts}
    except ValueError as e:
        raise ValueError(f"--plan {where}: {e}") from None


def preflight(fc: FrontierConfig, data: DataConfig, tc: TrainConfig) -> dict:
    """Every argument checked before anything is written: the counts against the base's layers, the floor, the
    domains, the plan (for this base; one that ranks every count), the folder (new, or this frontier's). Returns what
    the run needs (layers per count when the plan is known, the spec, the settings to record)."""
    from ouroboros_lm.loading import load_base_config

    out = Path(fc.out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} is not a folder (nothing was written)")
    config = load_base_config(fc.base)  # the config only: no weight is loaded yet
    L = config.num_hidden_layers
    counts = check_counts(fc.keep, L)
    split = floor_split(fc, L)
    domains = domain_folders(fc)
    max_pos = getattr(config, "max_position_embeddings", None)
    if data.seq_len is not None and max_pos is not None and data.seq_len > max_pos:
        raise ValueError(f"--seq-len {data.seq_len} is longer than the base's {max_pos} positions")
    earlier = read_json(out / SETTINGS, "frontier settings") if (out / SETTINGS).is_file() else None
    if earlier is None and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} holds files and no frontier ({SETTINGS}); give a new folder (nothing was written)")
    plan, where = known_plan(fc, data, counts, out, L, max_pos)
    layers = None
    if plan is not None:
        check_plan_base(plan, config, where)
        layers = layer_sets(plan, counts, where)
    train = {k: v for k, v in to_dict(tc).items() if k not in RECURSION_ONLY + ("stop_after", "progress", "seed")}
    settings = {"base": fc.base, "floor": split, "lora_rank": fc.lora_rank, "lora_scale": fc.lora_scale,
                "data": {**to_dict(data), "train": absolute(data.train), "heldout": absolute(data.heldout)},
                "domains": domains, "train": train, "seed": tc.seed,
                "eval": {"blocks": fc.eval_blocks, "batch_size": fc.eval_batch_size},
                "plan": None if plan is None else {"rule": plan["rule"], "ranking": plan.get("ranking"),
                                                     "keep_layers": plan["keep_layers"]}}
    settings["tune"] = fc.tune
    settings["rule"] = fc.rule if plan is None else plan["rule"]
    if plan is not None and fc.rule != DEFAULT_RULE and plan["rule"] != fc.rule:
        raise ValueError(f"--rule {fc.rule}, but {where} chose its layers by {plan['rule']}: give one or the other "
                         "(nothing was written)")
    if fc.tune == "none":
        settings["train"].pop("tune_lr", None)  # no layer is trained in full: its learning rate is no setting
    if earlier is not None:
        # a frontier made before --tune existed trained LoRA alone; one made before --rule, on its plan's rule (greedy)
        earlier = {"tune": "none", "rule": (earlier.get("plan") or {}).get("rule", DEFAULT_RULE), **earlier}
        mine = {k: v for k, v in settings.items() if k != "plan" or v is not None}
        mine["train"] = since_defaults(mine["train"], earlier.get("train") or {})
        differ = first_difference(jsonable(mine), {k: v for k, v in earlier.items() if k in mine})
        if differ:
            raise ValueError(f"--out {out} holds a frontier made with other settings ({differ}); rerun it as it was, "
                             "or give a new folder (nothing was written)")
        settings["plan"] = settings["plan"] or earlier.get("plan")
    if plan is not None and plan.get("base_fingerprints"):  # a plan that records the weights it measured: checked
        from ouroboros_lm.loading import load_base_model

        check_plan_base(plan, load_base_model(fc.base), where)
    check_spec(sweep_spec(settings, layers or {n: list(range(n)) for n in counts}, L), L)
    return {"counts": counts, "layers": layers, "plan": plan, "settings": settings, "num_layers": L}


def known_plan(fc: FrontierConfig, data: DataConfig, counts: list[int], out: Path, L: int, max_pos) -> tuple:
    """(the plan, where it was read) when one is given or this frontier made one earlier; else (None, None), once
    the plan the frontier will make at its smallest count is checked."""
    if fc.plan is not None:
        return read_plan(fc.plan), fc.plan
    if (out / PLAN).is_file():  # this frontier's own plan, made by an earlier invocation
        return read_plan(out / PLAN), str(out / PLAN)
    from ouroboros_lm.plan import check_request

    try:
        check_request(plan_config(fc, data, counts[0], out), L, max_pos)
    except ValueError as e:
        raise ValueError(f"--keep {counts[0]}: the plan made at the smallest count refuses it: {e}") from None
    return None, None


def check_spec(spec: dict, L: int) -> None:
    """The whole sweep spec (data sources, training settings) validated now, as the sweep would later."""
    from .sweep import SweepSpec

    try:
        s = from_dict(SweepSpec, spec, "frontier spec")
        s.validate()
        s.data_settings()
        s.eval_settings()
        for run in s.expand():
            run.model_config(s).validate(L)
            run.train_config(s)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the frontier's settings: {e}") from None


def since_defaults(now: dict, then: dict) -> dict:
    """`now`'s training settings less those added after `then` was recorded that sit at their defaults (a frontier
    made before `tune_lr` existed resumes; one set otherwise is a difference)."""
    defaults = to_dict(TrainConfig(**BUDGET))
    return {k: v for k, v in now.items() if k in then or k not in defaults or v != defaults[k]}


def first_difference(now, then, path: str = "") -> str | None:
    """'train.steps: 2, now 3': the first setting that differs between two records (None if none)."""
    if isinstance(now, dict) and isinstance(then, dict):
        for k in list(now) + [k for k in then if k not in now]:
            found = first_difference(now.get(k), then.get(k), f"{path}.{k}" if path else str(k))
            if found:
                return found
        return None
    if now == then:
        return None
    short = lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 60 else repr(v)  # noqa: E731
    return f"{path}: {short(then)}, now {short(now)}"


def jsonable(v):
    import json

    return json.loads(json.dumps(v))


def tuned_layers(rule: str | None, keep: list[int], num_layers: int) -> list[int]:
    """The kept layers a count trains in full under `--tune` (none: [])."""
    from ouroboros_lm.tuning import cut_neighbours, last_kept

    if rule in (None, "none"):
        return []
    return list(cut_neighbours(keep, num_layers) if rule == "cuts" else last_kept(keep, 3))


def sweep_spec(settings: dict, layers: dict[int, list[int]], num_layers: int) -> dict:
    """The sweep this frontier is: one heal run per count on its layers, every run at one rank, scale and budget
    (and, with --tune, the count's layers beside its cuts or its last three trained in full)."""
    r = settings["lora_rank"]
    tune = {n: tuned_layers(settings.get("tune"), layers[n], num_layers) for n in layers}
    data = {k: v for k, v in settings["data"].items() if v is not None}
    if settings["domains"]:
        data["domains"] = {name: [folder] for name, folder in settings["domains"].items()}
    return {"name": "frontier", "base": settings["base"], "split": settings["floor"], "data": data,
            "train": settings["train"], "seed": settings["seed"],
            "eval": {"depths": [1], "blocks": settings["eval"]["blocks"], "batch_size": settings["eval"]["batch_size"],
                     "modulation_inputs": 1},
            "defaults": {"variant": "none"},
            "runs": [{"keep_layers": list(layers[n]), "heal_layers": 1, "lora_rank": r,
                      "lora_alpha": float(r * settings["lora_scale"]), "depths": [1], "default_depth": 1,
                      **({"tune_layers": tune[n]} if tune[n] else {})}
                     for n in sorted(layers)]}


# ---------------------------------------------------------------------- the run
def make_plan_here(fc: FrontierConfig, data: DataConfig, keep: int, out: Path) -> dict:
    from ouroboros_lm.loading import load_base_model, load_tokenizer
    from ouroboros_lm.plan import make_plan, write_plan

    pc = plan_config(fc, data, keep, out)
    print(f"[1/4] planning: `ouroboros plan --rules {fc.rule} --keep {keep}` on the training text (it gives every "
          f"larger count" + (", nested)" if fc.rule in NESTED else ")"))
    plan = make_plan(pc, load_base_model(fc.base), load_tokenizer(fc.base), fc.base)
    write_plan(plan, out / PLAN)
    return plan


def run_frontier(fc: FrontierConfig, data: DataConfig, tc: TrainConfig) -> dict:
    import yaml

    from .sweep import SweepSpec, run_sweep

    pre = preflight(fc, data, tc)  # every argument checked before the folder is touched
    out = ensure_dir(Path(fc.out))
    counts, settings, L = pre["counts"], pre["settings"], pre["num_layers"]
    plan = pre["plan"]
    write_json(out / SETTINGS, settings)  # first: a folder holding this frontier (and a plan cut short) resumes
    if plan is None:
        plan = make_plan_here(fc, data, counts[0], out)
        settings["plan"] = {"rule": plan["rule"], "ranking": plan.get("ranking"), "keep_layers": plan["keep_layers"]}
    else:
        print(f"[1/4] the plan: {fc.plan or out / PLAN} (rule {plan['rule']})")
        if fc.plan is not None and not (out / PLAN).is_file():
            write_json(out / PLAN, plan)
    layers = layer_sets(plan, counts, str(fc.plan or out / PLAN))
    write_json(out / SETTINGS, settings)
    spec = sweep_spec(settings, layers, L)
    write_text(out / SPEC, "# written by `ouroboros frontier`: one heal run per layer count\n"
               + yaml.safe_dump(spec, sort_keys=False))
    print(f"[2/4] healing {len(counts)} counts ({', '.join(map(str, counts))} of {L} layers), LoRA r{fc.lora_rank} "
          f"alpha/r {fc.lora_scale:g}{tune_words(settings, tc.tune_lr)}, {tc.steps} steps of {tc.batch_size} blocks, "
          f"lr {tc.lr:g}; gaps from the floor "
          f"{settings['floor']['n_prelude']} + 1 + {settings['floor']['n_coda']}")
    sweep = run_sweep(out / SPEC, out=out / "sweep")
    runs = SweepSpec.load(out / SPEC).expand()
    results = {n: read_json(sweep / "runs" / run.name / RESULT, "run result") for n, run in zip(counts, runs)}
    folders = {n: sweep / "runs" / run.name for n, run in zip(counts, runs)}
    deploy = None
    if fc.measure:
        print("[3/4] exporting each heal model plain and measuring it beside the full model")
        deploy = measure_counts(fc, data, tc, out, folders)
    rows = frontier_rows(counts, layers, results, deploy)
    splits = list(next(iter(results.values()))["losses"])
    table = frontier_table(rows, splits, settings, deploy, L)
    summary = {"base": fc.base, "num_layers": L, "floor": settings["floor"], "splits": splits, "rows": rows,
               "full": (deploy or {}).get("full"), "settings": settings, "plan_rule": plan["rule"],
               "measure": None if deploy is None else deploy["how"]}
    write_json(out / "frontier.json", summary)
    write_text(out / "frontier.md", table)
    pictures = []
    if deploy is not None:
        plot_frontier_speed(rows, splits, out / "frontier.png",
                            f"{Path(fc.base).name}: gap recovered against measured decode speed "
                            f"(LoRA r{fc.lora_rank}, {tc.steps} steps each)")
        pictures.append("frontier.png")
    print("[4/4] the frontier\n")
    print(table)
    print(f"\nwrote {out}/frontier.md, frontier.json{''.join(', ' + p for p in pictures)}")
    return summary


def measure_counts(fc: FrontierConfig, data: DataConfig, tc: TrainConfig, out: Path, runs: dict[int, Path]) -> dict:
    """Each count's adapter written plain (once: a folder already exported is kept), then every plain folder and
    the full model measured together (a measurement of the same folders and settings is reused)."""
    from ouroboros_lm.export import export_plain
    from ouroboros_lm.loading import resolve_source

    folders = {}
    for n, run in runs.items():
        folder = out / PLAIN.format(n=n)
        if not (folder / ".ouroboros-lm.json").is_file():
            export_plain(run, folder)
        folders[n] = folder
    ids = prompt_ids(fc, data, tc)
    how = {"runtime": "transformers", "prompt_tokens": len(ids), "new_tokens": fc.new_tokens, "rounds": fc.rounds,
           "folders": {str(n): str(f) for n, f in folders.items()}, "peak_memory": fc.peak_memory, "batch": 1}
    if (out / SPEED).is_file():
        old = read_json(out / SPEED, "frontier speed")
        if old.get("how") == jsonable(how):
            print(f"      the same folders were measured already ({out / SPEED}): reused")
            return old
    paths = {"full": resolve_source(fc.base), **{str(n): str(f) for n, f in folders.items()}}
    rows = measure_folders(paths, ids, fc.new_tokens, fc.rounds, peak=fc.peak_memory)
    result = {"how": how, "full": rows.pop("full"), "counts": rows}
    write_json(out / SPEED, result)
    return read_json(out / SPEED, "frontier speed")


def prompt_ids(fc: FrontierConfig, data: DataConfig, tc: TrainConfig) -> list[int]:
    """The first prompt_tokens tokens of the first held-out block (what a user's prompt looks like)."""
    from ouroboros_lm.loading import load_tokenizer
    from ouroboros_lm.runtime import choose_runtime

    d = dataclasses.replace(data, train=tuple(absolute(data.train)), heldout=absolute(data.heldout))
    corpus = d.corpus(load_tokenizer(fc.base), choose_runtime().default_seq_len, seed=tc.seed)
    return prompt_of(corpus, fc.prompt_tokens)


def frontier_rows(counts: list[int], layers: dict, results: dict, deploy: dict | None) -> list[dict]:
    rows = []
    for n in counts:
        res = results[n]
        ref = res["reference"]
        gaps = {split: gap_recovered(losses["heal"], ref[split]["baseline"], ref[split]["full"])
                for split, losses in res["losses"].items()}
        row = {"keep": n, "layers": list(layers[n]), "gap_recovered": gaps,
               "tuned_layers": list(res["settings"].get("tune_layers") or []),  # what the run trained in full
               "loss": {split: losses["heal"] for split, losses in res["losses"].items()},
               "trained_weights": res["trainable_parameters"], "steps": res["steps"], "train_wall_s": res["wall_s"],
               "run": res["name"]}
        if deploy is not None:
            row["deploy"] = deploy["counts"][str(n)]
        rows.append(row)
    return rows


def tune_words(settings: dict, tune_lr) -> str:
    rule = settings.get("tune")
    if rule in (None, "none"):
        return ""
    which = "the layers beside each cut" if rule == "cuts" else "the last three kept layers"
    return f", {which} trained in full (lr {tune_lr:g})"


def distill_words(train: dict) -> str:
    if not train.get("distill_weight"):
        return ""
    source = (f"its top-{train['distill_top_k']} predictions, stored" if train.get("distill_source") == "stored"
              else "its predictions, online")
    ce = train.get("ce_weight", 1.0)
    return (f", distilled from the full model (KL to {source}, weight {train['distill_weight']:g}"
            + (f" beside the cross-entropy at {ce:g}" if ce else ", no cross-entropy") + ")")


def pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def frontier_table(rows: list[dict], splits: list[str], settings: dict, deploy: dict | None, L: int) -> str:
    fl = settings["floor"]
    head = ["keep", "layers"] + [f"gap {s}" for s in splits]
    if deploy is not None:
        head += ["decode x full", "prompt x full", "ideal x", "size x"] + (
            ["peak memory x"] if deploy["how"]["peak_memory"] else [])
    lines = [f"Gap recovered from the untrained floor ({fl['n_prelude']} + 1 + {fl['n_coda']}: layers 0-"
             f"{fl['n_prelude'] - 1}, {fl['recurrent_layer']}, {L - fl['n_coda']}-{L - 1}) to the full model "
             f"({L} layers), per split; each count's layers chosen by the plan's {settings.get('rule', DEFAULT_RULE)} "
             f"rule and healed with LoRA r{settings['lora_rank']} (alpha/r "
             f"{settings['lora_scale']:g}){tune_words(settings, settings['train'].get('tune_lr'))}"
             f"{distill_words(settings['train'])} for "
             f"{settings['train']['steps']} steps of {settings['train']['batch_size']} "
             f"x {settings['data']['seq_len'] or 'default'} tokens, lr {settings['train']['lr']:g}.", ""]
    if deploy is not None:
        h = deploy["how"]
        full = deploy["full"]
        lines += [f"Speed: each count exported plain (the base family's own model) and run in stock transformers beside "
                  f"the full model in one process, batch 1, a {h['prompt_tokens']}-token prompt and "
                  f"{h['new_tokens']} greedy tokens, the median of {h['rounds']} interleaved rounds (the full model: "
                  f"{full['decode_tps']:.1f} decode and {full['prompt_tps']:.0f} prompt tokens/s, "
                  f"{full['disk_bytes'] / 1e6:.1f} MB on disk"
                  + (f", {full['peak_rss_bytes'] / 1e6:.0f} MB peak resident" if full.get("peak_rss_bytes") else "")
                  + "). Ideal: the ratio of weights each token reads.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["keep"]), compact(r["layers"])] + [pct(r["gap_recovered"][s]) for s in splits]
        if deploy is not None:
            d = r["deploy"]
            cells += [f"{d['decode_x']:.2f}x", f"{d['prompt_x']:.2f}x", f"{d['ideal_x']:.2f}x", f"{d['size_x']:.2f}x"]
            if deploy["how"]["peak_memory"]:
                cells.append(f"{d['peak_x']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier_speed(rows: list[dict], splits: list[str], path: Path, title: str) -> Path:
    """Gap recovered against the measured decode speed (x the full model's), one panel per split: one point per
    count, joined in order, each labelled with its layers; the full model at (1, 100%)."""
    from ouroboros_lm.plots import pyplot, save_figure

    plt = pyplot()
    cols = min(3, len(splits))
    nrows = (len(splits) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.9 * nrows), squeeze=False)
    for ax, split in zip(axes.flat, splits):
        pts = sorted((r["deploy"]["decode_x"], r["gap_recovered"][split], r["keep"]) for r in rows
                     if r["gap_recovered"][split] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C0", lw=1.4, ms=5, label="healed (plan's layers)")
        for x, y, n in pts:
            ax.annotate(f"{n} layers", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.plot([1.0], [100.0], "^", color="0.35", ms=7, label="full model")
        ax.axhline(0.0, color="0.6", lw=0.8, ls="--")
        ax.set_title(split)
        ax.set_xlabel("decode speed vs the full model (measured)")
        ax.set_ylabel("gap recovered (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(splits):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    save_figure(fig, path, 120)
    plt.close(fig)
    return path
