"""`--report-to tensorboard`: the event file, read back, holds the losses of metrics.jsonl (also
across a resume) and the run's settings; metrics.jsonl is still written."""
from __future__ import annotations

import pytest
import torch
import yaml

from conftest import TINY_SPLIT, tiny_base, tiny_tokenizer, write_corpus
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_adapter, save_adapter
from ouroboros_lm.checkpoints import read_metrics
from ouroboros_lm.cli import build_parser
from ouroboros_lm.data import build_corpus
from ouroboros_lm.train import TRACKING_DIR, TrainConfig, train

pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package (test extras)")


def tb_scalars(folder) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every event file under `folder`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(folder))
    mux.Reload()
    out: dict[str, dict[int, float]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            out.setdefault(tag, {}).update({e.step: e.value for e in mux.Scalars(run, tag)})
    return out


def test_tensorboard_events_equal_metrics_jsonl_across_a_resume(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        corpus = build_corpus([str(write_corpus(tmp_path / "text", n_docs=10))], tiny_tokenizer(), seq_len=32,
                              heldout_fraction=0.2)
        run = tmp_path / "run"
        save_adapter(OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**TINY_SPLIT)), run)
        tc = dict(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1, eval_every=3, eval_blocks=2,
                  save_every=2, progress=False, depths=(1, 2), report_to="tensorboard")
        train(load_adapter(run, base=tiny_base("llama")), corpus, run, TrainConfig(**tc, stop_after=4))
        train(load_adapter(run, base=tiny_base("llama")), corpus, run, TrainConfig(**tc), resume=True)
    finally:
        torch.set_num_threads(n)
    metrics = read_metrics(run)
    scalars = tb_scalars(run / TRACKING_DIR)
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert sorted(losses) == list(range(1, 7)) and sorted(scalars["loss"]) == list(range(1, 7))
    as_float32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731  (events hold float32)
    assert scalars["loss"] == {step: as_float32(loss) for step, loss in losses.items()}
    held = {m["step"]: m["heldout_loss"] for m in metrics if "heldout_loss" in m}
    assert held and scalars["heldout_loss"] == {s: as_float32(v) for s, v in held.items()}
    assert {"baseline_loss", "lr", "grad_norm", "depth", "tokens_per_s"} <= set(scalars)
    configs = [yaml.safe_load(p.read_text()) for p in (run / TRACKING_DIR).rglob("hparams.yml")]
    assert len(configs) == 2  # one per start (the resume logs it again)
    assert configs[0]["train/lr"] == 3e-3 and configs[0]["train/depths"] == "[1, 2]"
    assert configs[0]["model/rank"] == TINY_SPLIT["rank"] and configs[0]["data/seq_len"] == 32


def test_report_to_flag_and_its_choices(capsys):
    parse = build_parser().parse_args
    assert parse(["train", "--adapter", "a", "--data", "d"]).report_to == "none"
    assert parse(["train", "--adapter", "a", "--data", "d", "--report-to", "tensorboard"]).report_to == "tensorboard"
    with pytest.raises(SystemExit) as e:
        parse(["train", "--adapter", "a", "--data", "d", "--report-to", "mlflow"])
    assert e.value.code == 2 and "report-to" in capsys.readouterr().err
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(report_to="mlflow")
