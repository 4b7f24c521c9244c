"""Per-step plain LoRA on the recurrent block (`recurrent_lora_steps`, the relaxation of Relaxed Recursive
Transformers): step s runs the shared frozen block plus its own low-rank set, min(s, n - 1). Checked against PEFT's
own forward with that set made the active adapter, a fresh model against the shared-set one, which set each step's
gradient reaches, and saving, export and refusals (causality and cached decoding: tests/test_outer.py)."""
from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from conftest import TINY_SPLIT, assert_same_in_float64, randomize_trainables, round_trip_and_export, tiny_ouroboros
from ouroboros_lm import OuroborosConfig
from ouroboros_lm.adapter import load_adapter
from ouroboros_lm.peft_lora import step_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = dict(block_layers=2, lora_rank=2, recurrent_lora=True, recurrent_lora_steps=3)


def block_lora_layers(model) -> list[LoraLayer]:
    return [m for layer in model.recurrent.layers for m in layer.modules() if isinstance(m, LoraLayer)]


def peft_forward_per_step(model, tokens, depth):
    """The reference: the block's projections run PEFT's own forward (no hook of ours), with the step's set made
    each LoRA layer's active adapter (PEFT's `set_adapter`) before the step runs."""
    block = model.recurrent
    steps, original = model.config.recurrent_lora_steps, block.step

    def step(h, s, *args, **kwargs):
        for m in block_lora_layers(model):
            m.set_adapter(step_adapter(min(block.policy.parameter_step(s), steps - 1)))
        return original(h, s, *args, **kwargs)

    block.step, block.lora_set = step, lambda p: None  # PEFT's forward, its active adapter
    try:
        return model(tokens, depth=depth).logits
    finally:
        del block.step, block.lora_set
        for m in block_lora_layers(model):
            m.set_adapter("default")


@pytest.mark.equivalence
@pytest.mark.parametrize("variant", ["none", "controller"])
def test_each_step_adds_its_own_set_as_pefts_forward_does(variant, tokens):
    """Depths 1-5 with 3 sets: equal (float64) to PEFT's own forward with step s's set active, steps past the third
    using the third; and different from the model whose steps all share set 0 (the sets matter)."""
    model = tiny_ouroboros("llama", variant=variant, **STEPS).double()
    randomize_trainables(model, scale=0.3)
    shared = tiny_ouroboros("llama", variant=variant, **{**STEPS, "recurrent_lora_steps": 1}).double()
    shared.load_state_dict({k: v for k, v in model.state_dict().items() if k in shared.state_dict()})
    assert len(block_lora_layers(model)) == 14 and all(
        set(m.lora_A) == {"default", "step1", "step2"} for m in block_lora_layers(model))
    with torch.no_grad():
        for depth in (1, 2, 3, 5):
            ours = model(tokens, depth=depth).logits
            ref = peft_forward_per_step(model, tokens, depth)
            assert_same_in_float64(ours, ref)
            if depth == 1:  # set 0 alone: the shared-set model's
                assert_same_in_float64(ours, shared(tokens, depth=depth).logits)
            else:
                assert (ours - shared(tokens, depth=depth).logits).abs().max() > 1e-3, depth


def test_fresh_sets_start_as_the_shared_loop_and_each_step_trains_its_own(tokens):
    """Zero at init (B = 0): a fresh model's loss is the shared-set model's. A backward at depth 2 reaches sets 0 and 1
    and not 2; at depth 4, set 2 too (steps 3 and 4 share it). Every set trains."""
    model = tiny_ouroboros("llama", **STEPS)
    shared = tiny_ouroboros("llama", **{**STEPS, "recurrent_lora_steps": 1})
    with torch.no_grad():
        assert model(tokens, labels=tokens, depth=3).loss.item() == shared(tokens, labels=tokens, depth=3).loss.item()
    randomize_trainables(model, scale=0.3)
    names = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n and n.startswith("recurrent.")}
    assert {n.split(".lora_B.")[1].split(".")[0] for n in names} == {"default", "step1", "step2"}
    for depth, reached in ((2, {"default", "step1"}), (4, {"default", "step1", "step2"})):
        model.zero_grad(set_to_none=True)
        model.train()(tokens, labels=tokens, depth=depth).loss.backward()
        got = {n.split(".lora_B.")[1].split(".")[0] for n, p in model.named_parameters()
               if n in names and p.grad is not None and p.grad.abs().sum() > 0}
        assert got == reached, depth


@pytest.mark.equivalence
def test_step_sets_round_trip_and_export(tmp_path, tokens):
    model, _, adapter = round_trip_and_export(tmp_path, tokens, **STEPS)
    with pytest.raises(Exception, match="recurrent_lora_steps"):
        load_adapter(adapter, recurrent_lora_steps=2)


def test_step_sets_without_a_recurrent_lora_are_refused():
    with pytest.raises(ValueError, match="recurrent_lora_steps > 1 .* needs recurrent_lora"):
        OuroborosConfig(**TINY_SPLIT, lora_rank=2, recurrent_lora_steps=2)
    with pytest.raises(ValueError, match="needs recurrent_lora"):
        OuroborosConfig(**TINY_SPLIT, lora_rank=2, heal_layers=1, recurrent_lora=True, recurrent_lora_steps=2)
    with pytest.raises(ValueError, match=r"recurrent_lora_steps must be in \[1, max_depth=4\]"):
        OuroborosConfig(**{**TINY_SPLIT, "max_depth": 4}, lora_rank=2, recurrent_lora=True, recurrent_lora_steps=5)


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["phi3", "gemma3"])
def test_each_step_adds_its_own_set_on_other_families(arch):
    """Phi-3's fused modules (each projection a slice of one LoRA-wrapped module) and Gemma 3's own forward: the
    same equality with PEFT's forward, step by step."""
    from test_families import family_model, tokens as family_tokens

    model = family_model(arch, lora_rank=2, recurrent_lora=True, recurrent_lora_steps=2).double()
    ids = family_tokens()
    with torch.no_grad():
        for depth in (2, 3):
            assert_same_in_float64(model(ids, depth=depth).logits, peft_forward_per_step(model, ids, depth))
