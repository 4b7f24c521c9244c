"""Adapter folders from strangers, runs started twice, full disks and absurd settings: nothing
outside the folder is touched, nothing saved is lost, and every error is one clear line."""
from __future__ import annotations

import fcntl
import json
import os

import pytest
import torch

from conftest import TINY_SPLIT, save_tiny_base, tiny_base, tiny_ouroboros, tiny_tokenizer, write_corpus
from ouroboros_lm import OuroborosConfig, OuroborosModel, TrainConfig, load_adapter, save_adapter, train
from ouroboros_lm.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from ouroboros_lm.checkpoints import list_checkpoints
from ouroboros_lm.data import DataError, build_corpus, load_documents
from ouroboros_lm.evaluate import EvalReport, EvalRow
from ouroboros_lm.loading import cache_dir
from test_hardening import TRAIN, cli, converted


@pytest.fixture
def corpus(tmp_path):
    return build_corpus([str(write_corpus(tmp_path / "text", n_docs=12))], tiny_tokenizer(), 32, heldout_fraction=0.2)


def fresh_run(tmp_path, name="run"):
    model = OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**TINY_SPLIT))
    save_adapter(model, tmp_path / name)
    return model, tmp_path / name


def quick(**kw):
    return TrainConfig(**{"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "eval_every": 2,
                          "eval_blocks": 2, "save_every": 2, "depths": (1, 2), "progress": False, **kw})


def test_a_symlinked_metrics_file_is_refused_and_its_target_untouched(tmp_path, corpus):
    model, run = fresh_run(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError, match="metrics.jsonl is a symbolic link; refusing to write through it"):
        train(model, corpus, run, quick())
    assert victim.read_text() == "precious\n"


def test_a_symlinked_eval_file_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("precious\n")
    out = tmp_path / "ad"
    out.mkdir()
    (out / "eval.json").symlink_to(victim)
    report = EvalReport({"heldout": [EvalRow("baseline", 5.0)]}, {"heldout": 10})
    report.write(out)
    assert victim.read_text() == "precious\n"
    assert not (out / "eval.json").is_symlink() and json.loads((out / "eval.json").read_text())["splits"]


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path, corpus):
    model, run = fresh_run(tmp_path)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)  # another process's lock, as the kernel sees it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242")
        with pytest.raises(ValueError, match=r"in use by another ouroboros run \(pid 4242\)"):
            train(model, corpus, run, quick())
        assert not list_checkpoints(run)
    finally:
        os.close(fd)  # released: as when that process exits, however it exits
    train(model, corpus, run, quick())
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"]


def test_resume_refuses_settings_that_differ_from_the_run(tmp_path, corpus):
    model, run = fresh_run(tmp_path)
    train(model, corpus, run, quick(steps=4, stop_after=2))
    short = build_corpus([str(tmp_path / "text")], tiny_tokenizer(), 16, heldout_fraction=0.2)
    with pytest.raises(ValueError, match=r"lr: saved 0.0003, asked 0.001; seq_len: saved 32, asked 16"):
        train(model, short, run, quick(steps=4, lr=1e-3), resume=True)
    out = train(model, corpus, run, quick(steps=4, time_budget=100.0), resume=True)  # not run-defining
    assert out["steps_done"] == 4


def test_a_full_disk_during_a_save_exits_2_keeps_the_last_checkpoint_and_cleans_up(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "text", n_docs=12)
    ad = converted(tmp_path, base, "ad")
    r = cli("train", "--adapter", str(ad), "--data", str(data), *TRAIN, env={"OUROBOROS_FAULT": "enospc:save:4"})
    lines = [l for l in r.stderr.splitlines() if l.startswith("ouroboros")]  # the rest is the progress bar
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "No space left on device" in lines[0] and "last complete checkpoint is intact: step_000003" in lines[0]
    assert not [p for p in (ad / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    r = cli("train", "--adapter", str(ad), "--data", str(data), *TRAIN, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert list_checkpoints(ad)[-1].name == "step_000006"


def test_an_edited_layer_split_is_detected(tmp_path):
    model = tiny_ouroboros("llama")
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    meta["ouroboros_config"]["n_prelude"] = 1
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="layer split .* does not match the layers its fingerprints were recorded for"):
        load_adapter(tmp_path / "ad", base=tiny_base("llama"))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("base_model"), "'base_model' is missing"),
    (lambda m: m["ouroboros_config"].update(alpha=float("inf")), "alpha must be a finite number"),
])
def test_an_incomplete_or_absurd_adapter_config_is_refused(tmp_path, edit, message):
    save_adapter(tiny_ouroboros("llama"), tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    edit(meta)
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=message):
        load_adapter(tmp_path / "ad", base=tiny_base("llama"))


def test_a_deeply_nested_adapter_config_is_refused(tmp_path):
    save_adapter(tiny_ouroboros("llama"), tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match="is corrupt"):
        load_adapter(tmp_path / "ad", base=tiny_base("llama"))


def test_non_finite_adapter_weights_are_refused(tmp_path):
    import hashlib

    from safetensors.torch import load, save

    save_adapter(tiny_ouroboros("llama"), tmp_path / "ad")
    tensors = load((tmp_path / "ad" / WEIGHTS_NAME).read_bytes())
    tensors["recurrent.gate.proj.bias"][0] = float("nan")
    blob = save(tensors)
    (tmp_path / "ad" / WEIGHTS_NAME).write_bytes(blob)
    meta = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()  # a consistent, deliberately poisoned pair
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"non-finite values .* recurrent.gate.proj.bias"):
        load_adapter(tmp_path / "ad", base=tiny_base("llama"))


def test_convert_refuses_an_infinite_alpha_in_one_line(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    r = cli("convert", "--base", base, "--out", str(tmp_path / "ad"), "--alpha", "inf")
    assert r.returncode == 2 and "alpha must be" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ad").exists()


def test_a_parquet_column_of_integers_is_a_data_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match="column 'text' holds int64, not text"):
        load_documents([str(tmp_path / "d.parquet")])


def test_sampling_with_a_tiny_temperature_is_greedy_not_nan():
    model = tiny_ouroboros("llama")
    prompt = torch.randint(0, 90, (1, 5), generator=torch.Generator().manual_seed(0))
    sampled = model.generate(prompt, max_new_tokens=5, depth=2, do_sample=True, temperature=1e-300, seed=0)
    assert torch.equal(sampled, model.generate(prompt, max_new_tokens=5, depth=2))


def test_an_empty_cache_variable_means_the_default_not_the_current_folder(monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE", "")
    assert cache_dir() == cache_dir().home() / ".cache" / "ouroboros-lm"


@pytest.mark.parametrize("overrides", [{}, {"variant": "static", "gate": False}, {"variant": "none", "step_norm": False}])
def test_the_size_check_counts_what_the_model_will_hold(overrides):
    from ouroboros_lm.memory import trainable_parameter_count

    model = tiny_ouroboros("llama", **overrides)
    assert trainable_parameter_count(model.config, 64) == model.num_trainable_parameters()


def test_settings_too_large_for_the_machine_are_refused_before_allocating():
    base = tiny_base("llama")
    with pytest.raises(ValueError, match=r"trainable parameters .* GiB free on cpu: lower controller_hidden"):
        OuroborosModel.from_base(base, OuroborosConfig(**{**TINY_SPLIT, "controller_hidden": 65536, "style_dim": 65536}))
    assert len(base.model.layers) == 8  # nothing touched
