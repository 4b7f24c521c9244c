"""`ouroboros frontier`: for each layer count, the plan's layers healed at one budget, evaluated, exported plain and
measured beside the full model; resumable; bad input refused before anything is written. On a tiny 30-layer random
Llama, a character tokenizer and pseudo-word text, a few steps."""
from __future__ import annotations

import json
import re
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

from conftest import TINY, save_tiny_base, tiny_tokenizer, write_corpus


@pytest.fixture
def ouroboros(monkeypatch):
    """`ouroboros ...` (cli.main) with the frontier registered as pyproject.toml registers it, whatever metadata the
    installed distribution carries."""
    from ouroboros_lm import cli, commands

    eps = [ep for ep in entry_points(group=commands.GROUP) if ep.name != "frontier"]
    eps.append(EntryPoint("frontier", "ouroboros_recipes.commands:FRONTIER", commands.GROUP))
    monkeypatch.setattr(commands, "entry_points", lambda group: eps)
    commands.registered.cache_clear()
    yield cli.main
    commands.registered.cache_clear()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 30-layer base, training text, held-out text and one extra domain."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("frontier")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY, "num_hidden_layers": 30, "max_position_embeddings": 512})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    return {"root": root, "base": str(root / "base"), "train": str(write_corpus(root / "train", n_docs=8, words=150)),
            "heldout": str(write_corpus(root / "heldout", n_docs=3, seed=1, words=150)),
            "domain": str(write_corpus(root / "domain", n_docs=3, seed=2, words=150))}


def argv(world, out, keep="10,20", *more):
    return ["frontier", "--base", world["base"], "--data", world["train"], "--heldout", world["heldout"],
            "--domains", f"other={world['domain']}", "--keep", keep, "--out", str(out), "--seq-len", "32",
            "--steps", "2", "--batch-size", "2", "--warmup-steps", "1", "--lora-rank", "2", "--eval-blocks", "2",
            "--plan-blocks", "2", "--prompt-tokens", "16", "--new-tokens", "4", "--rounds", "1", *more]


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_frontier_trains_exports_measures_and_resumes(world, ouroboros, monkeypatch, one_thread):
    from transformers import AutoModelForCausalLM

    import ouroboros_lm.export
    import ouroboros_recipes.sweep

    out = world["root"] / "frontier"
    assert ouroboros(argv(world, out, "20,10", "--no-peak-memory")) == 0
    summary = json.loads((out / "frontier.json").read_text())
    rows = {r["keep"]: r for r in summary["rows"]}
    assert sorted(rows) == [10, 20] and summary["splits"] == ["train", "heldout", "other"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["keep"] == 10 and plan["rule"] == "greedy"  # planned once, at the smallest count
    for n, r in rows.items():
        assert len(r["layers"]) == n and r["layers"] == sorted(plan["ranking"][:n])
        assert set(r["gap_recovered"]) == {"train", "heldout", "other"}
        d = r["deploy"]
        assert d["layers"] == n and d["decode_tps"] > 0 and d["prompt_tps"] > 0 and 0 < d["size_x"] < 1
        assert d["ideal_x"] == pytest.approx(summary["full"]["weights_per_token"] / d["weights_per_token"])
        model = AutoModelForCausalLM.from_pretrained(out / f"plain-{n}-layers")  # stock transformers
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == n
    assert set(rows[10]["layers"]) < set(rows[20]["layers"])  # nested: greedy's ranking
    # every count's gap from ONE floor (the demo's 7 + 1 + 7) and the full model
    refs = [json.loads((out / "sweep" / "runs" / r["run"] / "result.json").read_text())["reference"] for r in rows.values()]
    assert refs[0] == refs[1] and summary["floor"] == {"n_prelude": 7, "recurrent_layer": 15, "n_coda": 7}
    table = (out / "frontier.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| 10 |") or line.startswith("| 20 |")]
    assert len(lines) == 2 and "gap other" in table and "decode x full" in table
    assert (out / "frontier.png").stat().st_size > 0

    # the same command again: nothing trained, exported or measured again
    before = mtimes(out)
    monkeypatch.setattr(ouroboros_recipes.sweep, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(ouroboros_lm.export, "write_plain", lambda *a, **k: pytest.fail("exported again"))
    assert ouroboros(argv(world, out, "20,10", "--no-peak-memory")) == 0
    after = mtimes(out)
    unchanged = [k for k in before if k.startswith(("sweep/runs/", "plain-")) or k in ("plan.json", "speed.json")]
    assert unchanged and all(after[k] == before[k] for k in unchanged)
    assert json.loads((out / "frontier.json").read_text())["rows"] == summary["rows"]


def test_a_count_added_later_is_the_only_one_trained(world, ouroboros, monkeypatch, one_thread):
    import ouroboros_recipes.sweep

    out = world["root"] / "added"
    assert ouroboros(argv(world, out, "10", "--no-measure")) == 0
    trained = []
    real = ouroboros_recipes.sweep.train
    monkeypatch.setattr(ouroboros_recipes.sweep, "train", lambda model, *a, **k: trained.append(
        len(model.config.kept_layers(30))) or real(model, *a, **k))
    assert ouroboros(argv(world, out, "10,12", "--no-measure")) == 0
    assert trained == [12]
    rows = json.loads((out / "frontier.json").read_text())["rows"]
    assert [len(r["layers"]) for r in rows] == [10, 12] and "decode" not in (out / "frontier.md").read_text()


@pytest.mark.parametrize("change,needle", [
    (dict(keep="10,10"), "more than once"),
    (dict(keep="10,30"), r"counts must be in \[1, 29\]"),
    (dict(keep="0,10"), "must be"),
    (dict(more=("--floor", "7,15")), "three numbers"),
    (dict(more=("--domains", "nameless")), "NAME=FOLDER"),
    (dict(plan="other"), "was made for another base"),
])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(world, ouroboros, capsys, tmp_path, change,
                                                                      needle):
    more = list(change.get("more", ()))
    if change.get("plan"):
        small = save_tiny_base(tmp_path / "small")  # 8 layers
        assert ouroboros(["plan", "--base", small, "--data", world["train"], "--keep", "4", "--blocks", "2",
                          "--seq-len", "32", "--out", str(tmp_path / "plan.json")]) == 0
        capsys.readouterr()
        more += ["--plan", str(tmp_path / "plan.json")]
    out = tmp_path / "out"
    try:
        rc = ouroboros(argv(world, out, change.get("keep", "10,20"), *more))
    except SystemExit as e:  # a usage error (argparse): one line, status 2
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(needle, err), err
    assert not out.exists()


def test_a_rerun_with_other_settings_is_refused(world, ouroboros, capsys, one_thread):
    out = world["root"] / "added"  # made by the test above, or made here
    if not (out / "frontier.json").is_file():
        assert ouroboros(argv(world, out, "10", "--no-measure")) == 0
    before = mtimes(out)
    capsys.readouterr()
    assert ouroboros(argv(world, out, "10", "--no-measure", "--steps", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and "steps" in err
    assert mtimes(out) == before
    other = world["root"] / "not-a-frontier"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    assert ouroboros(argv(world, other, "10", "--no-measure")) == 2
    assert "holds files and no frontier" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["mine.txt"]



def test_tune_cuts_trains_the_layers_beside_each_cut_in_full(world, ouroboros, one_thread):
    from ouroboros_lm.tuning import cut_neighbours

    out = world["root"] / "tuned"
    assert ouroboros(argv(world, out, "10", "--no-measure", "--tune", "cuts", "--tune-lr", "1e-3")) == 0
    row = json.loads((out / "frontier.json").read_text())["rows"][0]
    kept = set(row["layers"])
    expected = [i for i in sorted(kept) if (i > 0 and i - 1 not in kept) or (i < 29 and i + 1 not in kept)]
    assert row["tuned_layers"] == expected == list(cut_neighbours(row["layers"], 30)) and expected
    run = out / "sweep" / "runs" / row["run"]
    adapter = json.loads((run / "adapter_config.json").read_text())["ouroboros_config"]
    assert list(adapter["tune_layers"]) == expected
    result = json.loads((run / "result.json").read_text())
    assert result["train_config"]["tune_lr"] == 1e-3
    assert "trained in full (lr 0.001)" in (out / "frontier.md").read_text()


def recorded_without(world, ouroboros, capsys, monkeypatch, out: Path, keys: list[str], other: list[str]) -> None:
    """`out`'s record with training settings `keys` deleted (as written before they existed) resumes the same command
    without training anything, and refuses the command with `other` (a value off their defaults), naming it."""
    import ouroboros_recipes.sweep

    settings = json.loads((out / "frontier-settings.json").read_text())
    for key in keys:
        del settings["train"][key]
    (out / "frontier-settings.json").write_text(json.dumps(settings))
    monkeypatch.setattr(ouroboros_recipes.sweep, "train", lambda *a, **k: pytest.fail("trained again"))
    assert ouroboros(argv(world, out, "10", "--no-measure")) == 0
    capsys.readouterr()
    assert ouroboros(argv(world, out, "10", "--no-measure", *other)) == 2
    assert keys[0] in capsys.readouterr().err


def test_a_frontier_recorded_before_a_setting_existed_still_resumes(world, ouroboros, capsys, monkeypatch,
                                                                    one_thread):
    """A training setting the record lacks (tune_lr), at its default, is no difference; set otherwise, it is. A
    frontier recorded before --tune existed trained LoRA alone: it resumes with --tune none and the default (cuts) is
    refused, naming the setting."""
    import ouroboros_recipes.sweep

    out = world["root"] / "older"
    assert ouroboros(argv(world, out, "10", "--no-measure")) == 0  # --tune cuts, the default
    settings = json.loads((out / "frontier-settings.json").read_text())
    assert settings["tune"] == "cuts" and settings["train"]["tune_lr"] == 3e-3
    recorded_without(world, ouroboros, capsys, monkeypatch, out, ["tune_lr"], ["--tune-lr", "5e-4"])
    monkeypatch.undo()

    lora = world["root"] / "older-lora"
    assert ouroboros(argv(world, lora, "10", "--no-measure", "--tune", "none")) == 0
    settings = json.loads((lora / "frontier-settings.json").read_text())
    assert "tune_lr" not in settings["train"]  # nothing trained in full: no learning rate of its own
    del settings["tune"]
    (lora / "frontier-settings.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert ouroboros(argv(world, lora, "10", "--no-measure")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "tune: 'none', now 'cuts'" in err
    monkeypatch.setattr(ouroboros_recipes.sweep, "train", lambda *a, **k: pytest.fail("trained again"))
    assert ouroboros(argv(world, lora, "10", "--no-measure", "--tune", "none")) == 0


def test_distill_weight_trains_every_count_against_the_full_models_stored_predictions(world, ouroboros, capsys,
                                                                                      monkeypatch, one_thread):
    """--distill-weight reaches every count's run (KL to the full model's stored top-K beside the cross-entropy), the
    table says so, and a frontier recorded before the flag existed (no distill settings) resumes as undistilled."""
    out = world["root"] / "distilled"
    assert ouroboros(argv(world, out, "10", "--no-measure", "--distill-weight", "0.5", "--distill-top-k", "4")) == 0
    row = json.loads((out / "frontier.json").read_text())["rows"][0]
    run = out / "sweep" / "runs" / row["run"]
    tc = json.loads((run / "result.json").read_text())["train_config"]
    assert (tc["distill_weight"], tc["distill_top_k"], tc["distill_source"], tc["ce_weight"]) == (0.5, 4, "stored", 1.0)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kls = [m["kl"] for m in metrics if "kl" in m]
    assert kls and all(k > 0 for k in kls)  # the KL term was computed against a teacher unlike the pruned stack
    assert "distilled from the full model (KL to its top-4 predictions, stored, weight 0.5" in (
        out / "frontier.md").read_text()
    capsys.readouterr()
    assert ouroboros(argv(world, out, "10", "--no-measure")) == 2  # undistilled is another frontier
    assert "distill_weight: 0.5, now 0.0" in capsys.readouterr().err

    plain = world["root"] / "undistilled"
    assert ouroboros(argv(world, plain, "10", "--no-measure")) == 0
    run = plain / "sweep" / "runs" / json.loads((plain / "frontier.json").read_text())["rows"][0]["run"]
    assert not any("kl" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    recorded_without(world, ouroboros, capsys, monkeypatch, plain,  # as recorded before the frontier distilled
                     ["distill_weight", "distill_source", "distill_top_k", "ce_weight"], ["--distill-weight", "1"])


def test_rule_angular_drops_one_contiguous_span_per_count_as_planning_there_would(world, ouroboros, capsys,
                                                                                   one_thread):
    """--rule angular: one plan at the smallest count gives every count the span angular drops at that size (what
    `ouroboros plan --rules angular` at that count proposes); the rule is recorded, shown, and a rerun with another
    rule, or with a plan of another rule, is refused."""
    from ouroboros_lm.loading import load_base_model, load_tokenizer
    from ouroboros_lm.plan import PlanConfig, make_plan

    out = world["root"] / "angular"
    assert ouroboros(argv(world, out, "10,20", "--no-measure", "--rule", "angular")) == 0
    summary = json.loads((out / "frontier.json").read_text())
    assert json.loads((out / "plan.json").read_text())["rule"] == "angular"
    base, tok = load_base_model(world["base"]), load_tokenizer(world["base"])
    for row in summary["rows"]:
        pc = PlanConfig(base=world["base"], data=(world["train"],), keep=row["keep"], rules=("angular",), blocks=2,
                        seq_len=32, out=str(world["root"] / "unused.json"))
        assert row["layers"] == make_plan(pc, base, tok, world["base"], progress=False)["keep_layers"]
        dropped = sorted(set(range(30)) - set(row["layers"]))
        assert dropped == list(range(dropped[0], dropped[0] + 30 - row["keep"]))
    assert "chosen by the plan's angular rule" in (out / "frontier.md").read_text()
    capsys.readouterr()
    assert ouroboros(argv(world, out, "10,20", "--no-measure", "--rule", "block_influence")) == 2
    assert "chose its layers by angular" in capsys.readouterr().err
    assert ouroboros(argv(world, world["root"] / "mixed", "10", "--no-measure", "--rule", "ends",
                          "--plan", str(out / "plan.json"))) == 2
    assert "--rule ends, but" in capsys.readouterr().err and not (world["root"] / "mixed").exists()
