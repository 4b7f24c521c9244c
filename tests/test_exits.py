"""Per-step readouts and the exit rules: the readout at step s is the loss of depth s (HF-aligned,
with its gradient, paid only where asked), every rule is causal, threshold 0 is the fixed depth,
cached decoding makes the full forward's decisions, and the halter's objectives train it (the
entropy term spreading its exits)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, assert_equivalent, assert_same_in_float64, randomize_trainables, tiny_ouroboros
from ouroboros_lm.exits import RULES, ExitRule
from ouroboros_lm.halter import exit_entropy, expected_loss, halting_distribution, improvement_targets
from ouroboros_lm.loss import token_losses

pytestmark = pytest.mark.usefixtures("one_thread")

# thresholds at which the tiny random model's tokens stop at varied steps under each rule
VARIED = {"converged": 0.15, "acceleration": 0.3, "kl": 3e-4, "entropy": 1e-4, "halter": 0.5}


def trained_model(**kw):
    model = tiny_ouroboros("qwen2", halter=True, **kw)
    randomize_trainables(model, scale=0.3)
    return model


def ids_of(seed: int, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def scored(ids: torch.Tensor) -> torch.Tensor:
    w = torch.ones_like(ids, dtype=torch.float32)
    w[:, -1] = 0
    return w


@pytest.fixture(scope="module")
def model():
    return trained_model().double()  # float64 (but for losses): the comparisons hold on any CPU


@pytest.mark.equivalence
def test_each_readout_is_the_loss_of_that_depth_and_the_last_is_the_final_loss(model):
    ids = ids_of(0)
    with torch.no_grad():
        out = model(ids, labels=ids, depth=6, readout_steps=(1, 3, 6))
        assert out.step_losses.shape == (3, 2, 16) and out.step_halts.shape == (3, 2, 16)
        w = scored(ids)
        # the last readout is the forward's own coda pass: its mean over the scored tokens is the loss
        assert_equivalent((out.step_losses[-1] * w).sum() / w.sum(), out.loss)
        for k, d in enumerate((1, 3, 6)):
            fixed = model(ids, labels=ids, depth=d)
            assert_equivalent(out.step_losses[k], token_losses(fixed.logits, ids))
            assert_equivalent((out.step_losses[k] * w).sum() / w.sum(), fixed.loss)
        halts = model(ids, labels=ids, depth=6, readout_steps=range(1, 7)).step_halts
        assert_same_in_float64(out.step_halts, halts[[0, 2, 5]])


@pytest.mark.equivalence
def test_readouts_carry_the_gradient_of_that_depth_and_are_paid_only_where_asked():
    model = trained_model().double().train()  # float64 but for the loss (float32): the comparison holds on any CPU
    ids = ids_of(1)
    w = scored(ids)
    out = model(ids, labels=ids, depth=5, readout_steps=(2, 5))
    ((out.step_losses[0] * w).sum() / w.sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, depth=2).loss.backward()
    direct = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == direct.keys() and ours
    for n in ours:
        assert_equivalent(ours[n], direct[n], dtype=torch.float32, depth=5, msg=n)
    calls = []
    run = model.run_layers
    model.run_layers = lambda part, *a, **k: (calls.append(part), run(part, *a, **k))[1]
    try:
        with torch.no_grad():
            model(ids, labels=ids, depth=8, readout_steps=(3, 8))
    finally:
        del model.run_layers
    assert calls.count("coda") == 2  # step 3's readout and the final pass (which is step 8's)


def test_readout_steps_are_validated(model):
    ids = ids_of(2, (1, 6))
    for bad in [(0,), (5,), (2, 2), (3, 1), (), (1.5,)]:
        with pytest.raises(ValueError, match=r"readout_steps must be strictly increasing step counts in \[1, depth=4\]"):
            model(ids, labels=ids, depth=4, readout_steps=bad)
    with pytest.raises(ValueError, match="readout_steps needs labels"):
        model(ids, depth=4, readout_steps=(1,))
    with pytest.raises(ValueError, match="readout_steps needs labels, and works without a cache or an exit rule"):
        model(ids, labels=ids, depth=4, readout_steps=(1,), exit_rule=ExitRule())
    with pytest.raises(ValueError, match="the pruned baseline has no recursion steps to read out"):
        model(ids, labels=ids, baseline=True, readout_steps=(1,))


@pytest.mark.equivalence
@pytest.mark.parametrize("rule", RULES)
def test_threshold_zero_runs_every_step_as_the_fixed_depth(model, rule):
    ids = ids_of(3)
    with torch.no_grad():
        out = model(ids, depth=6, exit_rule=ExitRule(rule=rule, threshold=0.0))
        assert (out.steps == 6).all()
        assert_same_in_float64(out.logits, model(ids, depth=6).logits)


@pytest.mark.equivalence
@pytest.mark.parametrize("rule", RULES)
def test_every_rule_is_causal_and_stops_tokens_at_varied_steps(model, rule):
    a = ids_of(4, (1, 16))
    b = a.clone()
    b[:, 9:] = (b[:, 9:] + 7) % TINY["vocab_size"]
    r = ExitRule(rule=rule, threshold=VARIED[rule])
    with torch.no_grad():
        oa, ob = model(a, depth=8, exit_rule=r), model(b, depth=8, exit_rule=r)
    assert torch.equal(oa.steps[:, :9], ob.steps[:, :9])
    assert_same_in_float64(oa.logits[:, :9], ob.logits[:, :9])
    assert len(set(oa.steps.flatten().tolist())) > 1, oa.steps  # a spread, not one bar


@pytest.mark.equivalence
@pytest.mark.parametrize("rule", RULES)
def test_cached_decoding_makes_the_full_forwards_decisions(model, rule):
    r = ExitRule(rule=rule, threshold=VARIED[rule])
    prompt, stats = ids_of(5, (2, 6)), {}
    cached = model.generate(prompt, max_new_tokens=8, depth=8, exit_rule=r, stats=stats)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=8, depth=8, exit_rule=r, use_cache=False))
    with torch.no_grad():
        full = model(cached, depth=8, exit_rule=r)
        cache = model.new_cache(8, readout=r.reads_predictions)
        parts = [model(cached[:, :6], depth=8, cache=cache, exit_rule=r)]
        parts += [model(cached[:, t : t + 1], depth=8, cache=cache, exit_rule=r) for t in range(6, cached.shape[1])]
    assert torch.equal(torch.cat([p.steps for p in parts], 1), full.steps)
    assert_same_in_float64(torch.cat([p.logits for p in parts], 1), full.logits)
    assert len(set(full.steps.flatten().tolist())) > 1


def test_a_rule_reading_predictions_needs_a_cache_with_readout_slots(model):
    ids = ids_of(6, (1, 4))
    with torch.no_grad(), pytest.raises(ValueError, match=r"new_cache\(depth, readout=True\)"):
        model(ids, depth=4, cache=model.new_cache(4), exit_rule=ExitRule(rule="kl", threshold=1e-3))
    with torch.no_grad(), pytest.raises(ValueError, match="only such a rule may use one"):
        model(ids, depth=4, cache=model.new_cache(4, readout=True), exit_rule=ExitRule())


@pytest.mark.equivalence
def test_the_expected_loss_objective_and_the_improvement_targets_match_a_direct_computation():
    lam = torch.tensor([[0.2], [0.5], [0.9]])  # 3 steps, one token
    p = halting_distribution(lam)
    assert_equivalent(p, torch.tensor([[0.2], [0.4], [0.4]]))  # the last step takes the rest
    losses = torch.tensor([[3.0], [2.0], [1.5]])
    entropy = -(0.2 * torch.log(torch.tensor(0.2)) + 2 * 0.4 * torch.log(torch.tensor(0.4)))
    assert_equivalent(exit_entropy(lam), entropy.view(1))
    want = 0.2 * (3.0 + 0.1 * 1) + 0.4 * (2.0 + 0.1 * 2) + 0.4 * (1.5 + 0.1 * 3) - 0.5 * entropy
    assert_equivalent(expected_loss(lam, losses, ponder_cost=0.1, entropy_weight=0.5), want)
    targets = improvement_targets(losses, margin=0.6, sharpness=1e4)  # gains 1.0 and 0.5: continue, then stop
    assert_equivalent(targets, torch.tensor([[0.0], [1.0]]))


@pytest.mark.parametrize("objective", ["expected", "improvement"])
def test_a_gradient_step_lowers_the_halters_objective_on_a_fixed_batch(objective):
    from ouroboros_lm.halter_training import HalterConfig, attach_halter, halter_loss

    model = trained_model()
    halter = attach_halter(model)
    hc = HalterConfig(objective=objective, max_depth=6, ponder_cost=0.01, entropy_weight=0.05)
    ids = ids_of(7)
    loss, stats = halter_loss(model, ids, hc)
    assert 1 <= stats["expected_steps"] <= 6 and 0 <= stats["exit_entropy"] <= torch.log(torch.tensor(6.0))
    loss.backward()
    assert all(p.grad is not None for p in halter.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("recurrent.halter."))
    with torch.no_grad():
        for p in halter.parameters():
            p -= 1e-2 * p.grad
    after, _ = halter_loss(model, ids, hc)
    assert after.item() < loss.item()


def test_the_entropy_term_spreads_the_exit_distribution():
    from ouroboros_lm.halter_training import HalterConfig, attach_halter, halter_loss

    ids = ids_of(8)
    entropies = []
    for beta in (0.0, 0.5):
        model = trained_model()
        halter = attach_halter(model)
        hc = HalterConfig(max_depth=6, ponder_cost=0.05, entropy_weight=beta)
        opt = torch.optim.Adam(halter.parameters(), lr=0.05)
        for _ in range(15):
            loss, _ = halter_loss(model, ids, hc)
            loss.backward()
            opt.step()
            opt.zero_grad()
        entropies.append(halter_loss(model, ids, hc)[1]["exit_entropy"])
    assert entropies[1] > entropies[0] + 0.3, entropies  # the ponder cost alone collapses the exits early


def test_the_comparison_reads_each_rule_at_equal_mean_steps_beside_the_fixed_depths(model):
    from ouroboros_lm.exit_eval import ExitEvalConfig, bracket, compare_exits

    blocks = ids_of(9, (3, 16))
    cfg = ExitEvalConfig(rules=("converged", "kl", "halter"), max_depth=6, depths=(1, 2, 3, 4), targets=(2.0, 3.0, 3.5),
                         points=4, refine=1, batch_size=2)
    cmp = compare_exits(model, blocks, cfg, progress=False)
    fixed = {int(p.mean_steps): p.loss for p in cmp.fixed}
    at = {t: cmp.at(t) for t in cfg.targets}
    assert at[2.0]["fixed depth"] == fixed[2] and at[3.5]["fixed depth"] == pytest.approx((fixed[3] + fixed[4]) / 2)
    for name, points in cmp.rules.items():
        assert len(points) >= 4 and all(sum(p.hist) == blocks.numel() for p in points)
        for t in cfg.targets:  # each rule's loss at t lies between the two sweep points around it
            pair = bracket(points, t)
            assert (pair is None) == (at[t][name] is None)
            if pair is not None:
                a, b = pair
                assert min(a.mean_steps, b.mean_steps) <= t <= max(a.mean_steps, b.mean_steps)
                assert min(a.loss, b.loss) - 1e-9 <= at[t][name] <= max(a.loss, b.loss) + 1e-9
    assert "fixed depth" in cmp.table() and "| converged |" in cmp.table(markdown=True)
    assert max(p.modal_share for p in cmp.rules["converged"]) <= 1


def test_eval_exits_writes_the_table_and_refuses_a_halter_it_does_not_have(tmp_path, capsys):
    import json

    from conftest import TINY_SPLIT, save_tiny_base, write_corpus
    from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model, save_adapter
    from ouroboros_lm.cli import main

    base = save_tiny_base(tmp_path / "base")
    model = OuroborosModel.from_base(load_base_model(base), OuroborosConfig(**TINY_SPLIT), base_name=base)
    randomize_trainables(model, scale=0.3)
    save_adapter(model, tmp_path / "ad")
    text = write_corpus(tmp_path / "text", n_docs=8)
    args = ["eval-exits", "--adapter", str(tmp_path / "ad"), "--data", str(text), "--seq-len", "32", "--blocks", "2",
            "--exit-max-depth", "5", "--depths", "1,2,3", "--targets", "2,3", "--points", "3", "--refine", "1"]
    capsys.readouterr()
    assert main([*args, "--exit-rules", "converged", "halter"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exit rule halter needs an adapter with a trained halter" in err[0]
    assert main([*args, "--exit-rules", "acceleration", "entropy", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "loss at mean steps/token" in printed and "acceleration" in printed
    found = json.loads((tmp_path / "out" / "exits.json").read_text())
    assert set(found["rules"]) == {"acceleration", "entropy"} and set(found["at_equal_steps"]) == {"2", "3"}
    assert all((tmp_path / "out" / f).is_file() for f in ("exits.md", "exits_compute.png", "exits_steps.png"))
