"""Training: exact resume, the schedule, refusals, two processes, and the CLI end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_SPLIT, save_tiny_base, tiny_tokenizer, write_corpus
from ouroboros_lm import load_adapter, save_adapter
from ouroboros_lm import OuroborosConfig, OuroborosModel
from ouroboros_lm.data import build_corpus
from ouroboros_lm.checkpoints import read_metrics
from ouroboros_lm.schedules import lr_lambda
from ouroboros_lm.train import TrainConfig, train

HERE = Path(__file__).parent


def make_run(tmp_path, name, corpus, **cfg):
    from conftest import tiny_base

    model = OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**{**TINY_SPLIT, **cfg}))
    run = tmp_path / name
    save_adapter(model, run)
    return model, run


@pytest.fixture
def corpus(tmp_path):
    return build_corpus([str(write_corpus(tmp_path / "text", n_docs=12))], tiny_tokenizer(), seq_len=32, heldout_fraction=0.2)


def quiet(**kw):
    return TrainConfig(**{"steps": 8, "batch_size": 2, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 4,
                          "eval_blocks": 2, "save_every": 3, "progress": False, "depths": (1, 2, 3), **kw})


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    model, run_a = make_run(tmp_path, "a", corpus)
    train(model, corpus, run_a, quiet())
    model, run_b = make_run(tmp_path, "b", corpus)
    out = train(model, corpus, run_b, quiet(stop_after=5))
    assert out["steps_done"] == 5
    # a fresh process would rebuild the model from the adapter; so do we
    model_b = load_adapter(run_b, base=__import__("conftest").tiny_base("llama"))
    train(model_b, corpus, run_b, quiet(), resume=True)
    a, b = read_metrics(run_a), read_metrics(run_b)
    la = [m["loss"] for m in a if "loss" in m]
    lb = [m["loss"] for m in b if "loss" in m]
    assert len(la) == len(lb) == 8
    assert la == lb  # the same computations, in the same order: bit-identical, on any CPU
    assert [m["step"] for m in b if "loss" in m] == list(range(1, 9))  # no duplicated lines after resume
    wa = load_adapter(run_a, base=__import__("conftest").tiny_base("llama")).trainable_state_dict()
    wb = load_adapter(run_b, base=__import__("conftest").tiny_base("llama")).trainable_state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]


def test_training_lowers_the_loss_and_writes_everything(tmp_path, corpus):
    model, run = make_run(tmp_path, "r", corpus)
    out = train(model, corpus, run, quiet(steps=30, lr=1e-2, eval_every=10, save_every=10))
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert all(m["baseline_loss"] is not None for m in read_metrics(run) if "loss" in m)
    assert sum("heldout_loss" in m for m in read_metrics(run)) == 3
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000020", "step_000030"]  # keep_checkpoints=2
    assert (run / "checkpoints" / "step_000030" / "optimizer.pt").is_file()
    assert out["steps_done"] == 30


def test_bf16_mixed_precision_trains(tmp_path, corpus):
    """The GPU default (bf16 autocast through accelerate), here on the CPU's autocast; after a
    full-precision run in the same process (accelerate keeps one precision per process)."""
    model, run = make_run(tmp_path, "fp32", corpus)
    train(model, corpus, run, quiet(steps=1, mixed_precision="no"))
    model, run = make_run(tmp_path, "r", corpus)
    out = train(model, corpus, run, quiet(steps=4, mixed_precision="bf16", eval_every=2, checkpoint="always"))
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert out["steps_done"] == 4 and len(losses) == 4 and all(0 < x < 20 for x in losses)
    assert all(torch.isfinite(p).all() for p in model.trainable_state_dict().values())


def test_existing_run_is_not_overwritten_without_resume(tmp_path, corpus):
    model, run = make_run(tmp_path, "r", corpus)
    train(model, corpus, run, quiet(steps=3))
    before = (run / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already has checkpoints.*--resume"):
        train(model, corpus, run, quiet(steps=3))
    assert (run / "adapter_model.safetensors").read_bytes() == before
    model2, run2 = make_run(tmp_path, "r2", corpus)
    with pytest.raises(ValueError, match="no complete checkpoint to resume"):
        train(model2, corpus, run2, quiet(), resume=True)


def test_schedule_warmup_then_cosine_to_min_lr():
    tc = TrainConfig(steps=100, warmup_steps=10, lr=3e-4, min_lr=1e-6)
    f = lr_lambda(tc)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(100) * tc.lr == pytest.approx(1e-6)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_two_processes_see_different_data_and_end_identical(tmp_path):
    out = tmp_path / "dist"
    # `--multi_gpu` picks accelerate's torchrun launcher; with no GPU each process runs on the CPU with gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(HERE / "dist_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["backend"] == "gloo"
    assert not set(map(tuple, r0["batches"])) & set(map(tuple, r1["batches"]))  # different data
    assert r0["weights_sha256"] == r1["weights_sha256"]  # identical weights at the end
    assert r0["changed"]


def test_cli_convert_train_eval(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "text", n_docs=12)
    ad = tmp_path / "ad"
    env = {**os.environ, "OUROBOROS_CACHE": str(tmp_path / "cache")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ouroboros_lm.cli", *args], capture_output=True, text=True, env=env, timeout=300)

    split = ["--n-prelude", "2", "--recurrent-layer", "4", "--n-coda", "2", "--rank", "4", "--style-dim", "8",
             "--controller-hidden", "8", "--max-depth", "8", "--default-depth", "2"]
    r = run("convert", "--base", base, "--out", str(ad), *split)
    assert r.returncode == 0, r.stderr
    assert (ad / "adapter_config.json").is_file()
    r = run("convert", "--base", base, "--out", str(ad), *split)
    assert r.returncode == 2 and "already holds an adapter" in r.stderr
    r = run("train", "--adapter", str(ad), "--data", str(data), "--seq-len", "32", "--steps", "4", "--batch-size", "2",
            "--eval-every", "2", "--save-every", "2", "--warmup-steps", "1", "--depths", "1,2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("eval", "--adapter", str(ad), "--data", str(data), "--seq-len", "32", "--depths", "1,2", "--blocks", "4",
            "--exit-thresholds", "1e-9", "--exit-max-depth", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((ad / "eval.json").read_text())
    assert set(report["splits"]) == {"train", "heldout"}
    rows = report["splits"]["heldout"]
    assert [row["model"] for row in rows] == ["full", "baseline", "ouroboros@1", "ouroboros@2",
                                              "ouroboros@auto(converged<1e-09,max3)"]
    assert [row["mean_steps"] for row in rows] == [None, None, 1.0, 2.0, 3.0]  # a tiny threshold never stops early
    r = run("generate", "--adapter", str(ad), "--prompt", "ba ko", "--depth", "auto", "--exit-threshold", "0.5",
            "--exit-max-depth", "4", "--max-new-tokens", "3")
    assert r.returncode == 0 and "recurrence steps per new token: mean" in r.stdout, r.stderr[-2000:]
    assert "| heldout" in (ad / "eval.md").read_text()
    r = run("eval", "--adapter", str(ad), "--data", str(data), "--depths", "1,99")
    assert r.returncode == 2 and "max_depth=8" in r.stderr and "Traceback" not in r.stderr
