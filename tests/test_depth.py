"""Depth that pays: per-step parameters past the trained depths, truncated backpropagation,
depth schedules, and per-token adaptive exit (causal, and cached = recomputed under the same
decisions)."""
from __future__ import annotations

import statistics

import pytest
import torch

from conftest import TINY, assert_equivalent, assert_same_in_float64, randomize_trainables, tiny_ouroboros
from ouroboros_lm import RecursionPolicy, StepTraining, TrainConfig
from ouroboros_lm.exits import ExitRule
from ouroboros_lm.schedules import step_depth


def trained_model(**kw):
    model = tiny_ouroboros("qwen2", **kw)
    randomize_trainables(model, scale=0.3)
    return model


def test_steps_past_the_trained_depth_use_the_last_trained_steps_parameters(tokens):
    model = trained_model()
    reference = trained_model()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():  # the reference copies step 3's parameters into steps 4 and 5 by hand
        for p in (reference.recurrent.step_norms.weight, reference.recurrent.controller.step_embedding.weight):
            p[4:] = p[3]
    model.policy = model.policy.replace(trained_depth=4)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, depth=6).logits, reference(tokens, depth=6).logits, atol=0, rtol=0)
        assert not torch.equal(model(tokens, depth=6).logits, model(tokens, depth=4).logits)


def test_truncated_backprop_trains_only_the_last_k_steps_and_keeps_the_loss(tokens):
    model = trained_model().train()
    full = model(tokens, labels=tokens, depth=6, training=StepTraining("never")).loss
    model.zero_grad(set_to_none=True)
    truncated = model(tokens, labels=tokens, depth=6, training=StepTraining("never", backprop_steps=2)).loss
    truncated.backward()
    assert torch.equal(full, truncated)
    g = model.recurrent.step_norms.weight.grad
    assert g[:4].abs().sum() == 0 and (g[4:6].abs().sum(dim=(1, 2)) > 0).all()
    emb = model.recurrent.controller.step_embedding.weight.grad
    assert emb[:4].abs().sum() == 0 and (emb[4:6].abs().sum(dim=1) > 0).all()


def test_depth_schedules_are_deterministic_and_stay_in_range():
    uniform = TrainConfig(depths=(2, 4, 8))
    assert [step_depth(uniform, s) for s in range(50)] == [step_depth(uniform, s) for s in range(50)]
    assert {step_depth(uniform, s) for s in range(200)} == {2, 4, 8}
    huginn = TrainConfig(depths=(1, 32), depth_schedule="lognormal_poisson", depth_mean=6.0)
    draws = [step_depth(huginn, s) for s in range(4000)]
    assert min(draws) >= 1 and max(draws) <= 32 and abs(statistics.mean(draws) - 6.0) < 0.3


def test_forced_full_depth_equals_the_fixed_depth_forward(tokens):
    model = trained_model()
    with torch.no_grad():
        fixed = model(tokens, depth=5).logits
        forced = model(tokens, depth=5, exit_steps=torch.full_like(tokens, 5))
    assert torch.equal(fixed, forced.logits) and (forced.steps == 5).all()


@pytest.mark.equivalence
@pytest.mark.parametrize("variant,gate", [("controller", True), ("static", False), ("none", True)])
def test_cached_decoding_equals_recomputing_under_the_same_exit_decisions(variant, gate):
    model = trained_model(variant=variant, gate=gate).double()  # float64: the comparison holds on any CPU
    ids = torch.randint(0, TINY["vocab_size"], (2, 14), generator=torch.Generator().manual_seed(3))
    decided = torch.randint(1, 9, ids.shape, generator=torch.Generator().manual_seed(4))  # varied decisions
    with torch.no_grad():
        full = model(ids, depth=8, exit_steps=decided)
        assert torch.equal(full.steps, decided)
        cache = model.new_cache(8)
        parts = [model(ids[:, :6], depth=8, cache=cache, exit_steps=full.steps[:, :6])]
        parts += [model(ids[:, t : t + 1], depth=8, cache=cache, exit_steps=full.steps[:, t : t + 1]) for t in range(6, 14)]
    assert_same_in_float64(torch.cat([p.logits for p in parts], 1), full.logits)


@pytest.mark.equivalence
def test_adaptive_exit_is_causal():
    model = trained_model().double()  # float64: the comparison holds on any CPU
    a = torch.randint(0, TINY["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(5))
    b = a.clone()
    b[:, 9:] = (b[:, 9:] + 7) % TINY["vocab_size"]
    rule = ExitRule(threshold=0.2)
    with torch.no_grad():
        oa, ob = model(a, depth=8, exit_rule=rule), model(b, depth=8, exit_rule=rule)
    assert torch.equal(oa.steps[:, :9], ob.steps[:, :9])
    assert_same_in_float64(oa.logits[:, :9], ob.logits[:, :9])


def test_generation_with_an_exit_rule_matches_recomputation_and_reports_steps():
    model = trained_model()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(2))
    rule, stats = ExitRule(threshold=0.15), {}
    cached = model.generate(prompt, max_new_tokens=8, depth=8, exit_rule=rule, stats=stats)
    recomputed = model.generate(prompt, max_new_tokens=8, depth=8, exit_rule=rule, use_cache=False)
    assert torch.equal(cached, recomputed)
    steps = torch.stack(stats["steps"])
    assert steps.shape == (8, 1) and 1 <= steps.min() and steps.max() <= 8


def test_exit_settings_are_validated():
    with pytest.raises(ValueError, match="rule must be one of converged, acceleration, kl, entropy, halter"):
        ExitRule(rule="sometimes")
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1000000.0\]"):
        ExitRule(threshold=-0.1)
    model = tiny_ouroboros("llama")
    with pytest.raises(ValueError, match="the pruned baseline has no recursion"):
        model(torch.zeros(1, 4, dtype=torch.long), baseline=True, exit_rule=ExitRule())


def test_a_halter_trains_alone_and_travels_in_the_adapter(tmp_path):
    from conftest import tiny_base, tiny_tokenizer, write_corpus
    from ouroboros_lm import load_adapter, save_adapter
    from ouroboros_lm.data import build_corpus
    from ouroboros_lm.halter_training import HalterConfig, train_halter

    model = trained_model()
    corpus = build_corpus([str(write_corpus(tmp_path / "t", n_docs=8))], tiny_tokenizer(), 24, heldout_fraction=0.25)
    save_adapter(model, tmp_path / "ad")
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    out = train_halter(model, corpus, tmp_path / "ad", HalterConfig(steps=3, max_depth=4, progress=False))
    assert out["halter_step"] == 3 and 1 <= out["expected_steps"] <= 4
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # everything else stays frozen
    loaded = load_adapter(tmp_path / "ad", base=tiny_base("qwen2")).eval()
    assert loaded.config.halter and torch.equal(loaded.recurrent.halter.proj, model.recurrent.halter.proj)
    rule = ExitRule(rule="halter", threshold=1.0)  # any halting probability stops: one step each
    with torch.no_grad():
        assert (loaded(corpus.heldout[:1], depth=4, exit_rule=rule).steps == 1).all()
    with pytest.raises(ValueError, match="needs a model with a trained halter"):
        with torch.no_grad():
            trained_model()(corpus.heldout[:1], depth=4, exit_rule=rule)


@pytest.mark.equivalence
def test_step_damping_scales_each_update_past_the_trained_depth(tokens):
    model = trained_model().double()  # float64: the comparison holds on any CPU
    model.policy = RecursionPolicy(trained_depth=4)
    with torch.no_grad():
        at_4 = model(tokens, depth=4).logits
        model.policy = model.policy.replace(step_damping=0.0)
        assert torch.equal(model(tokens, depth=9).logits, at_4)  # nothing moves past the trained depth
        model.policy = model.policy.replace(step_damping=1.0)  # the reference, step by step: h + 0.5^(s - 3) * (step(h) - h) from s = 4
        h, ctx, _ = model.embed(tokens)
        h = model.run_layers("prelude", h, ctx)
        for s in range(6):
            h = h + (0.5 ** (s - 3) if s >= 4 else 1.0) * (model.recurrent.step(h, s, ctx, None) - h)
        reference = model.head(model.run_layers("coda", h, ctx)).logits
        model.policy = model.policy.replace(step_damping=0.5)
        assert_same_in_float64(model(tokens, depth=6).logits, reference)
    with pytest.raises(ValueError, match=r"step_damping must be in \[0.0, 1.0\]"):
        model.policy.replace(step_damping=1.5)
    with pytest.raises(ValueError, match=r"trained_depth must be in \[0, max_depth=16\]"):
        model.policy = RecursionPolicy(trained_depth=17)


# ---------------------------------------------------------------- per-step supervision
@pytest.mark.equivalence
def test_a_read_out_step_loses_what_the_model_stopped_there_would(tokens):
    """step_losses after s steps are each position's loss of the model run at depth s (an
    independent forward), and the final loss is unchanged by reading out."""
    from ouroboros_lm.loss import token_losses

    model = trained_model().double()  # float64: the comparison holds on any CPU
    with torch.no_grad():
        out = model(tokens, labels=tokens, depth=6, readout_steps=(2, 5))
        assert out.loss.item() == model(tokens, labels=tokens, depth=6).loss.item()
        for i, s in enumerate((2, 5)):
            assert_equivalent(out.step_losses[i], token_losses(model(tokens, depth=s).logits, tokens))  # losses: float32
    for bad in ((0,), (7,), (5, 2)):
        with pytest.raises(ValueError, match=r"readout_steps must be strictly increasing step counts in \[1, depth=6\]"):
            model(tokens, labels=tokens, depth=6, readout_steps=bad)
    with pytest.raises(ValueError, match="readout_steps needs labels"):
        model(tokens, depth=6, readout_steps=(2,))


@pytest.mark.equivalence
def test_per_step_supervision_follows_the_gradient_of_its_objective(tokens):
    """The trainer's objective with step_loss_weight w is L(depth) + w * L(s): its gradient equals
    that of two separate forwards (depth and s) combined by hand."""
    from ouroboros_lm.loss import step_objective

    tc = TrainConfig(step_loss_weight=0.5, depths=(6,))
    model = trained_model().double().train()  # float64 but for the loss (float32): the comparison holds on any CPU
    out = model(tokens, labels=tokens, depth=6, readout_steps=(3,))
    (out.loss + step_objective(tc, out.loss, out.step_losses, tokens)).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    (model(tokens, labels=tokens, depth=6).loss + 0.5 * model(tokens, labels=tokens, depth=3).loss).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_equivalent(ours[n], p.grad, dtype=torch.float32, depth=6, msg=n)


@pytest.mark.equivalence
def test_the_monotonicity_term_charges_only_steps_that_make_the_loss_worse():
    from ouroboros_lm.loss import step_objective

    labels = torch.zeros(1, 3, dtype=torch.long)  # 2 scored positions per row
    per_step = torch.tensor([[[2.0, 2.0, 0.0]], [[3.0, 1.0, 0.0]], [[1.0, 1.0, 0.0]]])  # means 2, 2, 1
    tc = TrainConfig(monotonic_weight=1.0)
    assert_equivalent(step_objective(tc, torch.tensor(1.5), per_step, labels), 0.5)  # 1 -> 1.5
    assert step_objective(tc, torch.tensor(0.5), per_step, labels).item() == 0.0  # never worse
    both = TrainConfig(monotonic_weight=2.0, step_loss_weight=0.3)
    assert_equivalent(step_objective(both, torch.tensor(0.5), per_step, labels), 0.3 * 5 / 3)


def test_read_out_steps_are_drawn_among_the_steps_with_gradients():
    from ouroboros_lm.schedules import readout_steps

    assert readout_steps(TrainConfig(), 3, 8) == ()  # off
    tc = TrainConfig(step_loss_weight=1.0, step_loss_samples=2, backprop_steps=4)
    draws = [readout_steps(tc, s, 10) for s in range(200)]
    assert draws == [readout_steps(tc, s, 10) for s in range(200)]  # a function of (seed, step)
    assert all(len(d) == 2 and all(6 <= x < 10 for x in d) for d in draws)
    assert {x for d in draws for x in d} == {6, 7, 8, 9}
    assert readout_steps(tc, 0, 1) == ()  # depth 1: nothing before the last step
