"""Where a fresh loop starts (`loop_start`, issue #44): "stack" and "rezero" make step 1 the block itself, so an
untrained loop at depth 1 is exactly the same kept layers run once (the heal model's untrained forward, Hugging
Face's model on those layers), and each later step a small change that training can grow: behind the gate
(stack) or a per-step scale, zero at init (rezero, so every depth starts at the stack). "gate" (the paper's)
keeps its old behaviour."""
from __future__ import annotations

import pytest
import torch

from conftest import (TINY, TINY_SPLIT, assert_same_in_float64, randomize_trainables, round_trip_and_export, tiny_base,
                      tiny_ouroboros)
from ouroboros_lm import OuroborosConfig, OuroborosModel
from ouroboros_lm.memory import trainable_parameter_count
from ouroboros_lm.peft_lora import adaptation_parameter_count
from test_core import hf_pruned

pytestmark = pytest.mark.usefixtures("one_thread")

STARTS = {"stack": dict(loop_start="stack"), "rezero": dict(loop_start="rezero", gate=False)}
# the demo's loop in small: a block of two layers, input injection, plain LoRA on every kept layer (zero at init)
LOOP = dict(block_layers=2, injection="linear", lora_rank=2, recurrent_lora=True, prelude_lora_layers=2)
KEPT = [0, 1, 4, 5, 6, 7]  # the tiny split with a block of two: prelude 0-1, block 4-5, coda 6-7


def in_float64(model: OuroborosModel) -> OuroborosModel:
    return model.double().eval()


@pytest.mark.parametrize("start", list(STARTS))
@pytest.mark.parametrize("options", [dict(variant="none"), dict(variant="static"), dict(variant="controller"),
                                     dict(variant="none", state_scale="anchored", recurrent_lora_steps=2)])
def test_depth_one_is_the_same_kept_layers_run_once(start, options, tokens):
    """At init, depth 1 of a loop that starts at its stack equals the heal model on the same kept layers (its
    untrained forward: bit for bit in float32, and in float64) and Hugging Face's model on exactly those layers (in
    float64); with rezero, every depth does."""
    model = tiny_ouroboros("llama", **LOOP, **STARTS[start], **options).eval()
    assert model.config.kept_layers(TINY["num_hidden_layers"]) == KEPT
    heal = OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(
        **TINY_SPLIT, keep_layers=tuple(KEPT), heal_layers=1, lora_rank=2)).eval()
    with torch.no_grad():  # bit for bit, in the precision the models run in
        assert torch.equal(model(tokens, depth=1).logits, heal(tokens).logits)
    model, heal = in_float64(model), in_float64(heal)
    hf = hf_pruned(tiny_base("llama").double(), KEPT)
    with torch.no_grad():
        ours = model(tokens, depth=1).logits
        assert_same_in_float64(ours, heal(tokens).logits)
        assert_same_in_float64(ours, hf(tokens, use_cache=False).logits)
        if start == "rezero":  # a_s = 0: the later steps change nothing yet
            for depth in (2, 5):
                assert_same_in_float64(model(tokens, depth=depth).logits, ours)
        else:  # the later steps are behind the gate at gate_bias: a change, and a small one
            deeper = model(tokens, depth=2).logits
            assert (deeper - ours).abs().max().item() > 1e-6


def test_the_papers_gate_does_not_start_at_the_stack(tokens):
    """Today's start (every step gated at b = -2) keeps 88% of the prelude's output at step 1: depth 1 is not the
    kept layers run once; the gate's bias is still the paper's -2 by default."""
    model = in_float64(tiny_ouroboros("llama", **LOOP))
    assert model.config.loop_start == "gate" and model.config.gate_bias == -2.0
    hf = hf_pruned(tiny_base("llama").double(), KEPT)
    with torch.no_grad():
        diff = (model(tokens, depth=1).logits - hf(tokens, use_cache=False).logits).abs().max().item()
    assert diff > 1e-3


@pytest.mark.parametrize("start", list(STARTS))
def test_extra_steps_are_a_learnable_change(start, tokens):
    """The gradient of a depth-2 loss reaches what governs step 2 (the ReZero scale a_2; the gate), not what no
    step uses (a_1: step 1 is the block itself); one optimiser step on it alone makes depth 2 differ from depth 1."""
    model = tiny_ouroboros("llama", **LOOP, **STARTS[start]).train()
    rec = model.recurrent
    param = rec.rezero.weight if start == "rezero" else rec.gate.bias
    model(tokens, labels=tokens, depth=2).loss.backward()
    grad = param.grad
    if start == "rezero":
        assert grad[0].abs().max().item() == 0.0  # step 1 has no scale
        assert grad[1].abs().max().item() > 0.0
        assert grad[2:].abs().max().item() == 0.0  # steps never run
    else:
        assert grad.abs().max().item() > 0.0
    model.zero_grad()
    model(tokens, labels=tokens, depth=1).loss.backward()  # depth 1 never reads the gate or a scale
    assert param.grad is None or param.grad.abs().max().item() == 0.0
    model.eval()
    with torch.no_grad():
        before = model(tokens, depth=2).logits - model(tokens, depth=1).logits
        param.add_(1e-2 * torch.sign(grad))
        after = model(tokens, depth=2).logits - model(tokens, depth=1).logits
    assert (after - before).abs().max().item() > 1e-6


@pytest.mark.parametrize("start", list(STARTS))
def test_started_loops_round_trip_export_and_stay_causal(start, tmp_path, tokens):
    """Saved, loaded and exported with the new parts trained (random); causal and its cached decoding the argmax of
    recomputing, at a depth whose later steps use them."""
    model, loaded, _ = round_trip_and_export(tmp_path, tokens, depth=3, **LOOP, **STARTS[start])
    assert loaded.config.loop_start == start
    if start == "rezero":
        assert torch.equal(loaded.recurrent.rezero.weight, model.recurrent.rezero.weight)
        assert model.recurrent.rezero.weight.abs().min().item() > 0.0  # randomised: the scale is in play
    t = 11
    changed = tokens.clone()
    changed[:, t:] = (changed[:, t:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(tokens, depth=3).logits, model(changed, depth=3).logits
        assert (a[:, :t] - b[:, :t]).abs().max().item() <= 1e-6
        out = model.generate(tokens[:, :8], max_new_tokens=5, depth=3)
        for i in range(8, out.shape[1]):
            assert torch.equal(model(out[:, :i], depth=3).logits[:, -1].argmax(-1), out[:, i])


@pytest.mark.parametrize("start", list(STARTS))
def test_trainable_count_from_settings_matches_the_model(start):
    model = tiny_ouroboros("llama", **LOOP, **STARTS[start])
    expected = trainable_parameter_count(model.config, TINY["hidden_size"]) + \
        adaptation_parameter_count(model.config, tiny_base("llama").model.layers[0], TINY["hidden_size"])
    assert expected == model.num_trainable_parameters() == model.trainable_parameter_breakdown()["total"]


def test_past_the_trained_depth_rezero_reuses_the_last_trained_scale_and_damps(tokens):
    """Past trained_depth the later steps reuse the last trained step's scale, damped by the policy, so depth 8
    of a loop trained at 2 runs on trained parameters only."""
    model = tiny_ouroboros("llama", **LOOP, **STARTS["rezero"])
    randomize_trainables(model, scale=0.3)
    model.policy = model.policy.replace(trained_depth=2, step_damping=0.5)
    with torch.no_grad():
        model.recurrent.rezero.weight[2:].fill_(float("nan"))  # never trained: never read
        assert torch.isfinite(model.eval()(tokens, depth=8).logits).all()


def test_mismatched_start_settings_are_refused():
    with pytest.raises(ValueError, match="loop_start stack .* needs gate"):
        OuroborosConfig(**TINY_SPLIT, loop_start="stack", gate=False)
    with pytest.raises(ValueError, match="loop_start rezero .* needs the gate off"):
        OuroborosConfig(**TINY_SPLIT, loop_start="rezero")
    with pytest.raises(ValueError, match="loop_start"):
        OuroborosConfig(**TINY_SPLIT, loop_start="open")
    OuroborosConfig(**TINY_SPLIT, keep_layers=(0, 1, 4, 6, 7), heal_layers=1, lora_rank=2, loop_start="rezero")
