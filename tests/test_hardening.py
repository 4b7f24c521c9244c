"""Crashes, NaNs, typos and bad configurations lose nothing and explain themselves."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY, TINY_SPLIT, save_tiny_base, tiny_base, tiny_tokenizer, write_corpus
from ouroboros_lm import load_adapter, save_adapter
from ouroboros_lm import OuroborosConfig, OuroborosModel, RecursionPolicy
from ouroboros_lm.cli import build_parser
from ouroboros_lm.data import build_corpus
from ouroboros_lm.checkpoints import list_checkpoints, read_metrics
from ouroboros_lm.train import TrainConfig, TrainingError, train

SPLIT = ["--n-prelude", "2", "--recurrent-layer", "4", "--n-coda", "2", "--rank", "4", "--style-dim", "8",
         "--controller-hidden", "8", "--max-depth", "8", "--default-depth", "2"]


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "ouroboros_lm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def setup(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "text", n_docs=12)
    return tmp_path, base, data


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "text", n_docs=12)
    return tmp_path, base, data, converted(tmp_path, base, "ad")


def converted(tmp_path, base, name):
    ad = tmp_path / name
    r = cli("convert", "--base", base, "--out", str(ad), *SPLIT)
    assert r.returncode == 0, r.stderr
    return ad


TRAIN = ["--seq-len", "32", "--steps", "6", "--batch-size", "2", "--save-every", "1", "--eval-every", "3",
         "--warmup-steps", "1", "--lr", "3e-3", "--log-every", "1", "--depths", "1,2"]


def test_sigkill_while_saving_then_resume_matches_uninterrupted(setup):
    tmp_path, base, data = setup
    a = converted(tmp_path, base, "a")
    assert cli("train", "--adapter", str(a), "--data", str(data), *TRAIN).returncode == 0
    b = converted(tmp_path, base, "b")
    r = cli("train", "--adapter", str(b), "--data", str(data), *TRAIN, env={"OUROBOROS_FAULT": "kill:save:4"})
    assert r.returncode == -9  # SIGKILL, mid-save of step 4
    done = [p.name for p in list_checkpoints(b)]
    assert done[-1] == "step_000003"  # the torn step-4 save is not taken for a checkpoint
    r = cli("train", "--adapter", str(b), "--data", str(data), *TRAIN, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    la = [m["loss"] for m in read_metrics(a) if "loss" in m]
    lb = [m["loss"] for m in read_metrics(b) if "loss" in m]
    assert len(la) == len(lb) == 6
    assert la == lb  # the same computations, in the same order: bit-identical, as the weights below
    from safetensors.torch import load_file

    wa = load_file(a / "checkpoints" / "step_000006" / "adapter_model.safetensors")
    wb = load_file(b / "checkpoints" / "step_000006" / "adapter_model.safetensors")
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical weights


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    corpus = build_corpus([str(write_corpus(tmp_path / "t", n_docs=12))], tiny_tokenizer(), 32, heldout_fraction=0.2)
    model = OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**TINY_SPLIT))
    run = tmp_path / "run"
    save_adapter(model, run)

    def poison(step, micro, idx):
        if step == 4:  # the 5th step
            with torch.no_grad():
                model.recurrent.gate.weight_new.fill_(float("nan"))

    tc = TrainConfig(steps=10, batch_size=2, save_every=2, eval_every=100, log_every=1, progress=False, depths=(2,))
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5.*last good checkpoint is .*step_000004"):
        train(model, corpus, run, tc, on_batch=poison)
    assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000004"]
    for ckpt in list_checkpoints(run):  # nothing corrupt: every checkpoint loads and is finite
        loaded = load_adapter(ckpt, base=tiny_base("llama"))
        assert all(torch.isfinite(p).all() for p in loaded.trainable_state_dict().values())
    assert all(m["step"] <= 4 for m in read_metrics(run))


def test_out_of_memory_gets_a_clear_message(tmp_path, monkeypatch):
    corpus = build_corpus([str(write_corpus(tmp_path / "t", n_docs=12))], tiny_tokenizer(), 32, heldout_fraction=0.2)
    model = OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**TINY_SPLIT))
    save_adapter(model, tmp_path / "run")

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(TrainingError, match="out of memory .* micro-batch of 2 x 32 tokens.*Lower --batch-size"):
        train(model, corpus, tmp_path / "run", TrainConfig(steps=2, batch_size=2, progress=False))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--adapter", "/no/such/adapter", "--data", "x.txt"], "adapter folder not found: /no/such/adapter"),
        (["train", "--adapter", "ADAPTER", "--data", "/no/such/data.txt"], "data source not found: /no/such/data.txt"),
        (["train", "--adapter", "ADAPTER", "--data", "DATA", "--steps", "many"], "argument --steps: expected an integer"),
        (["train", "--adapter", "ADAPTER", "--data", "DATA", "--steps", "0"], "steps must be in [1, "),
        (["convert", "--base", "BASE", "--out", "OUT", "--variant", "dynamic"], "argument --variant: invalid choice"),
        (["convert", "--base", "BASE", "--out", "OUT", "--recurrent-layer", "7", "--n-prelude", "2", "--n-coda", "2"],
         "recurrent_layer must lie between the prelude and the coda, in [2, 5]"),
        (["convert", "--base", "/no/such/model", "--out", "OUT"], "base model not found"),
        (["eval", "--adapter", "ADAPTER", "--data", "DATA", "--depths", "1,x"], "expected comma-separated integers"),
        (["generate", "--adapter", "ADAPTER", "--prompt", "hi", "--depth", "99"], "--depth must be an integer in [1, max_depth=8]"),
    ],
)
def test_cli_errors_exit_2_with_one_line(cli_setup, args, needle):
    tmp_path, base, data, ad = cli_setup
    subst = {"ADAPTER": str(ad), "DATA": str(data), "BASE": base, "OUT": str(tmp_path / "out")}
    r = cli(*[subst.get(a, a) for a in args])
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("Loading weights")]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr


def test_every_flag_documents_its_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == {"convert", "plan", "prepare", "train", "train-halter", "eval", "eval-exits", "generate", "export", "harness",
                                "sweep", "report", "demo", "frontier"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
                if not action.required:
                    assert "(default:" in p._get_formatter()._expand_help(action) or "%(default)" in action.help, (name, action.dest)


# ---------------------------------------------------------------- property-based configuration test
def is_valid(kw: dict, L: int = 8) -> bool:
    P, C, R = kw["n_prelude"], kw["n_coda"], kw["recurrent_layer"]
    if P + C + 1 > L or not P <= R <= L - C - 1:
        return False
    if (kw["loop_start"] == "stack" and not kw["gate"]) or (kw["loop_start"] == "rezero" and kw["gate"]):
        return False  # the later steps of a loop started at its stack: behind the gate (stack), or a scale (rezero)
    if kw["variant"] != "none":
        if P + C + 1 == L:  # nothing removed: no residual for the SVD bases
            return False
        if kw["rank"] > 32:  # smallest side of the tiny model's projections (k/v: 2 heads x 16)
            return False
    return 1 <= kw["default_depth"] <= kw["max_depth"]


configs = st.fixed_dictionaries({
    "n_prelude": st.integers(0, 8), "n_coda": st.integers(0, 8), "recurrent_layer": st.integers(0, 9),
    "rank": st.integers(1, 40), "variant": st.sampled_from(["controller", "static", "none"]),
    "pooling": st.sampled_from(["prefix_mean", "token", "sequence_mean"]), "gate": st.booleans(),
    "step_norm": st.booleans(), "max_depth": st.integers(1, 6),
    "loop_start": st.sampled_from(["gate", "stack", "rezero"]),
    "default_depth": st.integers(0, 7),
    "alpha": st.floats(0.5, 32), "gate_bias": st.floats(-4, 4), "style_dim": st.integers(1, 8),
    "controller_hidden": st.integers(1, 8),
})

BASE = tiny_base("qwen2")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_every_valid_configuration_runs_and_every_invalid_one_is_refused(kw):
    base = copy.deepcopy(BASE)
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    valid = is_valid(kw)
    kw = dict(kw)
    policy_kw = {"default_depth": kw.pop("default_depth")}
    if valid:
        policy = RecursionPolicy(**policy_kw)
    elif policy_kw["default_depth"] == 0:  # the policy's own range: refused when it is made
        with pytest.raises(ValueError, match=r"default_depth must be in \[1, 1024\]"):
            RecursionPolicy(**policy_kw)
        return
    if not valid:
        with pytest.raises(ValueError):
            OuroborosModel.from_base(base, OuroborosConfig(**kw), policy=RecursionPolicy(**policy_kw))
        assert len(base.model.layers) == 8  # refused before touching the weights
        return
    model = OuroborosModel.from_base(base, OuroborosConfig(**kw), policy=policy).eval()
    with torch.no_grad():
        out = model(ids, labels=ids)  # at default_depth
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


# ---------------------------------------------------------------- issue #35: planted files, damaged checkpoints, edits
from ouroboros_lm.cli import main  # noqa: E402

QUICK = ["--seq-len", "32", "--steps", "2", "--batch-size", "2", "--save-every", "1", "--eval-every", "2",
         "--eval-blocks", "2", "--warmup-steps", "1", "--log-every", "1", "--depths", "1,2"]


@pytest.fixture(scope="module")
def made35(tmp_path_factory):
    """A tiny base, its text, and a converted adapter (by the CLI, in this process)."""
    root = tmp_path_factory.mktemp("issue35")
    base = save_tiny_base(root / "base")
    data = write_corpus(root / "text", n_docs=12)
    assert main(["convert", "--base", base, "--out", str(root / "ad"), *SPLIT]) == 0
    return root, base, data


def adapter35(made35, tmp_path, name="ad"):
    assert main(["convert", "--base", made35[1], "--out", str(tmp_path / name), *SPLIT]) == 0
    return tmp_path / name


def one_line(capsys, needle: str) -> str:
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("ouroboros")]
    assert len(err) == 1 and needle in err[0], err
    return err[0]


@pytest.mark.parametrize("name", ["metrics.jsonl", ".lock"])
@pytest.mark.parametrize("kind", ["hard link", "fifo"])
def test_a_hard_link_or_fifo_planted_as_a_run_file_is_refused_before_any_step(made35, tmp_path, capsys, name, kind):
    ad = adapter35(made35, tmp_path)
    victim = tmp_path / "victim.txt"
    if kind == "hard link":
        victim.write_text("precious\n")
        os.link(victim, ad / name)
    else:
        os.mkfifo(ad / name)  # opening it for writing would hang
    assert main(["train", "--adapter", str(ad), "--data", str(made35[2]), *QUICK]) == 2
    one_line(capsys, f"{name} has 2 hard links" if kind == "hard link" else f"{name} is not a regular file")
    assert not (ad / "checkpoints").exists()
    if kind == "hard link":
        assert victim.read_text() == "precious\n"


def test_a_fifo_swapped_in_after_the_check_does_not_hang_the_open(tmp_path, monkeypatch):
    from ouroboros_lm import atomic

    os.mkfifo(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(atomic, "check_own_file", lambda path, what="file": None)  # the race: checked, then swapped
    with pytest.raises((ValueError, OSError), match="metrics.jsonl"):
        atomic.open_own_file(tmp_path / "metrics.jsonl", os.O_RDWR | os.O_APPEND | os.O_CREAT, "metrics file")


def test_a_fifo_named_like_a_prepare_file_is_refused_not_opened(tmp_path, capsys):
    src = write_corpus(tmp_path / "text", n_docs=6)
    out = tmp_path / "prep"
    out.mkdir()
    os.mkfifo(out / ".prepare-state.json")
    assert main(["prepare", str(src), "--out", str(out), "--base", save_tiny_base(tmp_path / "base")]) == 2
    one_line(capsys, ".prepare-state.json is not a regular file")


@pytest.mark.parametrize("edit, field", [
    ({"recurrent_layer": 40}, "recurrent_layer"), ({"block_layers": 99}, "block_layers"),
    ({"n_coda": 40}, "n_coda"), ({"keep_layers": [0, 1, 4, 6, 7, 40]}, "keep_layers"),
])
def test_an_adapter_whose_split_reaches_past_the_base_is_refused_in_one_line(made35, tmp_path, capsys, edit, field):
    import json

    ad = adapter35(made35, tmp_path)
    path = ad / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["ouroboros_config"].update(edit)
    path.write_text(json.dumps(meta))
    assert main(["generate", "--adapter", str(ad), "--prompt", "ba", "--max-new-tokens", "2"]) == 2
    line = one_line(capsys, "adapter_config.json: its ouroboros_config does not fit the base's 8 layers")
    assert field in line
    assert main(["export", "--adapter", str(ad), "--out", str(tmp_path / "hf")]) == 2
    one_line(capsys, "does not fit the base's 8 layers")


def trained35(made35, tmp_path, *extra):
    ad = adapter35(made35, tmp_path)
    assert main(["train", "--adapter", str(ad), "--data", str(made35[2]), *QUICK, *extra]) == 0
    return ad


def test_convert_overwrite_refuses_a_trained_folder_and_resume_refuses_another_models_checkpoint(made35, tmp_path,
                                                                                                  capsys):
    import shutil

    ad = trained35(made35, tmp_path)
    other = [*SPLIT[:SPLIT.index("--rank")], "--rank", "2", *SPLIT[SPLIT.index("--rank") + 2:]]
    assert main(["convert", "--base", made35[1], "--out", str(ad), *other, "--overwrite"]) == 2
    one_line(capsys, "checkpoints holds a training run's checkpoints")
    # a checkpoint of another architecture (the folder converted again by hand, or copied in): one line, no step
    fresh = adapter35(made35, tmp_path, "rank2")
    assert main(["convert", "--base", made35[1], "--out", str(fresh), *other, "--overwrite"]) == 0
    shutil.copytree(ad / "checkpoints", fresh / "checkpoints")
    shutil.copy(ad / "metrics.jsonl", fresh / "metrics.jsonl")
    before = (fresh / "metrics.jsonl").read_text()
    assert main(["train", "--adapter", str(fresh), "--data", str(made35[2]), *QUICK, "--resume"]) == 2
    one_line(capsys, "step_000002 was saved by a different model than the adapter in")
    assert [p.name for p in list_checkpoints(fresh)] == ["step_000001", "step_000002"]
    assert (fresh / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("damage, needle", [
    (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]), "optimizer.pt cannot be read"),
    (lambda c: (c / "optimizer.pt").write_bytes(b"garbage"), "optimizer.pt cannot be read"),
    (lambda c: torch.save({"state": {}, "param_groups": []}, c / "optimizer.pt"), "optimizer.pt is not the optimizer"),
    (lambda c: torch.save({"last_epoch": "x"}, c / "scheduler.pt"), "scheduler.pt is not a learning-rate schedule"),
    (lambda c: (c / "scheduler.pt").write_bytes(os.urandom(64)), "scheduler.pt cannot be read"),
    (lambda c: (c.parent.parent / "metrics.jsonl").write_text('{"step": 1}\n[1]\n'), "line 2 is not a JSON object"),
    (lambda c: (c.parent.parent / "metrics.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n"),
     "line 1 is nested too deeply"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     "trainer_state.json: this trainer state is not valid JSON"),
])
def test_resuming_from_a_damaged_checkpoint_is_one_line_naming_the_file(made35, tmp_path, capsys, damage, needle):
    ad = trained35(made35, tmp_path)
    damage(ad / "checkpoints" / "step_000002")
    assert main(["train", "--adapter", str(ad), "--data", str(made35[2]), *QUICK, "--resume"]) == 2
    one_line(capsys, needle)
    assert [p.name for p in list_checkpoints(ad)] == ["step_000001", "step_000002"]


def test_resume_still_continues_a_sound_checkpoint(made35, tmp_path, monkeypatch):
    ad = adapter35(made35, tmp_path)
    monkeypatch.setenv("OUROBOROS_FAULT", "enospc:save:2")  # stops after the step-1 checkpoint
    assert main(["train", "--adapter", str(ad), "--data", str(made35[2]), *QUICK]) == 2
    monkeypatch.delenv("OUROBOROS_FAULT")
    assert main(["train", "--adapter", str(ad), "--data", str(made35[2]), *QUICK, "--resume"]) == 0
    assert [m["step"] for m in read_metrics(ad) if "loss" in m] == [1, 2]


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 123 bytes. Error code 12 (Cannot allocate memory)")


def test_the_cpu_allocators_out_of_memory_is_recognised_in_training_and_in_other_commands(made35, tmp_path,
                                                                                           monkeypatch, capsys):
    corpus = build_corpus([str(made35[2])], tiny_tokenizer(), 32, heldout_fraction=0.2)
    model = OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**TINY_SPLIT))
    save_adapter(model, tmp_path / "run")

    def boom(*a, **k):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(TrainingError, match="out of memory on cpu for a micro-batch of 2 x 32 tokens"):
        train(model, corpus, tmp_path / "run", TrainConfig(steps=2, batch_size=2, progress=False))
    import ouroboros_lm.evaluate

    monkeypatch.setattr(ouroboros_lm.evaluate, "evaluate", boom)
    assert main(["eval", "--adapter", str(made35[0] / "ad"), "--data", str(made35[2]), "--seq-len", "32",
                 "--blocks", "2", "--depths", "1", "--out", str(tmp_path / "e")]) == 1
    one_line(capsys, "out of memory ([enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator")


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_eval_scores_from_chunks_of_the_vocabulary_and_equals_the_full_logits_loss(arch, monkeypatch):
    from conftest import assert_equivalent, randomize_trainables, tiny_ouroboros
    from ouroboros_lm.evaluate import evaluate
    from ouroboros_lm.loss import causal_lm_loss, scored_tokens
    from ouroboros_lm.model import OuroborosOutput

    model, full = tiny_ouroboros(arch), tiny_base(arch)
    randomize_trainables(model)
    blocks = torch.randint(0, TINY["vocab_size"], (5, 24), generator=torch.Generator().manual_seed(7))

    def old(forward):  # what eval computed before: the [batch, seq, vocab] float32 logits, summed, batch by batch
        with torch.no_grad():
            total = sum(causal_lm_loss(forward(blocks[i:i + 2]), blocks[i:i + 2], reduction="sum").double()
                        for i in range(0, 5, 2))
        return (total / scored_tokens(blocks)).reshape(1)

    expected = {"full": old(lambda x: full(x, use_cache=False).logits),
                "baseline": old(lambda x: model(x, baseline=True).logits),
                "ouroboros@1": old(lambda x: model(x, depth=1).logits),
                "ouroboros@3": old(lambda x: model(x, depth=3).logits)}

    def no_logits(*a, **k):
        raise AssertionError("eval built the full logits")

    monkeypatch.setattr(OuroborosOutput, "logits", property(no_logits))
    monkeypatch.setattr(full, "forward", no_logits)
    report = evaluate(model, {"heldout": blocks}, depths=(1, 3), full_model=full, batch_size=2, progress=False)
    for row in report.splits["heldout"]:
        assert_equivalent(torch.tensor([row.loss]), expected[row.model], dtype=torch.float32)  # float32 logits, both


def test_mixture_weights_whose_sum_overflows_are_refused_before_any_data_is_read(made35, capsys):
    from ouroboros_lm.data import DataError, group_items

    with pytest.raises(DataError, match=r"the weights add up to more than a float can hold \(1e\+308 \+ 1e\+308\)"):
        group_items(["a=/no/such/a:1e308", "b=/no/such/b:1e308"])
    data = made35[2]
    assert main(["train", "--adapter", str(made35[0] / "ad"), "--data", f"a={data}:1e308", f"b={data}:1e308",
                 *QUICK]) == 2
    one_line(capsys, "the weights add up to more than a float can hold")


def test_a_fresh_run_after_one_that_saved_no_checkpoint_starts_a_new_metrics_file(made35, tmp_path, monkeypatch,
                                                                                   capsys):
    ad = adapter35(made35, tmp_path)
    monkeypatch.setenv("OUROBOROS_FAULT", "enospc:save:1")  # the first run stops before its first checkpoint
    assert main(["train", "--adapter", str(ad), "--data", str(made35[2]), *QUICK]) == 2
    monkeypatch.delenv("OUROBOROS_FAULT")
    first = (ad / "metrics.jsonl").read_text()
    assert [m["step"] for m in read_metrics(ad)] == [1] and not list_checkpoints(ad)
    assert main(["train", "--adapter", str(ad), "--data", str(made35[2]), *QUICK]) == 0
    assert "was moved to" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(ad) if "loss" in m] == [1, 2]  # not 1, 1, 2
    assert (ad / "metrics.jsonl.1.old").read_text() == first  # kept, not lost


@pytest.mark.parametrize("change, needle", [
    (lambda f: os.truncate(f, 20 << 30), "its header accounts for"),  # sparse: 20 GB of holes after the tensors
    (lambda f: os.truncate(f, os.path.getsize(f) - 1), "its header accounts for"),
    (lambda f: (os.truncate(f, 0), os.truncate(f, 20 << 30)), "not a safetensors file"),  # all holes
    (lambda f: open(f, "r+b").write((10**12).to_bytes(8, "little")), "not a safetensors file"),
])
def test_a_weights_file_whose_header_does_not_account_for_its_size_is_refused_unread(tmp_path, change, needle,
                                                                                      monkeypatch):
    from pathlib import Path

    from ouroboros_lm.adapter import AdapterError, read_adapter

    save_adapter(OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**TINY_SPLIT)), tmp_path / "ad")
    change(tmp_path / "ad" / "adapter_model.safetensors")
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read whole"))
    with pytest.raises(AdapterError, match=f"adapter_model.safetensors is corrupt or truncated: .*{needle}"):
        read_adapter(tmp_path / "ad")


@pytest.mark.parametrize("new_documents", [True, False])
def test_a_source_that_grows_while_it_is_prepared_is_refused_naming_it(tmp_path, monkeypatch, new_documents):
    import json

    from ouroboros_lm import prepare as prep
    from ouroboros_lm.data import DataError

    if new_documents:  # a .jsonl gains lines: more documents than the survey counted
        src = tmp_path / "docs.jsonl"
        src.write_text("".join(json.dumps({"text": f"ba ko ri {i} " * 20}) + "\n" for i in range(8)))
        grow = "".join(json.dumps({"text": "tu me sa lo"}) + "\n" for _ in range(3))
    else:  # a text file (one document) grows: as many documents, other text
        src = write_corpus(tmp_path / "text", n_docs=8) / "doc_003.txt"
        grow = "more text at the end\n"
    survey = prep.survey

    def survey_then_grow(plan):  # another process appends while we read
        sv = survey(plan)
        with open(src, "a") as f:
            f.write(grow)
        return sv

    monkeypatch.setattr(prep, "survey", survey_then_grow)
    with pytest.raises(DataError, match=f"{src.name} changed while `ouroboros prepare` read it"):
        prep.prepare([str(src if new_documents else src.parent)], tmp_path / "p", tiny_tokenizer(), progress=False)
    assert not (tmp_path / "p" / "manifest.json").exists()


@pytest.mark.parametrize("body", [
    b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (5).to_bytes(8, "little")
    + (10**6).to_bytes(8, "little") + b"abc",  # a key 1,000,000 bytes long in a 35-byte file
    b"GGUF" + (3).to_bytes(4, "little"),  # cut short in the header
])
def test_a_gguf_with_a_lying_header_is_one_line_naming_it(tmp_path, monkeypatch, capsys, body):
    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "lying.gguf").write_bytes(body)
    assert main(["convert", "--base", str(tmp_path / "lying.gguf"), "--out", str(tmp_path / "ad")]) == 2
    one_line(capsys, "lying.gguf is not a GGUF file we can read")
    assert not (tmp_path / "ad").exists()


def move_heldout_shard_to_train(m):
    m["splits"]["train"]["shards"].append(m["splits"]["heldout"]["shards"].pop())


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["splits"]["train"].update(documents=-5), "train documents -5 is not the sum of its shards'"),
    (lambda m: m["splits"]["heldout"].update(tokens=10**9), "heldout tokens 1000000000 is not the sum"),
    (move_heldout_shard_to_train, "shard heldout-00000 is listed under train"),
    (lambda m: m["splits"]["train"]["shards"].append(dict(m["splits"]["train"]["shards"][0])), "a shard is listed twice"),
    (lambda m: m.update(eos=True), "eos must be a token id; got True"),
])
def test_a_manifest_whose_totals_do_not_add_up_is_refused_naming_it(tmp_path, edit, needle):
    import json

    from ouroboros_lm.data import DataError
    from ouroboros_lm.prepare import prepare
    from ouroboros_lm.shards import Prepared

    prepare([str(write_corpus(tmp_path / "text", n_docs=8))], tmp_path / "p", tiny_tokenizer(), progress=False)
    path = tmp_path / "p" / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"manifest.json: {needle}"):
        Prepared(tmp_path / "p")
    path.write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")  # and absurdly nested: one line too
    with pytest.raises(DataError, match="manifest.json: this manifest is not valid JSON"):
        Prepared(tmp_path / "p")


def test_prepare_workers_are_bounded(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # a usage error: argparse's one line
        main(["prepare", str(tmp_path), "--out", str(tmp_path / "p"), "--base", "b", "--workers", "4096"])
    assert stop.value.code == 2
    one_line(capsys, "argument --workers: workers must be in [0, 256]; got 4096")


def test_a_cache_variable_naming_a_file_is_one_line_naming_the_variable(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path / "afile"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert main(["convert", "--base", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "ad")]) == 2
    one_line(capsys, f"OUROBOROS_CACHE={tmp_path / 'afile'} is not a folder")


def test_true_is_not_a_number_where_a_file_records_one(made35, tmp_path, capsys):
    import json

    from ouroboros_lm.adapter import AdapterError, read_adapter

    ad = adapter35(made35, tmp_path)
    meta = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**meta, "format_version": True}))
    with pytest.raises(AdapterError, match="has format_version True; this ouroboros-lm reads versions 1, 2"):
        read_adapter(ad)
    from ouroboros_lm.data import DataError
    from ouroboros_lm.prepare import prepare
    from ouroboros_lm.shards import Prepared

    prepare([str(made35[2])], tmp_path / "p", tiny_tokenizer(), progress=False)
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    (tmp_path / "p" / "manifest.json").write_text(json.dumps({**m, "version": True}))
    with pytest.raises(DataError, match="manifest.json is not a manifest of `ouroboros prepare`"):
        Prepared(tmp_path / "p")


def test_only_temporaries_that_can_be_ours_are_cleaned(tmp_path):
    from ouroboros_lm.atomic import clean_temporaries

    dead = 4194305  # above Linux's largest pid: never a running process
    ours_dir, ours_file = tmp_path / f".hf.tmp{dead}", tmp_path / f".hf.old.tmp{dead}"
    ours_dir.mkdir()
    (ours_dir / "config.json").write_text("{}")
    ours_file.write_text("partial")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("precious\n")
    linked = tmp_path / f".hf.tmp{dead + 1}"  # a folder holding a link: not one we made
    linked.mkdir()
    (linked / "keep").symlink_to(tmp_path / "victim")
    shared = tmp_path / f".hf.tmp{dead + 2}"  # a file hard-linked elsewhere
    os.link(tmp_path / "victim" / "keep.txt", shared)
    fifo = tmp_path / f".hf.tmp{dead + 3}"
    os.mkfifo(fifo)
    assert sorted(clean_temporaries(tmp_path, "hf")) == sorted([ours_dir, ours_file])
    assert linked.is_dir() and shared.is_file() and fifo.exists()
    assert (tmp_path / "victim" / "keep.txt").read_text() == "precious\n"
