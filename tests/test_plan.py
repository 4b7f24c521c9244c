"""`ouroboros plan`: each rule against an independent computation on a tiny model, the plan file refused when
it is wrong or made for another base, and `convert --plan` building exactly the planned layers."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, assert_equivalent, assert_same_in_float64, save_tiny_base, tiny_base, tiny_tokenizer, write_corpus
from ouroboros_lm import load_base_model
from ouroboros_lm.adapter import load_adapter
from ouroboros_lm.cli import main
from ouroboros_lm.config import OuroborosConfig
from ouroboros_lm.plan import (PlanConfig, Stack, angular_rule, block_candidates, ends_rule, loop_order, make_plan,
                               planned_config, ranked, read_plan)
from test_core import hf_pruned

pytestmark = pytest.mark.usefixtures("one_thread")
L = TINY["num_hidden_layers"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("calibration"), n_docs=6, words=200)


def plan_of(corpus, **changes) -> dict:
    pc = PlanConfig(**{"base": "tiny", "data": (str(corpus),), "keep": 5, "blocks": 2, "seq_len": 32, **changes})
    return make_plan(pc, tiny_base(), tiny_tokenizer(), "tiny", progress=False)


@pytest.mark.equivalence
def test_the_stack_is_hugging_faces_model_on_those_layers(tokens):
    """Any order of layers (repeats too) run by `Stack` gives Hugging Face's own loss on those layers."""
    stack = Stack(tiny_base().double(), tokens)  # float64: the comparison holds on any CPU
    for order in ([0, 1, 4, 6, 7], [0, 3, 3, 7], list(range(L))):
        with torch.no_grad():
            hf = hf_pruned(tiny_base().double(), order)(tokens, labels=tokens, use_cache=False).loss
            assert_equivalent(stack.loss_of(order), hf, dtype=torch.float32)  # losses are float32


@pytest.mark.equivalence
def test_block_influence_and_angular_distance_from_hugging_faces_hidden_states(tokens):
    base = tiny_base().double()  # float64: the comparison holds on any CPU
    with torch.no_grad():
        _, states = Stack(base, tokens).run(range(L), keep_inputs=True)
        hidden = base(tokens, output_hidden_states=True).hidden_states  # inputs of layers 0..L-1 (then normed)
    for i in range(L):
        assert_same_in_float64(states[i], hidden[i])
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()  # noqa: E731
    from ouroboros_lm.plan import block_influence

    assert_equivalent(block_influence(states), [1 - cos(states[i], states[i + 1]) for i in range(L)], dtype=torch.float64)
    keep = 5  # drop 3 contiguous layers: the start whose input and output (3 layers on) are most alike
    start = max(range(L - 3 + 1), key=lambda s: cos(states[s], states[s + 3]))
    assert angular_rule(states, keep) == [i for i in range(L) if not start <= i < start + 3]


def test_greedy_removes_the_layer_whose_removal_costs_least(corpus, tokens):
    """keep = L - 1 with every layer tried: the removed layer is the one a brute-force search picks."""
    plan = plan_of(corpus, keep=L - 1, rules=("greedy",), shortlist=0)
    from ouroboros_lm.data import domain_blocks

    search = domain_blocks([str(corpus)], tiny_tokenizer(), 32, 4, 0)[:2]
    stack = Stack(tiny_base(), search)
    with torch.no_grad():
        best = min(range(L), key=lambda i: stack.loss_of([j for j in range(L) if j != i]))
    assert plan["keep_layers"] == [j for j in range(L) if j != best]
    assert plan["ranking"][-1] == best and sorted(plan["ranking"]) == list(range(L))


def test_the_plan_scores_every_rule_and_loops_the_best_block(corpus):
    plan = plan_of(corpus, block_layers=2)
    by_rule = {c["rule"]: c for c in plan["candidates"]}
    assert set(by_rule) == {"ends", "block_influence", "angular", "greedy"}
    assert by_rule["ends"]["keep_layers"] == ends_rule(L, 5, 2) == [0, 1, 4, 5, 7]
    assert plan["loss"] == min(c["loss"] for c in plan["candidates"]) and plan["keep_layers"] == \
        min(plan["candidates"], key=lambda c: c["loss"])["keep_layers"]
    kept = plan["keep_layers"]
    firsts = block_candidates(kept, 2)
    assert [b["recurrent_layer"] for b in plan["blocks"]] == firsts
    rec = plan["recursion"]
    if firsts:
        assert rec["recurrent_layer"] == min(plan["blocks"], key=lambda b: b["loss_depth2"])["recurrent_layer"]
        cfg = planned_config(plan, OuroborosConfig(block_layers=2, variant="none"))
        assert cfg.kept_layers(L) == kept and cfg.middle_layers(L) == [rec["recurrent_layer"], rec["recurrent_layer"] + 1]
    assert loop_order([0, 2, 3, 5, 7], 2, 2, 2) == [0, 2, 3, 2, 3, 5, 7]
    assert block_candidates([0, 2, 3, 5, 7], 2) == [2] and block_candidates([0, 1, 5, 7], 2) == []


def test_convert_with_a_plan_builds_its_layers_and_refuses_bad_plans(tmp_path, corpus):
    base = save_tiny_base(tmp_path / "base")
    out = tmp_path / "plan.json"
    assert main(["plan", "--base", base, "--data", str(corpus), "--keep", "5", "--blocks", "2", "--seq-len", "32",
                 "--out", str(out)]) == 0
    plan = read_plan(out)
    assert main(["convert", "--base", base, "--plan", str(out), "--out", str(tmp_path / "heal"), "--heal-layers", "1",
                 "--lora-rank", "2"]) == 0
    assert load_adapter(tmp_path / "heal").config.kept_layers(L) == plan["keep_layers"]
    if plan["recursion"] is not None:
        assert main(["convert", "--base", base, "--plan", str(out), "--out", str(tmp_path / "loop"), "--rank", "2"]) == 0
        cfg = load_adapter(tmp_path / "loop").config
        assert cfg.kept_layers(L) == plan["keep_layers"] and cfg.recurrent_layer == plan["recursion"]["recurrent_layer"]

    def edited(**changes):
        bad = tmp_path / f"bad-{len(list(tmp_path.glob('bad-*')))}.json"
        bad.write_text(json.dumps({**plan, **changes}))
        return str(bad)

    cases = [(edited(keep_layers=[0, 3, 3, 7]), "sorted and without duplicates"),
             (edited(keep_layers=[0, 3, 9]), r"in \[0, 7\]"),
             (edited(recursion={"keep_layers": [0, 3, 5, 7], "recurrent_layer": 3, "block_layers": 2}),
              "must keep the recurrent block 3-4"),
             (edited(format="other"), "not a plan"),
             (edited(num_layers=12, ranking=list(range(12))), "made for another base")]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            if "another base" in match:
                from ouroboros_lm.plan import check_plan_base

                check_plan_base(read_plan(path), load_base_model(base), path)
            else:
                read_plan(path)
        assert main(["convert", "--base", base, "--plan", path, "--out", str(tmp_path / "x"), "--heal-layers", "1",
                     "--lora-rank", "2"]) == 2
    assert not (tmp_path / "x").exists()


def test_ranked_sizes_and_their_limits(corpus):
    plan = plan_of(corpus, rules=("block_influence",))
    influence = plan["block_influence"]
    assert ranked(plan, 3) == sorted(sorted(range(L), key=lambda i: -influence[i])[:3])
    greedy = plan_of(corpus, rules=("greedy",))
    assert set(greedy["keep_layers"]) < set(ranked(greedy, 6)) and len(ranked(greedy, 6)) == 6
    with pytest.raises(ValueError, match="gives no fewer than 5 layers"):
        ranked(greedy, 4)
    with pytest.raises(ValueError, match="keep at least 4"):
        plan_of(corpus, keep=3, block_layers=2)


def test_angular_and_ends_plans_give_every_other_size_as_their_rule_would_choose_it(corpus):
    """A plan won by angular records the span it drops at every size: `ranked` at any count is what planning again
    at that count proposes (not nested: one contiguous span each). The ends need nothing but the count."""
    plan = plan_of(corpus, rules=("angular",))
    assert plan["rule"] == "angular" and len(plan["angular_starts"]) == L
    for keep in range(3, L + 1):
        again = plan_of(corpus, rules=("angular",), keep=keep)["keep_layers"]
        assert ranked(plan, keep) == again
        dropped = sorted(set(range(L)) - set(again))
        assert len(dropped) == L - keep and dropped == list(range(min(dropped, default=0), max(dropped, default=-1) + 1))
    ends = plan_of(corpus, rules=("ends",))
    for keep in range(3, L + 1):
        assert ranked(ends, keep) == ends_rule(L, keep, 1) == plan_of(corpus, rules=("ends",), keep=keep)["keep_layers"]
    with pytest.raises(ValueError, match="keep must be at least 3"):
        ranked(ends, 2)
    older = {k: v for k, v in plan.items() if k != "angular_starts"}  # a plan written before the spans were kept
    with pytest.raises(ValueError, match=r"gives no other sizes than 5 layers: run `ouroboros plan --keep 6`"):
        ranked(older, 6)


@pytest.mark.parametrize("starts", [[0] * (L - 1), [0, 0, 0, 0, 0, 0, 0, 2], [0, 0, -1, 0, 0, 0, 0, 0],
                                    [0, 0, 0, 0, 0, 0, 0, True], "0"])
def test_a_plan_with_bad_angular_spans_is_refused(corpus, tmp_path, starts):
    plan = plan_of(corpus, rules=("angular",))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**plan, "angular_starts": starts}))
    with pytest.raises(ValueError, match="angular_starts must hold"):
        read_plan(path)
    path.write_text(json.dumps(plan))
    assert read_plan(path)["angular_starts"] == plan["angular_starts"]
