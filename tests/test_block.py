"""A recurrent block of several consecutive layers (`block_layers`): what each step runs, equal to
Hugging Face's own layers repeated; its bases, cached adaptive exit, saving and export (its causality
and cached decoding: tests/test_outer.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import (TINY, TINY_SPLIT, assert_equivalent, assert_same_in_float64, randomize_trainables, round_trip_and_export, tiny_base,
                      tiny_ouroboros)
from ouroboros_lm import OuroborosConfig, OuroborosModel
from ouroboros_lm.adapter import load_adapter
from ouroboros_lm.config import TARGETS
from ouroboros_lm.layers import decoder_layer, get_projection
from ouroboros_lm.memory import trainable_parameter_count
from ouroboros_lm.peft_lora import adaptation_parameter_count
from test_core import hf_pruned

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = dict(block_layers=2)  # the tiny base's layers 4 and 5; removed: 2 and 3
BARE = dict(variant="none", gate=False, step_norm=False)  # the block's layers as the base has them


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # Gemma 3's local + global block: tests/test_families.py
def test_bare_block_at_depth_n_is_hugging_faces_layers_repeated(arch, tokens):
    """With nothing added, depth N runs prelude, (layer 4, layer 5) N times, coda: Hugging Face's own
    model with exactly those layers in that order gives the same loss; the baseline runs layer 4 once (the
    pruned stack every gap is measured from, as `pruned_stack()` builds it)."""
    model = tiny_ouroboros(arch, **BLOCK, **BARE).double()  # float64: the comparison holds on any CPU
    assert model.config.middle_layers(TINY["num_hidden_layers"]) == [4, 5]
    assert model.config.removed_layers(TINY["num_hidden_layers"]) == [2, 3]
    with torch.no_grad():
        for depth in (1, 3):
            ref = hf_pruned(tiny_base(arch).double(), [0, 1] + [4, 5] * depth + [6, 7])
            hf = ref(tokens, labels=tokens, use_cache=False).loss
            assert_equivalent(model(tokens, labels=tokens, depth=depth).loss, hf)  # our loss is float32
    assert model.config.layer_passes(3) == 2 + 6 + 2 and model.config.layer_passes(None) == 5
    floor = OuroborosModel.from_base(tiny_base(arch).double(), model.config.pruned_stack())  # every gap's floor: 4 once
    with torch.no_grad():
        hf = hf_pruned(tiny_base(arch).double(), [0, 1, 4, 6, 7])(tokens, labels=tokens, use_cache=False).loss
        assert_equivalent(floor.double()(tokens, labels=tokens, baseline=True).loss, hf)
        # the block model's own baseline is that floor too (`ouroboros eval` scores gaps from it)
        assert_equivalent(model(tokens, labels=tokens, baseline=True).loss, hf)


@pytest.mark.equivalence
def test_each_block_layer_has_the_bases_of_its_own_residual():
    """Layer j of the block: B_j A_j is the rank-r truncation of mean_i (W_i - W_j) over the removed
    layers, computed here independently."""
    base = tiny_base("llama")  # the bases are computed in float32 (mean_residual): the check allows for it
    layers = copy.deepcopy(base).model.layers
    model = OuroborosModel.from_base(base, OuroborosConfig(**TINY_SPLIT, **BLOCK))
    rec = model.recurrent
    assert len(rec.layers) == 2 and rec.tail_bases is not None and len(rec.tail_bases) == 1
    for bases, j in ((rec.bases, 4), (rec.tail_bases[0], 5)):
        for target in ("q", "down"):
            W = lambda i: get_projection(layers[i], target).weight  # noqa: E731
            M = ((W(2) - W(j)) + (W(3) - W(j))).double() / 2
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            r = model.config.rank
            assert_equivalent(bases.B(target).double() @ bases.A(target).double(), (U[:, :r] * S[:r]) @ Vh[:r],
                              dtype=torch.float32)


@pytest.mark.equivalence
def test_a_modulated_block_step_equals_the_step_written_out(tokens):
    """Each step: the Controller's d (7 r-vectors per layer) from the state entering the step, then
    layer 4 with its norms and bases and the first 7 vectors, layer 5 with its own and the next 7, then
    the gate against the state: equal to the model's forward."""
    model = tiny_ouroboros("llama", **BLOCK, injection="linear")
    randomize_trainables(model, scale=0.3)
    model.double()  # float64: the comparison holds on any CPU
    rec = model.recurrent
    n = len(TARGETS)
    assert rec.controller.head.out_features == 2 * n * model.config.rank
    with torch.no_grad():
        h, ctx, _ = model.embed(tokens)
        e = model.run_layers("prelude", h, ctx)
        h = e
        for s in range(3):
            d = rec.controller.from_hidden(h, s, "prefix_mean")
            x = h + e @ rec.injection.proj.weight.T + rec.injection.proj.bias
            w = rec.step_norms.weight[s]
            x = decoder_layer(rec.layer, x, ctx, project=rec.bases.modulated(d[..., :n, :]), norm_weights=(w[0], w[1]))
            x = decoder_layer(rec.tail_layers[0], x, ctx, project=rec.tail_bases[0].modulated(d[..., n:, :]),
                              norm_weights=(w[2], w[3]))
            h = rec.gate(x, h)
        reference = model.head(model.run_layers("coda", h, ctx)).logits
        assert_same_in_float64(model(tokens, depth=3).logits, reference)


# causality and cached decoding of a block (and of its baseline): tests/test_outer.py's options test (BLOCKS)


@pytest.mark.equivalence
def test_block_under_adaptive_exit_with_a_cache_equals_recomputing(tokens):
    """Stopped positions lend their last keys/values to each layer of the block: decoding with a cache
    under forced exit steps gives the logits of the whole forward under the same steps."""
    model = tiny_ouroboros("llama", **BLOCK)
    randomize_trainables(model, scale=0.3)
    model.double()  # float64: the comparison holds on any CPU
    g = torch.Generator().manual_seed(3)
    steps = torch.randint(1, 4, tokens.shape, generator=g)
    with torch.no_grad():
        full = model(tokens, depth=3, exit_steps=steps).logits
        cache = model.new_cache(depth=3)
        parts = [model(tokens[:, i:i + 6], depth=3, cache=cache, exit_steps=steps[:, i:i + 6]).logits
                 for i in range(0, tokens.shape[1], 6)]
    assert_same_in_float64(torch.cat(parts, dim=1), full)


@pytest.mark.parametrize("options", [dict(), dict(variant="static"), dict(lora_rank=2, recurrent_lora=True),
                                     dict(lora_rank=2, recurrent_lora=True, recurrent_lora_steps=3)])
def test_block_trainable_count_from_settings_matches_the_model(options):
    model = tiny_ouroboros("llama", **BLOCK, **options)
    expected = trainable_parameter_count(model.config, TINY["hidden_size"]) + \
        adaptation_parameter_count(model.config, tiny_base("llama").model.layers[0], TINY["hidden_size"])
    assert expected == model.num_trainable_parameters() == model.trainable_parameter_breakdown()["total"]
    if options.get("recurrent_lora"):  # PEFT LoRA on both block layers' projections
        names = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
        assert any(n.startswith("recurrent.tail_layers.0.") for n in names)
        assert any(n.startswith("recurrent.layer.") for n in names)


@pytest.mark.equivalence
def test_block_round_trips_and_exports(tmp_path, tokens):
    model, loaded, adapter = round_trip_and_export(tmp_path, tokens, **BLOCK, lora_rank=2, recurrent_lora=True)
    assert torch.equal(loaded.recurrent.tail_bases[0].B_q, model.recurrent.tail_bases[0].B_q)
    with pytest.raises(Exception, match="block_layers"):
        load_adapter(adapter, block_layers=1)


def test_bad_block_settings_are_refused():
    base = tiny_base("llama")
    with pytest.raises(ValueError, match=r"recurrent_layer must lie between the prelude and the coda \(its block of 3"):
        OuroborosModel.from_base(base, OuroborosConfig(**{**TINY_SPLIT, "recurrent_layer": 4, "block_layers": 3}))
    with pytest.raises(ValueError, match="n_prelude \\+ n_coda \\+ block_layers must be <="):
        OuroborosModel.from_base(base, OuroborosConfig(**{**TINY_SPLIT, "block_layers": 5}))
    with pytest.raises(ValueError, match="block_layers must be 1"):
        OuroborosConfig(**TINY_SPLIT, block_layers=2, heal_layers=1, lora_rank=2)
