"""The alternative every comparison stands beside (the pruned stack healed with plain LoRA), plain LoRA
on the recurrent layer under recursion, and distillation from the full model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, TINY_SPLIT, assert_equivalent, assert_same_in_float64, randomize_trainables, save_tiny_base, tiny_base, tiny_ouroboros, tiny_tokenizer, write_corpus
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model
from ouroboros_lm.peft_lora import adaptation_parameter_count
from ouroboros_lm.adapter import load_adapter, save_adapter
from ouroboros_lm.data import build_corpus
from ouroboros_lm.evaluate import evaluate
from ouroboros_lm.loss import IGNORE, Teacher, distill_loss, shift_labels
from ouroboros_lm.teacher import teacher_targets
from ouroboros_lm.train import TrainConfig, train
from test_core import hf_pruned

pytestmark = pytest.mark.usefixtures("one_thread")
L = TINY["num_hidden_layers"]


def merge_lora_layer(mine, target) -> None:
    """Write each PEFT LoRA update (scale * B A) of layer `mine` into the same projection of `target`."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, m in mine.named_modules():
            if isinstance(m, LoraLayer):
                delta = m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
                target.get_submodule(name).weight.add_(delta)


def merge_lora(model: OuroborosModel, layers) -> None:
    """merge_lora_layer for every kept layer of `model`, into the same-position layer of `layers`."""
    for mine, target in zip(list(model.prelude) + [model.recurrent.layer] + list(model.coda), layers):
        merge_lora_layer(mine, target)


@pytest.mark.equivalence
@pytest.mark.parametrize("n", [1, 2, 3])
def test_heal_model_equals_hugging_face_on_its_kept_layers_with_merged_lora(n, tokens):
    """A heal model is Hugging Face's own model on the kept layers (the N middle ones evenly spaced)
    with the LoRA updates merged into their weights; the baseline switches the LoRA off."""
    model = OuroborosModel.from_base(tiny_base().double(), OuroborosConfig(**TINY_SPLIT, heal_layers=n, lora_rank=2))
    model.double().eval()  # float64: the comparison holds on any CPU (issue #35)
    kept = model.config.kept_layers(L)
    assert len(kept) == TINY_SPLIT["n_prelude"] + n + TINY_SPLIT["n_coda"] and len(set(kept)) == len(kept)
    assert model.config.kept_layers(L)[2:2 + n] == ([4] if n == 1 else model.config.middle_layers(L))
    with torch.no_grad():
        fresh = model(tokens, labels=tokens).loss.item()
        randomize_trainables(model, scale=0.2)
        healed = model(tokens, labels=tokens)
        pruned = model(tokens, labels=tokens, baseline=True)
    ref = hf_pruned(tiny_base().double(), kept)
    with torch.no_grad():
        assert_same_in_float64(pruned.logits, ref(tokens, use_cache=False).logits)
        assert fresh == pruned.loss.item()  # PEFT's B starts at zero: a fresh heal model is the pruned stack
        merge_lora(model, ref.model.layers)
        hf = ref(tokens, labels=tokens, use_cache=False)
    assert_same_in_float64(healed.logits, hf.logits)
    assert healed.loss.item() != pruned.loss.item()


def test_heal_middle_layers_are_evenly_spaced_and_bounded():
    cfg = OuroborosConfig(n_prelude=7, recurrent_layer=15, n_coda=7, heal_layers=4, lora_rank=6)
    assert cfg.middle_layers(30) == [9, 13, 17, 21]  # the equal-compute arm of issue #21
    assert cfg.layer_passes(None) == 18 and OuroborosConfig(lora_rank=1).layer_passes(4) == 8 + 4 + 8
    with pytest.raises(ValueError, match="heal_layers must be in"):
        cfg.replace(heal_layers=17).validate(num_layers=30)
    with pytest.raises(ValueError, match="heal_layers needs lora_rank"):
        OuroborosConfig(heal_layers=1)
    with pytest.raises(ValueError, match="recurrent_lora needs lora_rank"):
        OuroborosConfig(recurrent_lora=True)


def test_heal_model_trains_only_lora_and_round_trips(tmp_path, tokens):
    """Only LoRA trains (every kept layer has it, nothing recursive is built); the count matches the
    settings' arithmetic; save / load rebuilds it bit for bit; cached decoding equals recomputing."""
    model = tiny_ouroboros(heal_layers=2, lora_rank=2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    layers_with_lora = {n.split(".self_attn")[0].split(".mlp")[0] for n in names}
    assert len(layers_with_lora) == TINY_SPLIT["n_prelude"] + 2 + TINY_SPLIT["n_coda"]
    count = adaptation_parameter_count(model.config, model.coda[0], TINY["hidden_size"])
    assert model.num_trainable_parameters() == count == model.trainable_parameter_breakdown()["total"]
    randomize_trainables(model, scale=0.2)
    save_adapter(model, tmp_path / "heal")
    back = load_adapter(tmp_path / "heal", base=tiny_base()).eval()
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model(tokens).logits)
        full = model.generate(tokens[:1, :6], max_new_tokens=8, use_cache=False)
    assert torch.equal(model.generate(tokens[:1, :6], max_new_tokens=8), full)


@pytest.mark.equivalence
def test_recurrent_lora_equals_recursion_on_merged_weights(tokens):
    """Plain LoRA on the recurrent layer, shared by every step, is the recursion on a layer whose
    weights have B A merged in (same SVD bases, Controller, gate, norms and coda LoRA); the pruned
    baseline does not see it."""
    model = tiny_ouroboros(recurrent_lora=True, lora_rank=2)
    plain = tiny_ouroboros(lora_rank=2)
    with torch.no_grad():
        assert torch.equal(model(tokens, depth=3).logits, plain(tokens, depth=3).logits)  # neutral at init
    randomize_trainables(model, scale=0.2)
    missing, _ = plain.load_state_dict(model.state_dict(), strict=False)  # everything but the recurrent LoRA
    assert all(k.startswith("recurrent.layer.") for k in missing)  # only its base weights, renamed by PEFT
    model.double(), plain.double()  # the two sum in different orders: compare where rounding cannot hide anything
    merge_lora_layer(model.recurrent.layer, plain.recurrent.layer)
    with torch.no_grad():
        for depth in (1, 3):
            assert_same_in_float64(model(tokens, depth=depth).logits, plain(tokens, depth=depth).logits)
        unadapted = tiny_ouroboros()
        assert model(tokens, labels=tokens, baseline=True).loss.item() == unadapted(tokens, labels=tokens, baseline=True).loss.item()


# ---------------------------------------------------------------- distillation
@pytest.mark.equivalence
@pytest.mark.parametrize("chunk", [5, 7, 1000])
def test_distill_loss_equals_plain_kl_and_its_gradient(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False).double()
    h = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 9, 16, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 9))
    teacher = Teacher(t, head, weight=1.0)
    ours = distill_loss(h, head, teacher, labels, chunk)
    (g_ours,) = torch.autograd.grad(ours, h)
    valid = shift_labels(labels) != IGNORE
    kl = F.kl_div(F.log_softmax(head(h), -1), F.log_softmax(head(t), -1), log_target=True, reduction="none").sum(-1)
    ref = kl[valid].mean()
    (g_ref,) = torch.autograd.grad(ref, h)
    assert_equivalent(ours, ref, dtype=torch.float32)  # the chunks accumulate in float32
    assert_equivalent(g_ours, g_ref, dtype=torch.float32)


@pytest.mark.equivalence
def test_model_loss_with_the_full_model_as_teacher(tokens):
    """loss = ce_weight * CE + weight * KL(full || ours), the KL computed from both models' logits; a
    model distilled onto its own logits has KL 0."""
    model = tiny_ouroboros(lora_rank=2)
    randomize_trainables(model, scale=0.2)
    model.double()  # float64 but for the losses (float32): the comparison holds on any CPU
    full = tiny_base().double()
    with torch.no_grad():
        out = model(tokens, labels=tokens, depth=2, teacher=teacher_targets(full, tokens, weight=0.5, ce_weight=2.0))
        plain = model(tokens, labels=tokens, depth=2)
        p_full = F.log_softmax(full(tokens).logits, -1)
        p_ours = F.log_softmax(plain.logits, -1)
        kl = (p_full.exp() * (p_full - p_ours)).sum(-1)[:, :-1].mean()
        assert_equivalent(out.ce_loss, plain.loss)
        log_v = math.log(TINY["vocab_size"])  # the size of the log-probabilities the KL sums
        assert_equivalent(out.kl_loss, kl, scale=log_v)
        assert_equivalent(out.loss, 2.0 * plain.loss + 0.5 * kl, dtype=torch.float32)
        # the full model distilled onto itself: a "teacher" that is the pruned stack, against the pruned stack
        pruned = hf_pruned(tiny_base(), model.config.kept_layers(L))
        self_kl = tiny_ouroboros(lora_rank=2)(tokens, labels=tokens, baseline=True,
                                                   teacher=teacher_targets(pruned, tokens, 1.0)).kl_loss
    assert_equivalent(self_kl, torch.zeros(()), scale=log_v)


def test_training_with_distillation_logs_the_kl_and_lowers_it(tmp_path, capsys):
    """Distilling alone (ce_weight 0): the trainer needs the teacher, logs the KL beside the next-token
    loss, and follows the KL's gradient (a small step along it lowers the KL to the full model)."""
    base = save_tiny_base(tmp_path / "base")
    corpus = build_corpus([str(write_corpus(tmp_path / "text", n_docs=12))], tiny_tokenizer(), seq_len=32,
                          heldout_fraction=0.2)
    model = OuroborosModel.from_base(load_base_model(base), OuroborosConfig(**TINY_SPLIT, heal_layers=1,
                                                                            lora_rank=2), base_name=base)
    teacher, held = load_base_model(base), corpus.heldout[:4]

    def kl_to_teacher() -> float:
        with torch.no_grad():
            return model.eval()(held, labels=held, teacher=teacher_targets(teacher, held, 1.0)).kl_loss.item()

    tc = TrainConfig(steps=12, batch_size=2, lr=1e-2, warmup_steps=1, log_every=4, eval_every=12, eval_blocks=2,
                     save_every=12, progress=False, depths=(1,), distill_weight=1.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="needs the full model as the teacher"):
        train(model, corpus, tmp_path / "run0", tc)
    capsys.readouterr()
    train(model, corpus, tmp_path / "run", tc, teacher=teacher)
    said = capsys.readouterr().out
    assert "step 12: held-out loss" in said and "at depth" not in said  # a heal model has no depth
    # the gradient the trainer follows is the KL's: a small step along it lowers the KL on a batch
    before = kl_to_teacher()
    model.train()(held, labels=held, teacher=teacher_targets(teacher, held, 1.0, ce_weight=0.0)).loss.backward()
    grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for _, g in grads))
    with torch.no_grad():
        for p, g in grads:
            p.sub_(1e-3 * g / norm)  # a short step down the gradient: first order, the KL must fall
    assert kl_to_teacher() < before
    from ouroboros_lm.checkpoints import read_metrics

    logged = [r for r in read_metrics(tmp_path / "run") if "kl" in r]
    assert len(logged) == 3 and all(r["kl"] > 0 and r["loss"] > r["kl"] for r in logged)
    with pytest.raises(ValueError, match="both 0"):
        TrainConfig(ce_weight=0.0)


def test_evaluation_rows_carry_layer_passes(tokens):
    """Every row says how many decoder layers a token passes through; a heal model is one row."""
    model = tiny_ouroboros()
    heal = tiny_ouroboros(heal_layers=2, lora_rank=2)
    blocks = {"x": tokens}
    report = evaluate(model, blocks, depths=(1, 3), full_model=tiny_base(), progress=False)
    passes = {r.model: r.layers for r in report.splits["x"]}
    assert passes == {"full": L, "baseline": 5, "ouroboros@1": 5, "ouroboros@3": 7}
    healed = evaluate(heal, blocks, depths=(1, 3), progress=False)
    rows = {r.model: (r.layers, r.trainable) for r in healed.splits["x"]}
    assert rows == {"baseline": (6, None), "heal": (6, heal.num_trainable_parameters())}
    # references measured elsewhere (a sweep's, the demo's) are the split's pruned stack, not this heal stack
    shared = evaluate(heal, blocks, depths=(), known={"x": {"full": 1.0, "baseline": 2.0}}, progress=False)
    assert {r.model: r.layers for r in shared.splits["x"]} == {"full": L, "baseline": 5, "heal": 6}


@pytest.mark.equivalence
@pytest.mark.parametrize("chunk", [5, 1000])
def test_fused_distill_loss_equals_the_checkpointed_form_and_its_gradient(chunk):
    """With plain linear heads the KL and its gradient are formed in one pass (`ops.chunked_kl`); they equal
    the plain KL of the two models' logits, and the checkpointed chunks used for other heads."""
    torch.manual_seed(0)
    head, t_head = (torch.nn.Linear(16, 40, bias=True).double().requires_grad_(False) for _ in range(2))
    h = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 9, 16, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 9))
    labels[1, 4] = IGNORE
    fused = distill_loss(h, head, Teacher(t, t_head, lm_head=t_head), labels, chunk, lm_head=head)
    (g_fused,) = torch.autograd.grad(fused, h)
    plain = distill_loss(h, head, Teacher(t, t_head), labels, chunk)
    (g_plain,) = torch.autograd.grad(plain, h)
    valid = shift_labels(labels) != IGNORE
    kl = F.kl_div(F.log_softmax(head(h), -1), F.log_softmax(t_head(t), -1), log_target=True, reduction="none").sum(-1)
    (g_ref,) = torch.autograd.grad(kl[valid].mean(), h)
    for value, grad in ((fused, g_fused), (plain, g_plain)):
        assert_equivalent(value, kl[valid].mean(), dtype=torch.float32)  # float32 sums inside
        assert_equivalent(grad, g_ref, dtype=torch.float32)
