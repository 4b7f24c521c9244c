"""Adapters: bit-identical round trip, and refusals that say which thing is wrong."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import randomize_trainables, tiny_base, tiny_ouroboros
from ouroboros_lm import load_adapter, save_adapter
from ouroboros_lm.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError


@pytest.fixture
def saved(tmp_path):
    model = tiny_ouroboros("qwen2", seed=0)
    randomize_trainables(model)
    save_adapter(model, tmp_path / "ad")
    return model, tmp_path / "ad"


@pytest.mark.parametrize("variant", ["controller", "static", "none"])
def test_round_trip_gives_bit_identical_logits(tmp_path, tokens, variant):
    model = tiny_ouroboros("qwen2", seed=0, variant=variant)
    randomize_trainables(model)
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert meta["format_version"] == 1 and meta["ouroboros_config"]["variant"] == variant
    from safetensors import safe_open

    with safe_open(tmp_path / "ad" / WEIGHTS_NAME, "pt") as f:  # the file holds the spec's W_g whole: H x 2H
        H = model.recurrent.step_norms.weight.shape[-1]
        assert f.get_slice("recurrent.gate.proj.weight").get_shape() == [H, 2 * H]
        assert not any("weight_new" in k or "weight_old" in k for k in f.keys())
    loaded = load_adapter(tmp_path / "ad", base=tiny_base("qwen2", seed=0)).eval()
    with torch.no_grad():
        for depth in (1, 3):
            assert torch.equal(model(tokens, depth=depth).logits, loaded(tokens, depth=depth).logits)


def test_loading_never_recomputes_the_svd(saved, monkeypatch):
    import ouroboros_lm.svd_bases as lora

    model, path = saved
    monkeypatch.setattr(lora, "svd_bases", lambda *a, **k: pytest.fail("SVD recomputed on load"))
    loaded = load_adapter(path, base=tiny_base("qwen2", seed=0))
    assert torch.equal(loaded.recurrent.bases.B_q, model.recurrent.bases.B_q)


def test_wrong_base_weights_are_refused_before_surgery(saved):
    _, path = saved
    other = tiny_base("qwen2", seed=1)
    with pytest.raises(AdapterError, match="different base model.*different weights in layer.0"):
        load_adapter(path, base=other)
    assert len(other.model.layers) == 8  # untouched


def test_wrong_architecture_is_refused(saved):
    _, path = saved
    with pytest.raises(AdapterError, match="different base model.*model_type: adapter 'qwen2' vs base 'llama'"):
        load_adapter(path, base=tiny_base("llama", seed=0))


def test_different_layer_split_is_refused(saved):
    _, path = saved
    with pytest.raises(AdapterError, match="different layer split.*recurrent_layer=4.*asked for recurrent_layer=3"):
        load_adapter(path, base=tiny_base("qwen2", seed=0), recurrent_layer=3)


def test_truncated_or_corrupt_weights_are_refused(saved):
    _, path = saved
    w = path / WEIGHTS_NAME
    blob = w.read_bytes()
    w.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(path, base=tiny_base("qwen2", seed=0))
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF
    w.write_bytes(bytes(flipped))
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(path, base=tiny_base("qwen2", seed=0))


def test_incompatible_format_version_and_missing_files(saved, tmp_path):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["format_version"] = 99
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="incompatible format version"):
        load_adapter(path, base=tiny_base("qwen2", seed=0))
    (path / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter(path, base=tiny_base("qwen2", seed=0))
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(tmp_path / "nothing", base=tiny_base("qwen2", seed=0))


def test_round_trip_without_gate_or_step_norms(tmp_path, tokens):
    model = tiny_ouroboros("llama", seed=0, gate=False, step_norm=False)
    randomize_trainables(model)
    save_adapter(model, tmp_path / "ad")
    loaded = load_adapter(tmp_path / "ad", base=tiny_base("llama", seed=0)).eval()
    assert loaded.recurrent.gate is None and loaded.recurrent.step_norms is None
    with torch.no_grad():
        assert torch.equal(model(tokens, depth=3).logits, loaded(tokens, depth=3).logits)
