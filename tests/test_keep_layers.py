"""Any kept layers (`OuroborosConfig.keep_layers`): the heal model and the recursion on an explicit list of
base layers equal Hugging Face's own model on exactly those layers (float64), their SVD bases come from the
layers actually removed, they save, load and export, and bad lists are refused before any weight is touched."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY, TINY_SPLIT, assert_equivalent, assert_same_in_float64, randomize_trainables, save_tiny_base, tiny_base
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model
from ouroboros_lm.adapter import AdapterError, load_adapter, save_adapter
from ouroboros_lm.layers import get_projection
from test_core import hf_pruned
from test_heal import merge_lora_layer

pytestmark = pytest.mark.usefixtures("one_thread")
L = TINY["num_hidden_layers"]
KEEP = (0, 2, 3, 5, 7)  # not the first / last layers in runs: prelude 0, 2; block 3 (+ 4 when removed); coda 5, 7
BARE = dict(variant="none", gate=False, step_norm=False)


def config(**changes) -> OuroborosConfig:
    return OuroborosConfig(**{**TINY_SPLIT, **changes})


def double_base(arch: str = "llama"):
    return tiny_base(arch).double()


def build(arch: str = "llama", **cfg) -> OuroborosModel:
    return OuroborosModel.from_base(double_base(arch), config(**cfg)).double().eval()


def hf_logits(arch, layers, tokens) -> torch.Tensor:
    """Hugging Face's own model on exactly `layers`, in float64 (our loss sums its vocabulary chunks in float32:
    logits are what compares exactly)."""
    with torch.no_grad():
        return hf_pruned(double_base(arch), layers)(tokens, use_cache=False).logits


same = assert_same_in_float64


def test_the_split_follows_the_kept_layers():
    cfg = config(keep_layers=KEEP, recurrent_layer=3)
    assert (cfg.n_prelude, cfg.n_coda) == (2, 2)  # the counts come from the list, whatever was given
    assert cfg.prelude_layers(L) == [0, 2] and cfg.coda_layers(L) == [5, 7] and cfg.middle_layers(L) == [3]
    assert cfg.kept_layers(L) == list(KEEP) and cfg.removed_layers(L) == [1, 4, 6]
    assert cfg.layer_passes(None) == 5 and cfg.layer_passes(3) == 7
    assert OuroborosConfig.from_dict(cfg.to_dict()) == cfg
    block = config(keep_layers=(0, 1, 3, 4, 7), recurrent_layer=3, block_layers=2)
    assert block.middle_layers(L) == [3, 4] and (block.n_prelude, block.n_coda) == (2, 1)
    assert block.pruned_stack().kept_layers(L) == [0, 1, 3, 7]  # the floor: the block's first layer once
    heal = config(keep_layers=KEEP, heal_layers=1, lora_rank=2)  # recurrent_layer 4: not kept
    assert heal.recurrent_layer == 3 and heal.kept_layers(L) == list(KEEP) and heal.layer_passes(None) == 5
    assert heal.lora_layers() == {"prelude": [0, 1], "coda": [0, 1]} and heal.lora_on_recurrent_layer


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_heal_model_on_kept_layers_equals_hugging_face_with_merged_lora(arch, tokens):
    model = build(arch, keep_layers=KEEP, heal_layers=1, lora_rank=2)
    with torch.no_grad():
        same(model(tokens).logits, hf_logits(arch, list(KEEP), tokens))  # fresh: exactly those layers
        randomize_trainables(model, scale=0.2)
        healed = model(tokens).logits
        same(model(tokens, baseline=True).logits, hf_logits(arch, list(KEEP), tokens))  # the same layers, LoRA off
    ref = hf_pruned(double_base(arch), list(KEEP))
    for mine, target in zip(list(model.prelude) + [model.recurrent.layer] + list(model.coda), ref.model.layers):
        merge_lora_layer(mine, target)
    with torch.no_grad():
        same(healed, ref(tokens, use_cache=False).logits)


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_recursion_on_kept_layers_is_hugging_faces_layers_repeated(arch, tokens):
    """Bare depth N on keep_layers (0, 1, 3, 4, 7) with the block 3-4: HF's layers 0, 1, (3, 4) x N, 7."""
    model = build(arch, keep_layers=(0, 1, 3, 4, 7), recurrent_layer=3, block_layers=2, **BARE)
    with torch.no_grad():
        for depth in (1, 2):
            same(model(tokens, depth=depth).logits, hf_logits(arch, [0, 1] + [3, 4] * depth + [7], tokens))
        same(model(tokens, baseline=True).logits, hf_logits(arch, [0, 1, 3, 7], tokens))


@pytest.mark.equivalence
def test_svd_bases_come_from_the_layers_actually_removed():
    base = tiny_base("llama")
    layers = copy.deepcopy(base).model.layers
    model = OuroborosModel.from_base(base, config(keep_layers=KEEP, recurrent_layer=3))
    W = lambda i: get_projection(layers[i], "q").weight.double()  # noqa: E731
    M = sum(W(i) - W(3) for i in (1, 4, 6)) / 3
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = model.config.rank
    b = model.recurrent.bases
    # the bases are computed in float32 (mean_residual), the reference here in float64
    assert_equivalent(b.B("q").double() @ b.A("q").double(), (U[:, :r] * S[:r]) @ Vh[:r], dtype=torch.float32)


@pytest.mark.equivalence
def test_kept_layers_round_trip_and_export(tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    from ouroboros_lm.export import export_hf

    path = save_tiny_base(tmp_path / "base")
    cfg = config(keep_layers=(0, 1, 3, 4, 7), recurrent_layer=3, block_layers=2, lora_rank=2,
                          prelude_lora_layers=1, recurrent_lora=True)
    model = OuroborosModel.from_base(load_base_model(path), cfg, base_name=path).eval()
    randomize_trainables(model, scale=0.3)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tmp_path / "adapter").eval()
    assert loaded.config == model.config
    export_hf(tmp_path / "adapter", tmp_path / "hf", depth=2)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ours = model(tokens, depth=2).logits
        assert torch.equal(loaded(tokens, depth=2).logits, ours)
    with torch.no_grad():  # the exported model computes what ours does: compared in float64, on any CPU
        same(hf.double()(tokens).logits, copy.deepcopy(model).double()(tokens, depth=2).logits)
    with pytest.raises(AdapterError, match="different layer split"):
        load_adapter(tmp_path / "adapter", keep_layers=(0, 2, 3, 4, 7))


@pytest.mark.equivalence
def test_cached_generation_on_kept_layers_equals_recomputing(tokens):
    model = build(keep_layers=KEEP, recurrent_layer=3)
    randomize_trainables(model, scale=0.3)
    with torch.no_grad():
        cache = model.new_cache(depth=3)
        first = model(tokens[:, :5], depth=3, cache=cache).logits
        rest = model(tokens[:, 5:9], depth=3, cache=cache).logits
        whole = model(tokens[:, :9], depth=3).logits
    same(torch.cat([first, rest], 1), whole)


@pytest.mark.parametrize("keep, match", [
    ((0, 3, 2, 7), "sorted and without duplicates"),
    ((0, 3, 3, 7), "sorted and without duplicates"),
    ((0, 2, 7), "must keep the recurrent layer 3"),
    ((0, 3, 5, 7), "must keep the recurrent block 3-4"),
])
def test_bad_kept_layers_are_refused_before_any_weight(keep, match):
    block = 2 if "block" in match else 1
    with pytest.raises(ValueError, match=match):
        OuroborosConfig(**{**TINY_SPLIT, "recurrent_layer": 3, "block_layers": block, "keep_layers": keep})


def test_kept_layers_beyond_the_base_or_with_a_count_of_heal_layers_are_refused():
    cfg = config(keep_layers=(0, 3, 9), recurrent_layer=3)
    with pytest.raises(ValueError, match=r"keep_layers must name layers of the base model, in \[0, 7\]"):
        OuroborosModel.from_base(tiny_base(), cfg)
    with pytest.raises(ValueError, match="use heal_layers 1 with it"):
        config(keep_layers=KEEP, heal_layers=2, lora_rank=2)
    with pytest.raises(ValueError, match="keep_layers must be"):
        config(keep_layers=(0, -1, 3))


def test_an_adapter_without_keep_layers_loads_unchanged(tmp_path):
    """Adapters written before keep_layers existed have no such key: they load as the count split."""
    import json

    path = save_tiny_base(tmp_path / "base")
    model = OuroborosModel.from_base(load_base_model(path), config(), base_name=path)
    save_adapter(model, tmp_path / "adapter")
    meta_path = tmp_path / "adapter" / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    del meta["ouroboros_config"]["keep_layers"]
    meta_path.write_text(json.dumps(meta))
    loaded = load_adapter(tmp_path / "adapter")
    assert loaded.config.keep_layers is None and loaded.config.kept_layers(L) == [0, 1, 4, 6, 7]
