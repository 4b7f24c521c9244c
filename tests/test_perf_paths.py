"""The fast paths compute the same thing as the plain ones: fused low-rank paths,
activation checkpointing per recurrence step."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, assert_equivalent, assert_same_in_float64, randomize_trainables, tiny_ouroboros
from ouroboros_lm.config import TARGETS
from ouroboros_lm.recurrence import StepTraining


class UnfusedProjections:
    """W_t x + (alpha/r) B_t diag(d_t) A_t x, as written: one target at a time, nothing shared,
    nothing folded into the layer's matmul."""

    def __init__(self, bases, d):
        self.bases, self.d = bases, d

    def __call__(self, target, linear, x):
        t = TARGETS.index(target)
        A, B = self.bases.A(target), self.bases.B(target)
        return linear(x) + self.bases.scale * ((x @ A.t()) * self.d[..., t, :]) @ B.t()


@pytest.mark.equivalence
@pytest.mark.parametrize("variant", ["controller", "static"])
def test_fused_low_rank_paths_equal_unfused(variant, tokens, monkeypatch):
    model = tiny_ouroboros("qwen2", variant=variant)
    randomize_trainables(model)
    model.double()  # float64: only the order of operations differs (rounding in float32 only in the norms)
    with torch.no_grad():
        fused = model(tokens, depth=3).logits
        bases = model.recurrent.bases
        monkeypatch.setattr(bases, "modulated", lambda d, adapter=None: UnfusedProjections(bases, d))
        unfused = model(tokens, depth=3).logits
    assert_same_in_float64(fused, unfused)
    assert (fused - model.forward_baseline(tokens).logits).abs().max() > 1e-3  # the deltas matter


def grads(model, tokens, depth, checkpointing="auto"):
    model.zero_grad(set_to_none=True)
    model(tokens, labels=tokens, depth=depth, training=StepTraining(checkpointing)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.equivalence
def test_activation_checkpointing_gives_identical_gradients(tokens):
    plain = tiny_ouroboros("llama").train()
    ckpt = tiny_ouroboros("llama").train()
    randomize_trainables(plain)
    randomize_trainables(ckpt)
    plain.double(), ckpt.double()  # float64 but for the loss (float32): the comparison holds on any CPU
    a, b = grads(plain, tokens, 6, "never"), grads(ckpt, tokens, 6, "always")
    for k in a:
        assert_equivalent(a[k], b[k], dtype=torch.float32, depth=6, msg=k)
    assert any(v.abs().sum() > 0 for v in a.values())


def test_auto_checkpointing_only_when_the_activations_would_not_fit(tokens, monkeypatch):
    """checkpointing="auto" keeps every step's activations while depth x (one step's estimated
    bytes) fits half the free memory, and checkpoints each step once it would not."""
    import ouroboros_lm.memory as memory
    import ouroboros_lm.recurrence as rec

    calls = []
    real = rec.checkpoint
    monkeypatch.setattr(rec, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_ouroboros("llama").train()
    h = torch.zeros(*tokens.shape, TINY["hidden_size"])
    step = model.recurrent.step_activation_bytes(h)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 8 * step)  # half of it: 4 steps fit
    model(tokens, labels=tokens, depth=4).loss.backward()
    assert not calls
    model(tokens, labels=tokens, depth=5).loss.backward()
    assert len(calls) == 5
    with torch.no_grad():
        model(tokens, depth=5)  # no checkpointing without gradients
    model(tokens, labels=tokens, depth=5, training=StepTraining("never")).loss.backward()
    assert len(calls) == 5
    model(tokens, labels=tokens, depth=1, training=StepTraining("always")).loss.backward()
    assert len(calls) == 6
    with pytest.raises(ValueError, match="checkpointing must be one of auto, always, never"):
        StepTraining("sometimes")


@pytest.mark.equivalence
def test_folded_weights_follow_changes_to_the_bases_and_the_layer(tokens, monkeypatch):
    """The folded [W | (alpha/r) B] matrices are derived and cached: replacing or changing W or B
    in place (a cast, an adapter being loaded, a user's edit) must never leave a stale copy."""
    model = tiny_ouroboros("llama")
    randomize_trainables(model)
    bases = model.recurrent.bases
    model.double()
    with torch.no_grad():
        model(tokens, depth=2)  # builds the cache in float64
        bases.B_up.mul_(3.0)  # in place, as load_adapter's copy_ is
        model.recurrent.layer.self_attn.o_proj.weight.add_(0.01)
        folded = model(tokens, depth=2).logits
        monkeypatch.setattr(bases, "modulated", lambda d, adapter=None: UnfusedProjections(bases, d))
        reference = model(tokens, depth=2).logits
    assert_same_in_float64(folded, reference)


@pytest.mark.parametrize("arch,variant,pooling", [("llama", "controller", "prefix_mean"), ("mistral", "static", "token"),
                                                  ("qwen2", "controller", "sequence_mean")])
def test_training_forward_and_backward_never_wait_for_the_device(arch, variant, pooling):
    """No host-device sync (.item(), bool(tensor), .cpu(), data-dependent shapes) in a training
    step: on the weightless "meta" device any of them raises, so this runs the whole step there,
    padding mask and activation checkpointing included."""
    model = tiny_ouroboros(arch, variant=variant, pooling=pooling).train().to("meta")
    ids = torch.zeros(2, 12, dtype=torch.long, device="meta")
    mask = torch.ones(2, 12, dtype=torch.long, device="meta")
    for depth, m in ((2, None), (5, mask)):
        out = model(ids, attention_mask=m, labels=ids, depth=depth, training=StepTraining("always"))
        out.loss.backward()
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters() if p.requires_grad)
    with pytest.raises(Exception):  # the premise: a sync on meta tensors does raise
        bool(out.loss > 0)


def test_moving_or_casting_the_model_drops_the_old_folded_weights(tokens):
    model = tiny_ouroboros("llama")
    with torch.no_grad():
        model(tokens, depth=2)
    bases = model.recurrent.bases
    assert len(bases.folded_weights()) == 7 and all(w.dtype == torch.float32 for w in bases.folded_weights())
    model.double()
    assert bases.folded_weights() == []  # freed now, not kept until the next forward
    with torch.no_grad():
        model(tokens, depth=2)
    assert all(w.dtype == torch.float64 for w in bases.folded_weights())


@pytest.mark.parametrize("variant", ["controller", "static", "none"])
def test_bf16_base_under_autocast_matches_float32(variant, tokens):
    """The GPU recipe (bf16 base weights, bf16 autocast, float32 trainables), run on the CPU:
    forward and backward work at every depth, checkpointed or not, and agree with float32."""
    ref = tiny_ouroboros("qwen2", variant=variant).train()
    randomize_trainables(ref, scale=0.05)
    low = tiny_ouroboros("qwen2", variant=variant).train()
    low.load_state_dict(ref.state_dict())
    for module in filter(None, (low.embed_tokens, low.prelude, low.coda, low.norm, low.lm_head, low.recurrent.layer, low.recurrent.bases)):
        module.to(torch.bfloat16)  # the frozen model in bf16; trainables stay float32
    for depth in (2, 5):
        expected = ref(tokens, labels=tokens, depth=depth, training=StepTraining("always")).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = low(tokens, labels=tokens, depth=depth, training=StepTraining("always"))
        out.loss.backward()
        assert abs(out.loss.item() - expected.item()) < 0.02 * expected.item()
    grads = [p.grad for p in low.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
