"""The demo's data choices: which addresses train, what is mixed in, and bad folders refused."""
from __future__ import annotations

import pytest
import torch

from ouroboros_lm import RecursionPolicy
from ouroboros_recipes.demo import DemoConfig, DemoRun, mix_files, settings_from_flags, sotu_files


def test_the_shipped_config_keeps_every_setting_the_demo_had():
    """demo.yaml + the library's dataclasses give what DemoConfig used to declare itself."""
    run = DemoRun.load()
    m, tc, ev = run.model, run.train, run.eval
    assert (m.n_prelude, m.recurrent_layer, m.block_layers, m.n_coda, m.variant, m.lora_rank, m.prelude_lora_layers,
            m.recurrent_lora, m.injection, m.max_depth, m.init_seed) == (7, 15, 2, 7, "none", 7, 7, True, "linear", 8, 0)
    assert (m.loop_start, m.gate) == ("rezero", False)  # issue #44: the loop starts at its stack, later steps a_s = 0
    assert run.policy == RecursionPolicy(default_depth=2, step_damping=0.5)
    assert (tc.steps, tc.batch_size, tc.lr, tc.warmup_steps, tc.time_budget, tc.depths, tc.depth_schedule,
            tc.param_steps, tc.backprop_steps, tc.distill_weight, tc.seed) == (
        70, 4, 3e-3, 7, 240.0, (2,), "uniform", 0, 0, 0.0, 0)
    assert (tc.log_every, tc.eval_every, tc.eval_blocks, tc.save_every, tc.checkpoint) == (10, 23, 8, 50, "never")
    assert (ev.depths, ev.blocks, ev.batch_size, ev.exit_thresholds, ev.top, ev.seed) == (
        (1, 2, 4), 16, 4, None, 4, 1)
    assert run.data.seq_len == 256 and (run.halter.max_depth, run.halter.seed, run.halter.steps) == (4, 0, 60)
    dc = run.demo
    assert dc == DemoConfig() and (dc.out, dc.base, dc.first_train_year, dc.last_train_year, dc.heal_rows,
                                   dc.heal_compute_layers, dc.heal_time_budget, dc.domain_depths, dc.domain_blocks,
                                   dc.halter_thresholds, dc.train_halter) == (
        "runs/demo", "smollm2-135m", 1950, 2000, True, 4, 240.0, (2, 4), 8, (0.5,), False)


def test_flags_override_the_config_file_and_a_file_replaces_the_shipped_one(tmp_path):
    from ouroboros_lm.cli import build_parser

    parse = build_parser().parse_args
    run = settings_from_flags(parse(["demo", "--train.steps", "5", "--policy.step-damping", "1", "--no-heal-rows",
                                     "--eval.depths", "1,2", "--mix", "a", "b", "--train.seed", "3"]))
    assert (run.train.steps, run.policy.step_damping, run.demo.heal_rows, run.eval.depths, run.demo.mix) == (
        5, 1.0, False, (1, 2), ("a", "b"))
    assert (run.model.init_seed, run.eval.seed, run.halter.seed) == (3, 4, 3)  # train.seed seeds them all
    assert run.train.lr == 3e-3 and run.model.lora_rank == 7  # the rest as the file says
    mine = tmp_path / "mine.yaml"
    mine.write_text("train: {steps: 5}\ndemo: {heal_rows: false}\n")
    run = settings_from_flags(parse(["demo", "--config", str(mine), "--train.lr", "0.01"]))
    assert (run.train.steps, run.train.lr, run.policy.step_damping, run.demo.heal_rows) == (5, 0.01, 1.0, False)


@pytest.mark.parametrize("text,needle", [
    ("model: {init_seed: 3}\n", r"model.init_seed is set by the demo itself"),
    ("eval: {full: false}\n", r"eval.full is set by the demo itself"),
    ("colour: {x: 1}\n", r"expected a mapping of sections demo, model, policy, train, eval, data, halter"),
    ("policy: {trained_depth: 3}\n", r"policy.trained_depth is set by the demo itself"),
    ("policy: {default_depth: 99}\n", r"default_depth must be an integer in \[1, max_depth=64\]"),
    ("train: [1]\n", r"section train must be a mapping"),
    ("train: {stepz: 3}\n", r"unknown train setting\(s\): stepz"),
    ("policy: {step_damping: 2}\n", r"step_damping must be in \[0.0, 1.0\]; got 2"),
])
def test_a_bad_config_file_is_refused_naming_the_setting(tmp_path, text, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=needle):
        DemoRun.load(bad)


def test_years_split_the_addresses_and_the_mix_is_optional(tmp_path):
    sotu = tmp_path / "sotu"
    sotu.mkdir()
    for year in (1900, 1950, 1999, 2001):
        (sotu / f"{year}_x.txt").write_text("text")
    train, held = sotu_files(sotu, last_train_year=2000, first_train_year=1950)
    assert [p.rsplit("/", 1)[1] for p in train] == ["1950_x.txt", "1999_x.txt"]
    assert [p.rsplit("/", 1)[1] for p in held] == ["2001_x.txt"]
    mix, more = tmp_path / "mix", tmp_path / "more"
    mix.mkdir(), more.mkdir()
    (mix / "b.txt").write_text("call me")
    (mix / "a.txt").write_text("Ishmael")
    (more / "c.txt").write_text("import this")
    assert mix_files(DemoConfig(mix=(str(mix),))) == ([str(mix / "a.txt"), str(mix / "b.txt")], [mix])
    assert mix_files(DemoConfig(mix=(str(mix), str(more))))[0] == [str(mix / n) for n in ("a.txt", "b.txt")] + [
        str(more / "c.txt")]
    assert mix_files(DemoConfig(mix=("none",))) == ([], [])
    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        mix_files(DemoConfig(mix=(str(mix), str(tmp_path / "missing"))))


def test_the_default_mix_is_whatever_make_domains_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path))
    assert mix_files(DemoConfig()) == ([], [])  # nothing fetched: addresses only
    (tmp_path / "python-docs").mkdir()
    (tmp_path / "python-docs" / "tutorial.txt").write_text("for x in y")
    assert mix_files(DemoConfig()) == ([str(tmp_path / "python-docs" / "tutorial.txt")], [tmp_path / "python-docs"])


def tiny_demo(tmp_path, **demo):
    """`make demo`'s settings on a tiny 30-layer random base and a tiny corpus (a few steps)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import TINY, tiny_tokenizer, write_corpus

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY, "num_hidden_layers": 30, "max_position_embeddings": 512})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    text = write_corpus(tmp_path / "text", n_docs=8, words=200)
    sotu = tmp_path / "sotu"
    sotu.mkdir()
    for i, doc in enumerate(sorted(text.iterdir())):
        (sotu / f"{1990 + 3 * i}_x.txt").write_text(doc.read_text())
    return DemoRun.load(changes={
        "demo": dict(out=str(tmp_path / "demo"), base=str(tmp_path / "base"), corpus=str(sotu), first_train_year=1990,
                     last_train_year=2006, mix=("none",), domains=str(tmp_path / "no-domains"),
                     **{"plan": "none", **demo}),
        "data": dict(seq_len=32), "train": dict(steps=3, batch_size=2, warmup_steps=1),
        "eval": dict(depths=(1, 2), exit_thresholds=(0.5,), exit_max_depth=2, blocks=2)})


def test_demo_end_to_end_puts_the_heal_rows_beside_the_recursion(tmp_path, one_thread):
    """`make demo`'s recipe on a tiny 30-layer random base: the recursion, and the heal models (plain LoRA on every
    kept layer) at equal stored weights (the recursion's own 16 layers, not looped) and at equal compute (7 + 4 + 7
    layers), each rank-matched to the recursion's trained weights, at its LoRA scale, trained for the same steps,
    scored on the same blocks of every split."""
    import json

    from ouroboros_recipes.demo import run_demo

    run = tiny_demo(tmp_path)
    result = run_demo(run)
    rows = {r.model: r for r in result["report"].splits["heldout"]}
    ours = rows["ouroboros@2"].trainable
    weights = next(r for name, r in rows.items() if name.startswith("heal, the same 16 layers"))
    compute = next(r for name, r in rows.items() if name.startswith("heal, 18 layers"))
    # the demo's block of two at depth 2: 7 + 2 x 2 + 7 passes; the heal model at equal stored weights keeps the
    # recursion's own 16 layers, not looped; the floor every row's gap is measured from is the 15-layer pruned
    # stack (the recurrent layer once), not the block's own 16-layer one
    assert weights.layers == 16 and compute.layers == 18 and rows["ouroboros@2"].layers == 18
    from ouroboros_lm.adapter import read_adapter

    ours_cfg = read_adapter(tmp_path / "demo")[0]["ouroboros_config"]
    same = read_adapter(tmp_path / "demo" / "heal-weights")[0]["ouroboros_config"]
    assert same["keep_layers"] == [0, 1, 2, 3, 4, 5, 6, 15, 16, 23, 24, 25, 26, 27, 28, 29]
    for folder in ("heal-weights", "heal-compute"):  # every LoRA at the recursion's scale alpha / r
        heal_cfg = read_adapter(tmp_path / "demo" / folder)[0]["ouroboros_config"]
        assert heal_cfg["lora_alpha"] / heal_cfg["lora_rank"] == pytest.approx(ours_cfg["lora_alpha"] / ours_cfg["lora_rank"])
    assert rows["baseline"].layers == 15 and rows["ouroboros@1"].layers == 16
    for heal in (weights, compute):  # within one rank step of the recursion's weights
        step = heal.trainable / int(heal.model.rsplit("r", 1)[1])
        assert abs(heal.trainable - ours) <= step / 2 + 1
        assert heal.loss < rows["baseline"].loss  # trained: better than the pruned stack it heals
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert {s["steps_done"] for s in summary["heal"].values()} == {summary["steps_done"]}
    # each heal model deployed as the base's own model, measured beside the full one: the folder loads in stock
    # transformers and scores the heal model's held-out loss
    deployed = summary["deploy"]
    assert set(deployed) == {"full", weights.model, compute.model} and (tmp_path / "demo" / "frontier_speed.png").is_file()
    from transformers import AutoModelForCausalLM

    from conftest import assert_equivalent
    from ouroboros_recipes.demo import demo_corpus

    heldout = demo_corpus(run)[0].eval_splits(run.eval.blocks, run.eval.seed)["heldout"]
    for row in (weights, compute):
        d = deployed[row.model]
        assert d["layers"] == row.layers and d["decode_tps"] > 0 and d["size_x"] < 1
        assert d["ideal_x"] == pytest.approx(deployed["full"]["weights_per_token"] / d["weights_per_token"])
        plain = AutoModelForCausalLM.from_pretrained(d["folder"]).eval()
        assert plain.config.num_hidden_layers == row.layers and "auto_map" not in plain.config.to_dict()
        with torch.no_grad():
            assert_equivalent(plain(heldout, labels=heldout).loss.item(), row.loss, dtype=torch.float32,
                              depth=row.layers)
    run_demo(run)  # a second demo replaces the first, plain folders included


def test_the_demo_trains_on_its_genres_as_named_sources(tmp_path):
    from conftest import tiny_tokenizer, write_corpus
    from ouroboros_lm.data import build_corpus
    from ouroboros_recipes.demo import genre_items

    sotu, moby, docs = (write_corpus(tmp_path / n, n_docs=k, seed=k) for n, k in (("sotu", 4), ("moby-dick", 3),
                                                                                   ("python docs", 2)))
    addresses = [str(f) for f in sorted(sotu.glob("*.txt"))]
    mixed = [str(f) for folder in (moby, docs) for f in sorted(folder.glob("*.txt"))]
    items = genre_items(addresses[:3], mixed)
    assert items[0] == f"sotu={addresses[0]}" and items[-1].startswith("python_docs=")
    corpus = build_corpus(items, tiny_tokenizer(), 32, heldout=addresses[3:])
    assert [p.name for p in corpus.parts] == ["sotu", "moby-dick", "python_docs"]
    assert [p.weight for p in corpus.parts] == [float(p.blocks) for p in corpus.parts]  # by size, as before
    assert corpus.n_train_docs == 8 and corpus.n_heldout_docs == 1


@pytest.mark.equivalence
def test_demo_on_a_plan_keeps_its_layers_and_measures_gaps_from_the_fixed_floor(tmp_path, one_thread):
    """With `demo.plan`, the recursion keeps the plan's layers and loops its block, the equal-weights heal model
    keeps the same layers and the equal-compute one the plan's ranking's first 18; the floor stays the model
    section's 7 + 1 + 7 pruned stack (so a better split cannot make a model look worse)."""
    import torch

    from conftest import assert_equivalent, tiny_tokenizer
    from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model
    from ouroboros_lm.adapter import read_adapter
    from ouroboros_lm.plan import PlanConfig, make_plan, write_plan
    from ouroboros_lm.evaluate import evaluate
    from ouroboros_recipes.demo import demo_corpus, run_demo

    run = tiny_demo(tmp_path)
    pc = PlanConfig(base="tiny", data=(str(tmp_path / "text"),), keep=16, block_layers=2, blocks=2, seq_len=32,
                    rules=("block_influence",))
    plan = make_plan(pc, load_base_model(tmp_path / "base"), tiny_tokenizer(), "tiny", progress=False)
    write_plan(plan, tmp_path / "plan.json")
    run.demo.plan = str(tmp_path / "plan.json")
    result = run_demo(run)
    ours = read_adapter(tmp_path / "demo")[0]["ouroboros_config"]
    assert ours["keep_layers"] == plan["keep_layers"] and ours["recurrent_layer"] == plan["recursion"]["recurrent_layer"]
    assert read_adapter(tmp_path / "demo" / "heal-weights")[0]["ouroboros_config"]["keep_layers"] == plan["keep_layers"]
    compute = read_adapter(tmp_path / "demo" / "heal-compute")[0]["ouroboros_config"]["keep_layers"]
    assert compute == sorted(plan["ranking"][:18])
    rows = {r.model: r for r in result["report"].splits["heldout"]}
    corpus, _ = demo_corpus(run)  # the same blocks the demo scored
    blocks = {"heldout": corpus.eval_splits(run.eval.blocks, run.eval.seed)["heldout"]}
    fixed = OuroborosModel.from_base(load_base_model(tmp_path / "base"),
                                     OuroborosConfig(n_prelude=7, recurrent_layer=15, n_coda=7, variant="none"))
    planned = OuroborosModel.from_base(load_base_model(tmp_path / "base"),
                                       OuroborosConfig(**{k: ours[k] for k in ("keep_layers", "recurrent_layer",
                                                                               "block_layers")}, variant="none"))
    with torch.no_grad():
        want = evaluate(fixed, blocks, depths=(), progress=False).row("heldout", "baseline").loss
        other = evaluate(planned, blocks, depths=(), progress=False).row("heldout", "baseline").loss
    assert rows["baseline"].layers == 15
    assert_equivalent(rows["baseline"].loss, want, dtype=torch.float32, depth=15)  # float32, through 15 layers
    assert abs(other - want) > 1e-3  # the planned stack's own floor is another one


def test_the_shipped_plan_is_a_valid_plan_for_smollm2():
    """demo_plan.json: `ouroboros plan` on the demo's training text, for SmolLM2-135M's 30 layers, recording its
    command; the demo builds the recursion on its layers and block."""
    from ouroboros_lm import OuroborosConfig
    from ouroboros_lm.plan import planned_config, ranked, read_plan
    from ouroboros_recipes.demo import SHIPPED_PLAN

    plan = read_plan(SHIPPED_PLAN)
    assert plan["base"] == "smollm2-135m" and plan["num_layers"] == 30 and plan["keep"] == 16
    assert "ouroboros plan" in plan["calibration"]["command"]
    run = DemoRun.load()
    cfg = planned_config(plan, run.model)
    assert cfg.kept_layers(30) == plan["keep_layers"] and cfg.block_layers == 2 == plan["recursion"]["block_layers"]
    # LoRA on every kept layer, as in the shorthand split: the planned prelude has 8 layers, all adapted
    assert cfg.n_prelude == 8 and cfg.prelude_lora_layers == 8 and run.model.prelude_lora_layers == run.model.n_prelude
    assert len(ranked(plan, 18)) == 18 and set(plan["keep_layers"]) < set(ranked(plan, 18))
