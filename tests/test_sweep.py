"""A tiny grid end to end: every file and plot, resumable after a run is cut short."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml

from conftest import save_tiny_base, write_corpus
from ouroboros_lm.evaluate import gap_recovered
from ouroboros_recipes.sweep import SweepSpec, run_sweep

PLOTS = ["training_curves.png", "gap_by_variant_depth.png", "gap_by_rank.png", "controller_heatmaps.png", "controller_spread.png"]


def test_tiny_grid_runs_resumes_and_reports(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "text", n_docs=12)
    spec = {
        "name": "tiny", "base": base, "split": {"n_prelude": 2, "recurrent_layer": 4, "n_coda": 2},
        "data": {"train": [str(data)], "seq_len": 32, "heldout_fraction": 0.2},
        "train": {"steps": 4, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "save_every": 1, "eval_every": 2,
                  "eval_blocks": 2, "log_every": 1},
        "eval": {"depths": [1, 2], "blocks": 2, "modulation_inputs": 2},
        "defaults": {"rank": 4, "depths": [1, 2]},
        "grid": {"variant": ["controller", "static"], "gate": [True, False]},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    names = [r.name for r in SweepSpec.load(path).expand()]
    assert len(names) == 4
    out = run_sweep(path, out=tmp_path / "sweep", progress=False)
    for f in ["results.csv", "results.json", "results.md", "reference.json"] + PLOTS:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["name"] for r in rows) == sorted(names)
    assert all(v not in ("", None) for r in rows for v in r.values())
    assert {"heldout_gap_recovered_pct@1", "heldout_loss@2"} <= set(rows[0])

    # cut one run short: drop its result and its newest checkpoint, as if killed during step 4
    victim = out / "runs" / names[1]
    (victim / "result.json").unlink()
    for ck in sorted((victim / "checkpoints").iterdir())[1:]:
        shutil.rmtree(ck)
    keep = {n: (out / "runs" / n / "result.json").stat().st_mtime_ns for n in names if n != names[1]}
    run_sweep(path, out=out, progress=False)
    for n, mtime in keep.items():
        assert (out / "runs" / n / "result.json").stat().st_mtime_ns == mtime  # finished runs skipped
    steps = [m["step"] for m in map(json.loads, (victim / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == [1, 2, 3, 4]  # resumed from step 3, no step repeated
    assert json.loads((victim / "result.json").read_text())["steps"] == 4


def test_bad_spec_is_refused(tmp_path):
    import pytest

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "base": "b", "split": {}, "data": {"train": ["a"]}, "grid": {"colour": [1]}}))
    with pytest.raises(ValueError, match="'colour' cannot vary in a sweep"):
        SweepSpec.load(p)
    p.write_text(yaml.safe_dump({"name": "x", "base": "b", "split": {"n_prelude": -1}, "data": {"train": ["a"]}, "runs": [{}]}))
    with pytest.raises(ValueError, match=r"n_prelude must be in \[0, 1024\]; got -1"):
        SweepSpec.load(p)
    # a typo in the shared training settings is found before anything is loaded or run
    p.write_text(yaml.safe_dump({"name": "x", "base": "b", "split": {}, "data": {"train": ["a"]}, "train": {"stpes": 3},
                                 "runs": [{}]}))
    with pytest.raises(ValueError, match="unknown train setting.*stpes"):
        SweepSpec.load(p)


def test_seeds_and_domains_give_a_summary_with_spread(tmp_path):
    """Every configuration once per seed (different initialisation and data order), evaluation-only
    domains scored like the held-out split, and a summary whose mean and std are those of the seeds'
    own results; the Controller's input dependence is reported, 0 <= it <= 1."""
    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "text", n_docs=12)
    other = write_corpus(tmp_path / "other", n_docs=3, seed=5)
    spec = {
        "name": "seeded", "base": base, "split": {"n_prelude": 2, "recurrent_layer": 4, "n_coda": 2},
        "data": {"train": [str(data)], "seq_len": 32, "heldout_fraction": 0.2, "domains": {"other": [str(other)]}},
        "train": {"steps": 2, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2, "eval_blocks": 2},
        "eval": {"depths": [2], "blocks": 2, "modulation_inputs": 2},
        "defaults": {"rank": 4, "depths": [2]},
        "runs": [{"variant": "controller", "pooling": "mean_and_token"}, {"variant": "none", "lora_rank": 2}],
        "seeds": [3, 4],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = SweepSpec.load(path).expand()
    assert [r.seed for r in runs] == [3, 3, 4, 4] and len({r.name for r in runs}) == 4
    out = run_sweep(path, out=tmp_path / "sweep", progress=False)
    results = {r.name: json.loads((out / "runs" / r.name / "result.json").read_text()) for r in runs}
    a, b = (results[r.name] for r in runs if r.config_name == runs[0].config_name)
    assert a["config"]["init_seed"] == 3 and b["config"]["init_seed"] == 4
    assert a["losses"]["other"]["ouroboros@2"] != b["losses"]["other"]["ouroboros@2"]
    assert set(a["reference"]) >= {"train", "heldout", "other"}
    dep = a["modulation_spread"]["heldout"]["input_dependence"]
    assert 0 < dep <= 1 and results[runs[1].name]["modulation_spread"] is None
    summary = {e["config"]: e for e in json.loads((out / "summary.json").read_text())}
    entry = summary[runs[0].config_name]
    mean, std, per_seed = entry["gap"]["other@2"]
    gaps = [gap_recovered(r["losses"]["other"]["ouroboros@2"], r["reference"]["other"]["baseline"],
                          r["reference"]["other"]["full"]) for r in (a, b)]
    assert per_seed == pytest.approx(gaps) and mean == pytest.approx(sum(gaps) / 2)
    assert std == pytest.approx(abs(gaps[0] - gaps[1]) / 2 ** 0.5)
    assert "other" in (out / "summary.md").read_text()


def test_a_domain_added_to_a_finished_sweep_is_evaluated_without_training_again(tmp_path):
    """Adding `data.domains` entries to a finished sweep evaluates the saved adapters on them: the
    numbers equal those of a sweep that had the domain from the start, the earlier numbers and the
    training are untouched, and the run's own eval.json gains the split."""
    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "text", n_docs=12)
    other = write_corpus(tmp_path / "other", n_docs=3, seed=5)
    spec = {
        "name": "grow", "base": base, "split": {"n_prelude": 2, "recurrent_layer": 4, "n_coda": 2},
        "data": {"train": [str(data)], "seq_len": 32, "heldout_fraction": 0.2},
        "train": {"steps": 2, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2, "eval_blocks": 2},
        "eval": {"depths": [2], "blocks": 2, "modulation_inputs": 2},
        "defaults": {"rank": 4, "depths": [2], "variant": "controller"},
        "runs": [{}],
    }
    before, after = tmp_path / "before.yaml", tmp_path / "after.yaml"
    before.write_text(yaml.safe_dump(spec))
    spec["data"]["domains"] = {"other": [str(other)]}
    after.write_text(yaml.safe_dump(spec))
    name = SweepSpec.load(after).expand()[0].name

    grown = run_sweep(before, out=tmp_path / "grown", progress=False)
    rdir = grown / "runs" / name
    first = json.loads((rdir / "result.json").read_text())
    assert "other" not in first["losses"]
    trained = {f: (rdir / f).stat().st_mtime_ns for f in ("metrics.jsonl", "adapter_model.safetensors")}
    run_sweep(after, out=grown, progress=False)
    grew = json.loads((rdir / "result.json").read_text())
    assert {f: (rdir / f).stat().st_mtime_ns for f in trained} == trained  # not trained again
    for split in ("train", "heldout"):
        assert grew["losses"][split] == first["losses"][split]
    assert "other" in grew["reference"] and "other" in grew["modulation_spread"]
    assert "other" in json.loads((rdir / "eval.json").read_text())["splits"]

    fresh = json.loads((run_sweep(after, out=tmp_path / "fresh", progress=False) / "runs" / name / "result.json")
                       .read_text())
    assert grew["losses"]["other"] == pytest.approx(fresh["losses"]["other"], abs=1e-6)
    assert grew["reference"]["other"] == pytest.approx(fresh["reference"]["other"], abs=1e-6)


def test_bad_domains_and_seeds_are_refused(tmp_path):
    p = tmp_path / "s.yaml"
    for data, extra, message in (({"domains": {"heldout": ["x"]}}, {}, "cannot be named heldout"),
                                 ({"domains": {"x": []}}, {}, "non-empty list"),
                                 ({}, {"seeds": [1, -2]}, "seeds must be a list")):
        p.write_text(yaml.safe_dump({"name": "x", "base": "b", "split": {}, "data": {"train": ["a"], **data},
                                     "runs": [{"variant": "none"}], **extra}))
        with pytest.raises(ValueError, match=message):
            SweepSpec.load(p)


def _fake_run(sweep, config, seed, losses, reference):
    rdir = sweep / "runs" / f"{config}-seed{seed}"
    rdir.mkdir(parents=True)
    (rdir / "result.json").write_text(json.dumps({
        "name": rdir.name, "config_name": config, "seed": seed, "trainable_parameters": 10,
        "losses": {s: {"ouroboros@4": v} for s, v in losses.items()}, "reference": reference}))


def test_two_sweeps_are_compared_paired_by_seed_on_the_text_they_share(tmp_path):
    """`report --against`: per seed, gap recovered here minus there, only on splits scored on the same
    blocks (same full / baseline losses); a split on different text is named and left out."""
    from ouroboros_recipes.report import compare_sweeps

    ref = {"heldout": {"full": 2.0, "baseline": 6.0}, "train": {"full": 2.0, "baseline": 6.0}}
    other_ref = {"heldout": {"full": 2.0, "baseline": 6.0}, "train": {"full": 3.0, "baseline": 7.0}}
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, (here, there) in enumerate([(4.0, 4.4), (3.6, 4.4), (5.0, 5.0)]):
        _fake_run(a, "cfg", seed, {"heldout": here, "train": 4.0}, ref)
        if seed < 2:  # seed 2 only here: not paired
            _fake_run(b, "cfg", seed, {"heldout": there, "train": 4.0}, other_ref)
    out = compare_sweeps(a, b)
    [entry] = json.loads(out.with_suffix(".json").read_text())
    mean, std, per_seed = entry["paired"]["heldout@4"]
    assert per_seed == pytest.approx([10.0, 20.0])  # (4.4 - 4.0) / 4 and (4.4 - 3.6) / 4, in points
    assert mean == pytest.approx(15.0) and std == pytest.approx(50 ** 0.5)
    assert "train@4" not in entry["paired"] and entry["seeds"] == [0, 1]
    assert "Not compared, scored on different text in the two sweeps: train" in out.read_text()
    only_train = {"train": other_ref["train"]}
    c = tmp_path / "c"
    _fake_run(c, "cfg", 0, {"train": 4.0}, only_train)
    with pytest.raises(ValueError, match="share no split scored on the same blocks"):
        compare_sweeps(a, c)


def test_heal_runs_stand_beside_the_recursion_paired_by_seed(tmp_path):
    """A heal run (no recursion) in a sweep: one row per split, scored against the sweep's own pruned
    baseline and full model, shown at every depth the recursion was evaluated at, and paired seed by
    seed with it when named as the --reference."""
    from ouroboros_recipes.report import write_report

    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "text", n_docs=12)
    spec = {
        "name": "heal", "base": base, "split": {"n_prelude": 2, "recurrent_layer": 4, "n_coda": 2},
        "data": {"train": [str(data)], "seq_len": 32, "heldout_fraction": 0.2},
        "train": {"steps": 2, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2, "eval_blocks": 2},
        "eval": {"depths": [1, 2], "blocks": 2, "modulation_inputs": 2},
        "defaults": {"rank": 4, "depths": [2]},
        "runs": [{"variant": "static"}, {"heal_layers": 1, "lora_rank": 1}],
        "seeds": [0, 1],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = run_sweep(path, out=tmp_path / "sweep", progress=False)
    runs = SweepSpec.load(path).expand()
    results = {r.name: json.loads((out / "runs" / r.name / "result.json").read_text()) for r in runs}
    heal = [r for r in runs if "heal_layers" in r.name]
    assert all(set(results[r.name]["losses"]["heldout"]) == {"full", "baseline", "heal"} for r in heal)
    ref = results[heal[0].name]["reference"]["heldout"]
    assert ref == results[runs[0].name]["reference"]["heldout"]  # the same references as the recursion's
    with pytest.raises(ValueError, match="names 0 of the configurations"):
        write_report(out, reference="no-such-configuration")
    write_report(out, reference="heal_layers1")
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["config"] == heal[0].config_name
    recursion = summary[1]
    for depth in (1, 2):
        expected = [gap_recovered(results[r.name]["losses"]["heldout"][f"ouroboros@{depth}"], ref["baseline"], ref["full"])
                    - gap_recovered(results[h.name]["losses"]["heldout"]["heal"], ref["baseline"], ref["full"])
                    for r, h in zip([r for r in runs if r not in heal], heal)]
        assert recursion["paired"][f"heldout@{depth}"][2] == pytest.approx(expected)
    assert "heal_layers1" in (out / "results.md").read_text()


def test_a_sweep_mixes_named_sources_by_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path))
    base = save_tiny_base(tmp_path / "base")
    write_corpus(tmp_path / "a", n_docs=3)
    write_corpus(tmp_path / "b", n_docs=9, seed=1)
    spec = {"name": "mix", "base": base, "split": {"n_prelude": 2, "recurrent_layer": 4, "n_coda": 2},
            "data": {"train": ["a={cache}/a:1", "b={cache}/b:3"], "heldout": [str(write_corpus(tmp_path / "h", 2, 2))],
                     "seq_len": 16},
            "train": {"steps": 2, "batch_size": 4, "grad_accum": 4, "log_every": 2, "eval_every": 2, "eval_blocks": 2},
            "eval": {"depths": [1], "blocks": 2, "modulation_inputs": 2}, "runs": [{"variant": "static", "rank": 4,
                                                                                    "depths": [1]}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert SweepSpec.load(path).sources("train") == [f"a={tmp_path}/a:1", f"b={tmp_path}/b:3"]
    out = run_sweep(path, out=tmp_path / "sweep", progress=False)
    (metrics,) = (out / "runs").glob("*/metrics.jsonl")
    rec = [json.loads(line) for line in open(metrics) if '"loss"' in line][-1]
    assert rec["tokens_seen/a"] + rec["tokens_seen/b"] == 2 * 16 * 16  # 2 steps of 16 blocks of 16 tokens
    assert rec["tokens_seen/b"] > 2 * rec["tokens_seen/a"]  # b weighs 3, a 1
    spec["data"]["train"] = ["a={cache}/a:1", "b={cache}/b"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="give every source a weight"):
        SweepSpec.load(path)


def test_the_floor_is_the_specs_split_whatever_layers_the_first_run_keeps(tmp_path):
    """Every gap is measured from the spec's split: a first run that keeps other layers (`keep_layers`, e.g. a
    plan's) does not make the sweep's pruned baseline its own (issue #44 found a sweep whose first run was planned
    scoring every run from the planned 15 layers)."""
    from ouroboros_lm.runtime import choose_runtime
    from ouroboros_recipes.reference import read_reference
    from ouroboros_recipes.sweep import reference_losses, sweep_corpus

    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "text", n_docs=8)
    spec = {
        "name": "floor", "base": base, "split": {"n_prelude": 2, "recurrent_layer": 4, "n_coda": 2},
        "data": {"train": [str(data)], "seq_len": 32, "heldout_fraction": 0.2},
        "eval": {"depths": [1], "blocks": 2, "modulation_inputs": 2},
        "defaults": {"rank": 4, "variant": "none"},
        "runs": [{"keep_layers": [0, 2, 4, 6, 7]}, {}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = SweepSpec.load(path)
    runtime = choose_runtime()
    corpus, splits, ev = sweep_corpus(loaded, runtime)
    runs = loaded.expand()
    refs = []
    for name, order in (("planned-first", runs), ("split-first", runs[::-1])):
        out = tmp_path / name
        out.mkdir()
        refs.append(reference_losses(loaded, order, splits, out, ev, runtime, False, read_reference(out), corpus))
    for split in splits:
        assert refs[0][split] == refs[1][split]
