"""Issue #43's probe, tried as a hostile user would: plan files, prepared folders, stored teacher targets, metrics and
the demo. Each case is refused in one line naming the file or flag (exit 2 from the CLI), before anything outside the
user's intent is written or deleted, and in bounded memory."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from conftest import tiny_tokenizer, write_corpus
from ouroboros_lm.checkpoints import iter_metrics, truncate_metrics
from ouroboros_lm.reading import DataError


def peak_bytes(fn, *args) -> int:
    """The most memory (Python's allocations) `fn(*args)` held at once."""
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------- High
def test_a_manifest_padded_with_millions_of_empty_objects_is_refused_unparsed(tmp_path):
    from ouroboros_lm.prepare import prepare
    from ouroboros_lm.shards import MANIFEST_VALUES, Prepared

    prepare([str(write_corpus(tmp_path / "text", n_docs=8))], tmp_path / "p", tiny_tokenizer(), progress=False)
    path = tmp_path / "p" / "manifest.json"
    m = path.read_bytes().rstrip()
    assert m.endswith(b"}")  # "pad": [{}, {}, ...]: 3 bytes a value, ~30x that once parsed
    path.write_bytes(m[:-1] + b', "pad": [' + b"{}," * MANIFEST_VALUES + b"{}]}")
    with pytest.raises(DataError, match=r"manifest.json: this manifest holds about [\d,]+ values, more than the "):
        Prepared(tmp_path / "p")
    path.write_bytes(m)  # the folder as prepared still opens
    assert Prepared(tmp_path / "p").documents("train") > 0


def many_big_metrics_lines(run, n: int = 24, size: int = 1 << 20) -> None:
    """`n` records of (just under) a metrics line's 1 MiB limit each, the loss a number, the rest padding."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, n + 1):
            line = json.dumps({"step": step, "loss": 1.0 / step, "pad": ""})
            f.write(line[:-2] + "x" * (size - len(line) - 8) + '"}\n')


def test_resume_and_report_stream_metrics_in_the_memory_of_one_line(tmp_path):
    from ouroboros_recipes.sweep_plots import MAX_CURVE_POINTS, curve_points

    run = tmp_path / "run"
    many_big_metrics_lines(run)  # 24 MiB of records: held whole, a list of them would be > 24 MiB
    assert sum(1 for _ in iter_metrics(run)) == 24
    assert peak_bytes(lambda: [None for _ in iter_metrics(run)]) < 8 << 20
    assert peak_bytes(curve_points, run) < 8 << 20  # what `ouroboros report` plots
    assert curve_points(run)[:2] == [(1, 1.0), (2, 0.5)]
    assert peak_bytes(truncate_metrics, run, 12) < 8 << 20  # what `train --resume` rewrites
    assert [r["step"] for r in iter_metrics(run)] == list(range(1, 13))
    with open(run / "metrics.jsonl", "w") as f:  # many records: the plot keeps evenly spaced ones, no more
        f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(10 * MAX_CURVE_POINTS + 7))
    pts = curve_points(run)
    assert MAX_CURVE_POINTS // 2 <= len(pts) <= MAX_CURVE_POINTS and pts[0] == (0, 1.0)
    steps = [p[0] for p in pts]
    assert len({b - a for a, b in zip(steps, steps[1:])}) == 1


def tiny_plan(base: str, keep_layers: list[int], ranking: list[int] | None, recurrent_layer: int | None,
              num_layers: int = 8) -> dict:
    """A plan as `ouroboros plan` writes it, for the tiny base saved at `base`, by hand (no calibration)."""
    from transformers import AutoConfig

    from ouroboros_lm.adapter import architecture_hash
    from ouroboros_lm.plan import FORMAT

    rec = None if recurrent_layer is None else {"keep_layers": keep_layers, "recurrent_layer": recurrent_layer,
                                                "block_layers": 1}
    return {"format": FORMAT, "base": base, "num_layers": num_layers,
            "base_architecture_hash": architecture_hash(AutoConfig.from_pretrained(base)), "keep": len(keep_layers),
            "rule": "block_influence", "keep_layers": keep_layers, "loss": 5.0, "full_loss": 4.0, "ranking": ranking,
            "block_influence": [0.1] * num_layers, "candidates": [], "blocks": [], "recursion": rec}


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    """A tiny base, addresses of both sides of the demo's year split, and a settings file for 8 layers."""
    from conftest import save_tiny_base

    tmp = tmp_path_factory.mktemp("demo")
    base = save_tiny_base(tmp / "base")
    sotu = tmp / "sotu"
    sotu.mkdir()
    for name in ("1990_a.txt", "2010_b.txt"):
        (sotu / name).write_text("ba ko ri tu me sa lo ni de fa. " * 40)
    config = tmp / "demo.yaml"
    config.write_text(f"demo: {{base: {base}, corpus: {sotu}, mix: none, plan: none, domains: {tmp / 'none'}}}\n"
                      "model: {n_prelude: 2, recurrent_layer: 4, n_coda: 2, lora_rank: 2, variant: none, "
                      "max_depth: 8}\ntrain: {steps: 2, batch_size: 1, depths: [2]}\n"
                      "eval: {depths: [1, 2], blocks: 1, batch_size: 1}\ndata: {seq_len: 32}\n")
    return tmp, base, config


def earlier_demo(folder):
    """The folder an earlier demo left: its marker and a result."""
    from ouroboros_lm.atomic import write_marker

    folder.mkdir(parents=True)
    (folder / "eval.json").write_text("{}")
    write_marker(folder, "demo")
    return folder


@pytest.mark.parametrize("changes, needle", [
    ({"train": {"depths": (9,)}}, r"--train.depths must be an integer in \[1, max_depth=8\]; got 9"),
    ({"data": {"seq_len": 9000}}, r"--data.seq-len 9000 is longer than .*'s 256 positions"),
    ({"train": {"distill_top_k": 97}},
     r"--train.distill-top-k must be below .*'s vocabulary \(97\); got 97"),
    ({"demo": {"plan": "OTHER"}}, r"--plan .*other.json was made for another base \('elsewhere', 30 layers\)"),
    ({"demo": {"plan": "SIBLING"}}, r"--plan .*sibling.json was measured on other weights of this architecture"),
    ({"demo": {"plan": "PLAN", "heal_compute_layers": 5}},
     r"--heal-compute-layers 5: the equal-compute heal model would keep 10 of .*'s 8 layers by --plan .*plan.json's "
     r"ranking \(keep must be in \[1, 8\]; got 10\); lower --heal-compute-layers, or pass --no-heal-rows"),
])
def test_the_demo_checks_every_setting_and_its_plan_before_it_deletes_the_earlier_demo(demo_setup, tmp_path,
                                                                                      changes, needle):
    from ouroboros_recipes.demo import DemoRun, run_demo

    _, base, config = demo_setup
    good = tiny_plan(base, [0, 1, 3, 4, 6, 7], ranking=[0, 7, 1, 6, 4, 3, 2, 5], recurrent_layer=4)
    (tmp_path / "plan.json").write_text(json.dumps(good))
    (tmp_path / "other.json").write_text(json.dumps({**good, "base": "elsewhere", "num_layers": 30, "ranking": None}))
    from conftest import tiny_base
    from ouroboros_lm.surgery import part_fingerprints

    sibling = part_fingerprints(tiny_base(seed=1), range(8))  # the same architecture, other weights
    (tmp_path / "sibling.json").write_text(json.dumps({**good, "base_fingerprints": sibling}))
    out = earlier_demo(tmp_path / "demo")
    demo = {**changes.get("demo", {}), "out": str(out)}
    demo["plan"] = {"PLAN": str(tmp_path / "plan.json"), "OTHER": str(tmp_path / "other.json"),
                    "SIBLING": str(tmp_path / "sibling.json")}.get(
        demo.get("plan"), "none")
    with pytest.raises(ValueError, match=needle):
        run_demo(DemoRun.load(config, {**changes, "demo": demo}))
    assert (out / "eval.json").read_text() == "{}"  # the earlier demo's results are all still there


# ---------------------------------------------------------------------- Medium
def test_a_jsonl_line_nested_absurdly_deep_is_a_data_error_naming_the_line(tmp_path):
    from ouroboros_lm.reading import iter_documents

    (tmp_path / "deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl:2 is nested too deeply to be a document"):
        for _ in iter_documents([str(tmp_path / "deep.jsonl")]):
            pass


@pytest.fixture
def stored_set(tmp_path, monkeypatch):
    """A tiny teacher's top-4 predictions for 24 blocks of 16 tokens, one block a chunk (24 chunks)."""
    import numpy as np

    from conftest import tiny_base
    from ouroboros_lm import targets
    from ouroboros_lm.prepare import prepare
    from ouroboros_lm.shards import Prepared

    prepare([str(write_corpus(tmp_path / "text", n_docs=12))], tmp_path / "p", tiny_tokenizer(), progress=False)
    monkeypatch.setattr(targets, "CHUNK_TOKENS", 16)
    targets.teacher_pass(Prepared(tmp_path / "p"), tiny_base(), "tiny", 16, 4, blocks=np.arange(24), progress=False)
    return tmp_path / "p"


def open_files() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_stored_targets_hold_no_file_open_per_chunk(stored_set):
    import numpy as np

    from ouroboros_lm.targets import find_sets
    from ouroboros_lm.shards import Prepared

    prep = Prepared(stored_set)
    before = open_files()
    tset = find_sets(prep, 16, 4, {}, 97)  # 24 chunks: two files each were held open, 600 of them hit ulimit -n 1024
    assert len(tset.manifest["chunks"]) == 24 and open_files() <= before + 2
    ids, lp = tset.read(np.arange(24))
    assert ids.shape == (24, 16, 4) and np.isfinite(lp[..., :-1]).all() and open_files() <= before + 2


def test_nan_stored_log_probabilities_are_refused_when_read_naming_the_chunk(stored_set):
    import hashlib

    import numpy as np

    from ouroboros_lm.targets import find_sets
    from ouroboros_lm.shards import Prepared

    folder = next(stored_set.glob("teacher-*"))
    lp = np.fromfile(folder / "chunk-00003.lp", dtype="<f2")
    lp[5] = np.nan  # a chunk written wrong (its checksum matches: the pass stored what it computed)
    (folder / "chunk-00003.lp").write_bytes(lp.tobytes())
    m = json.loads((folder / "targets.json").read_text())
    m["chunks"][3]["sha256"]["lp"] = hashlib.sha256(lp.tobytes()).hexdigest()
    (folder / "targets.json").write_text(json.dumps(m))
    tset = find_sets(Prepared(stored_set), 16, 4, {}, 97)
    block = int(np.fromfile(folder / "chunk-00003.blocks", dtype="<i8")[0])
    tset.read(np.array([block + 1 if block < 23 else 0]))  # the other chunks read as before
    with pytest.raises(DataError, match=rf"chunk-00003.lp: the stored log-probabilities of block {block} are not a "
                                        r"distribution \(NaN, positive, or not summing to 1\)"):
        tset.read(np.array([0, block]))


# ---------------------------------------------------------------------- plans
@pytest.fixture(scope="module")
def plan_setup(tmp_path_factory):
    from conftest import save_tiny_base

    tmp = tmp_path_factory.mktemp("plan")
    return tmp, save_tiny_base(tmp / "base"), write_corpus(tmp / "text", n_docs=6, words=200)


def no_calibration(monkeypatch):
    """Make reading calibration text fail the test: a refusal must come before it."""
    from ouroboros_lm import plan

    def calibrated(*a, **k):
        raise AssertionError("the calibration ran before the refusal")

    monkeypatch.setattr(plan, "calibration", calibrated)


def one_error_line(capsys, needle: str) -> str:
    """The command's error: one line (after any progress bar a library drew), holding `needle`."""
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("ouroboros ")]
    assert len(lines) == 1 and needle in lines[0] and err[-1] == lines[0], err
    return lines[0]


@pytest.mark.parametrize("out, flags, needle", [
    ("config.json", [], "config.json already exists; pass --overwrite to replace it (nothing was written)"),
    ("config.json", ["--overwrite"], "config.json is not a plan `ouroboros plan` wrote; refusing to replace it"),
    ("afile/plan.json", [], "afile is not a folder (nothing was written)"),
    ("new.json", ["--seq-len", "9000"], "--seq-len 9000 is longer than the base's 256 positions"),
])
def test_plan_refuses_an_out_it_must_not_write_and_a_seq_len_past_the_base_before_calibrating(
        plan_setup, tmp_path, monkeypatch, capsys, out, flags, needle):
    from ouroboros_lm.cli import main

    _, base, text = plan_setup
    (tmp_path / "config.json").write_text('{"an adapter": "config"}')
    (tmp_path / "afile").write_text("a file")
    no_calibration(monkeypatch)
    assert main(["plan", "--base", base, "--data", str(text), "--keep", "5", "--out", str(tmp_path / out),
                 *flags]) == 2
    one_error_line(capsys, needle)
    assert (tmp_path / "config.json").read_text() == '{"an adapter": "config"}' and not (tmp_path / "new.json").exists()


def test_plan_overwrite_replaces_an_earlier_plan(plan_setup, tmp_path):
    from ouroboros_lm.cli import main
    from ouroboros_lm.plan import read_plan

    _, base, text = plan_setup
    args = ["plan", "--base", base, "--data", str(text), "--keep", "5", "--blocks", "1", "--seq-len", "32",
            "--rules", "ends", "--out", str(tmp_path / "plan.json")]
    assert main(args) == 0 and main(args) == 2
    assert main(args + ["--overwrite"]) == 0 and read_plan(tmp_path / "plan.json")["rule"] == "ends"


def planned(plan_setup, tmp_path, **changes):
    """A sound plan for the tiny base, with `changes`, written to a file; its path."""
    _, base, _ = plan_setup
    plan = {**tiny_plan(base, [0, 1, 3, 4, 6, 7], ranking=[0, 7, 1, 6, 4, 3, 2, 5], recurrent_layer=4), **changes}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.mark.parametrize("changes, needle", [
    ({"candidates": 5}, "candidates must be a list of at most 64 objects (one a rule); got int"),
    ({"candidates": [{"keep_layers": [0, 1]}] * 300_000}, "candidates must be a list of at most 64 objects"),
    ({"ranking": [False, True, 2, 3, 4, 5, 6, 7]}, "ranking must order the 8 layers once each (integers)"),
    ({"recursion": {"keep_layers": [0, 1, 2, 4, 6, 7], "recurrent_layer": 4, "block_layers": 1}},
     "recursion.keep_layers must be the plan's keep_layers"),
])
def test_a_plan_that_does_not_hold_together_is_refused_quickly_in_one_line(plan_setup, tmp_path, changes, needle):
    import time

    from ouroboros_lm.plan import read_plan

    path = planned(plan_setup, tmp_path, **changes)
    t0 = time.time()
    with pytest.raises(ValueError, match="--plan .*plan.json: " + needle.replace("(", r"\(").replace(")", r"\)")):
        read_plan(path)
    assert time.time() - t0 < 5


@pytest.mark.parametrize("kind, needle", [
    ("link", "plan.json: cannot read this plan"),
    ("fifo", "plan.json: this plan is not a regular file"),
    ("folder", "plan.json: this plan is not a regular file"),
])
def test_a_plan_that_is_a_link_fifo_or_folder_is_named_as_such_not_missing(tmp_path, kind, needle):
    import os

    from ouroboros_lm.plan import read_plan

    path = tmp_path / "plan.json"
    if kind == "link":
        (tmp_path / "real.json").write_text("{}")
        path.symlink_to(tmp_path / "real.json")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(ValueError, match="--plan .*" + needle):
        read_plan(path)


# ---------------------------------------------------------------------- prepare --teacher
@pytest.fixture(scope="module")
def prepare_setup(tmp_path_factory):
    from conftest import save_tiny_base

    tmp = tmp_path_factory.mktemp("prepare")
    return tmp, save_tiny_base(tmp / "base"), write_corpus(tmp / "text", n_docs=12)


@pytest.mark.parametrize("flags, needle", [
    (["--teacher", "BASE", "--seq-len", "257"], "--seq-len 257 is longer than --base BASE's 256 positions"),
    (["--seq-len", "16"], "--seq-len is for the teacher pass: give --teacher too"),
    (["--teacher-top-k", "8"], "--teacher-top-k is for the teacher pass: give --teacher too"),
    (["--teacher", "BASE", "--teacher-top-k", "96", "--seq-len", "16"],
     "--teacher-top-k 96: the teacher pass would hold about 0.1 GiB of predictions in memory, more than half the "
     "0.1 GiB available; lower --teacher-top-k"),
])
def test_prepare_refuses_teacher_settings_it_cannot_use_before_reading_any_text(prepare_setup, tmp_path, monkeypatch,
                                                                               capsys, flags, needle):
    from ouroboros_lm import memory
    from ouroboros_lm.cli import main

    _, base, text = prepare_setup
    monkeypatch.setattr(memory, "free_bytes", lambda device: 100 << 20)
    flags = [base if f == "BASE" else f for f in flags]
    assert main(["prepare", str(text), "--out", str(tmp_path / "p"), "--base", base, *flags]) == 2
    one_error_line(capsys, needle.replace("BASE", base))
    assert not (tmp_path / "p").exists()


def test_the_teacher_pass_refuses_predictions_the_disk_cannot_hold_before_computing_any(prepare_setup, monkeypatch):
    import shutil
    from collections import namedtuple

    import numpy as np

    from conftest import tiny_base
    from ouroboros_lm import targets
    from ouroboros_lm.prepare import prepare
    from ouroboros_lm.shards import Prepared

    tmp, _, text = prepare_setup
    prep = Prepared(prepare([str(text)], tmp / "disk", tiny_tokenizer(), progress=False) and tmp / "disk")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(1 << 30, 0, 1000))
    monkeypatch.setattr(targets, "teacher_predictions", lambda *a: pytest.fail("the teacher ran"))
    with pytest.raises(DataError, match=r"--teacher-top-k 8: the teacher's predictions for 64 tokens would take "
                                        r"about 0.0 GiB \(34 bytes a token\), more than the 0.0 GiB free under"):
        targets.teacher_pass(prep, tiny_base(), "tiny", 16, 8, blocks=np.arange(4), progress=False)


def test_prepare_takes_the_students_own_base_as_its_teacher_by_any_path(prepare_setup, tmp_path, monkeypatch, capsys):
    from ouroboros_lm.cli import main

    tmp, base, text = prepare_setup
    monkeypatch.chdir(tmp)  # --base by a relative path, --teacher by the absolute one: one tokenizer, two names
    assert main(["prepare", str(text), "--out", str(tmp_path / "p"), "--base", "base", "--teacher", base,
                 "--teacher-top-k", "4", "--seq-len", "16"]) == 0, capsys.readouterr().err
    assert next((tmp_path / "p").glob("teacher-*/targets.json")).is_file()


# ---------------------------------------------------------------------- exported folders
def test_an_export_whose_config_claims_fewer_per_step_lora_sets_than_its_weights_hold_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import TINY_SPLIT, randomize_trainables, save_tiny_base
    from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model
    from ouroboros_lm.adapter import save_adapter
    from ouroboros_lm.export import export_hf

    base = save_tiny_base(tmp_path / "base")
    cfg = OuroborosConfig(**{**TINY_SPLIT, "lora_rank": 2, "recurrent_lora": True, "recurrent_lora_steps": 2})
    model = OuroborosModel.from_base(load_base_model(base), cfg, base_name=base)
    randomize_trainables(model, scale=0.3)
    save_adapter(model, tmp_path / "ad")
    export_hf(tmp_path / "ad", tmp_path / "hf")
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # as exported: loads
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["ouroboros"]["recurrent_lora_steps"] = 1  # the second step's set would be dropped, silently
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"hf/model.safetensors holds weights its config.json builds nothing for "
                                         r"\(model\.recurrent.*\): the config was edited; refusing to load it"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_a_plan_measured_on_other_weights_of_the_same_architecture_is_refused(plan_setup, tmp_path, capsys):
    from conftest import save_tiny_base
    from ouroboros_lm.cli import main

    tmp, base, text = plan_setup
    sibling = save_tiny_base(tmp_path / "sibling", seed=1)  # the same architecture, other weights
    plan = tmp_path / "plan.json"
    assert main(["plan", "--base", base, "--data", str(text), "--keep", "5", "--blocks", "1", "--seq-len", "32",
                 "--rules", "ends", "--out", str(plan)]) == 0
    args = ["convert", "--plan", str(plan), "--heal-layers", "1", "--lora-rank", "2"]
    capsys.readouterr()
    assert main([*args, "--base", sibling, "--out", str(tmp_path / "ad")]) == 2
    one_error_line(capsys, "plan.json was measured on other weights of this architecture")
    assert not (tmp_path / "ad").exists()
    assert main([*args, "--base", base, "--out", str(tmp_path / "ad")]) == 0  # its own base: built


# ---------------------------------------------------------------------- Low
@pytest.mark.parametrize("key", ["seq_len", "top_k", "vocab_size"])
def test_true_where_a_targets_manifest_records_a_number_is_refused_naming_the_file(stored_set, key):
    from ouroboros_lm.targets import read_set_manifest

    path = next(stored_set.glob("teacher-*")) / "targets.json"
    m = json.loads(path.read_text())
    m[key] = True
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"targets.json is not a manifest of stored teacher targets"):
        read_set_manifest(path)


@pytest.mark.parametrize("name, ours", [
    ("tracking/ouroboros-lm/events.out.tfevents.1700000000.host.123.0", True),
    ("tracking/ouroboros-lm/1700000000.5/events.out.tfevents.1700000000.host.123.1", True),
    ("tracking/ouroboros-lm/1700000000.5/hparams.yml", True),
    ("tracking/mine/events.out.tfevents.1600000000.laptop", False),  # a user's own TensorBoard run
    ("tracking/ouroboros-lm/mine/deeper/events.out.tfevents.1", False),
])
def test_the_demo_deletes_only_the_tensorboard_files_its_runs_write(tmp_path, name, ours):
    from ouroboros_lm.atomic import check_removable
    from ouroboros_recipes.demo import DEMO_OUTPUTS

    out = earlier_demo(tmp_path / "demo")
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("events")
    if ours:
        check_removable(out, "demo", patterns=DEMO_OUTPUTS)
    else:
        with pytest.raises(ValueError, match="holds files we did not write"):
            check_removable(out, "demo", patterns=DEMO_OUTPUTS)


@pytest.mark.parametrize("flags, named", [
    (["--heal-layers", "4", "--lora-rank", "2"], "--heal-layers"),
    (["--recurrent-layer", "3"], "--recurrent-layer"),
    (["--n-prelude", "2", "--n-coda", "2"], "--n-prelude, --n-coda"),
    (["--keep-layers", "0,1,4,6,7", "--heal-layers", "1", "--lora-rank", "2"], "--keep-layers"),
])
def test_convert_refuses_split_flags_its_plan_would_override(plan_setup, tmp_path, capsys, flags, named):
    from ouroboros_lm.cli import main

    _, base, _ = plan_setup
    plan = planned(plan_setup, tmp_path)
    assert main(["convert", "--base", base, "--plan", str(plan), "--out", str(tmp_path / "ad"), "--rank", "2",
                 *flags]) == 2
    one_error_line(capsys, f"give --plan or {named}, not both: the plan decides the layers kept and looped")
    assert not (tmp_path / "ad").exists()


def test_a_plan_without_a_block_to_loop_names_the_block_size_not_the_keep_count(plan_setup, tmp_path):
    from ouroboros_lm import OuroborosConfig
    from ouroboros_lm.plan import planned_config, read_plan

    plan = read_plan(planned(plan_setup, tmp_path, recursion=None, keep=6, block_layers=5))
    with pytest.raises(ValueError, match=r"the plan's 6 layers hold no block of 5 consecutive layers to loop .* "
                                         r"\(it builds a heal model only: --heal-layers 1\)"):
        planned_config(plan, OuroborosConfig(variant="none"))


def test_convert_with_a_max_depth_below_the_default_depth_names_both_flags(plan_setup, tmp_path, capsys):
    from ouroboros_lm.cli import main

    _, base, _ = plan_setup
    args = ["convert", "--base", base, "--out", str(tmp_path / "ad"), "--n-prelude", "2", "--recurrent-layer", "4",
            "--n-coda", "2", "--rank", "2", "--max-depth", "4"]
    assert main(args) == 2
    one_error_line(capsys, "--default-depth 8 (its default) is past --max-depth 4: give a --default-depth in [1, 4] too")
    assert not (tmp_path / "ad").exists()
    assert main(args + ["--default-depth", "2"]) == 0


@pytest.mark.parametrize("depths, needle", [
    ("1,,2", "argument --depths: an empty value between commas in '1,,2'"),
    ("1,1,1", "--depths lists depth 1 more than once (each depth is one row)"),
])
def test_eval_depths_with_a_gap_or_a_repeat_are_refused(plan_setup, tmp_path, capsys, depths, needle):
    from ouroboros_lm.cli import main

    _, base, text = plan_setup
    assert main(["convert", "--base", base, "--out", str(tmp_path / "ad"), "--n-prelude", "2", "--recurrent-layer",
                 "4", "--n-coda", "2", "--rank", "2", "--max-depth", "4", "--default-depth", "2"]) == 0
    capsys.readouterr()
    try:
        code = main(["eval", "--adapter", str(tmp_path / "ad"), "--data", str(text), "--depths", depths])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2 and needle in capsys.readouterr().err


def test_a_teacher_name_with_terminal_escapes_is_shown_escaped(stored_set):
    from ouroboros_lm.reading import printable
    from ouroboros_lm.shards import Prepared
    from ouroboros_lm.targets import CorpusTargets, find_sets

    path = next(stored_set.glob("teacher-*")) / "targets.json"
    m = json.loads(path.read_text())
    m["teacher"] = "\x1b[2J\x1b[31mevil\rname"
    path.write_text(json.dumps(m))
    shown = CorpusTargets([find_sets(Prepared(stored_set), 16, 4, {}, 97)], [0]).describe()
    assert "\x1b" not in shown and "\r" not in shown and r"\x1b[2J\x1b[31mevil\rname" in shown
    assert printable("plain name/é") == "plain name/é"


@pytest.mark.parametrize("command", [["export", "--out", "OUT"], ["generate", "--prompt", "ba ko", "--max-new-tokens",
                                                                   "2"]])
@pytest.mark.parametrize("depth", ["3", "auto"])
def test_a_heal_model_refuses_a_depth_in_export_and_generate(plan_setup, tmp_path, capsys, command, depth):
    from ouroboros_lm.cli import main

    _, base, _ = plan_setup
    if command[0] == "export" and depth == "auto":
        return  # export takes a number only
    assert main(["convert", "--base", base, "--out", str(tmp_path / "heal"), "--n-prelude", "2", "--recurrent-layer",
                 "4", "--n-coda", "2", "--heal-layers", "1", "--lora-rank", "2"]) == 0
    capsys.readouterr()
    args = [str(tmp_path / "hf") if a == "OUT" else a for a in command]
    assert main([args[0], "--adapter", str(tmp_path / "heal"), *args[1:], "--depth", depth]) == 2
    one_error_line(capsys, f"--depth {depth}: a heal model runs its kept layers once and has no depth; leave --depth out")
    assert not (tmp_path / "hf").exists()


def test_plan_estimates_its_memory_up_front_and_its_out_of_memory_advice_names_its_own_flags(plan_setup, tmp_path,
                                                                                           monkeypatch, capsys):
    from ouroboros_lm import memory, plan
    from ouroboros_lm.cli import main

    _, base, text = plan_setup
    args = ["plan", "--base", base, "--data", str(text), "--keep", "5", "--out", str(tmp_path / "plan.json")]
    no_calibration(monkeypatch)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 100 << 20)
    assert main(args + ["--blocks", "4096"]) == 2  # 12 x 4096 blocks x 128 tokens x 64 floats: ~1.5 GiB
    one_error_line(capsys, "--blocks 4096 of --seq-len 128 tokens: the plan would hold about 1.5 GiB of hidden states "
                           "(8 layers' inputs), more than half the 0.1 GiB available; lower --blocks or --seq-len")

    def out_of_memory(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(plan, "make_plan", out_of_memory)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "lower --blocks or --seq-len" in err and "--batch-size" not in err
