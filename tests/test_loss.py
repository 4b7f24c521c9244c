"""The chunked LM-head loss against independent computations: float64, written out term by term,
gradients by autograd. (The fused autograd functions against their references: `test_ops.py`.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, assert_equivalent, assert_same_in_float64, randomize_trainables, tiny_ouroboros
from ouroboros_lm.loss import causal_lm_loss, head_loss, head_token_losses, token_losses
from ouroboros_lm.model import OuroborosOutput


def reference_loss(hidden, weight, bias, labels):
    """float64 next-token NLL, written out: -(z[t, y_{t+1}] - log sum exp z[t]) averaged over scored tokens."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    total, n = 0.0, 0
    B, T = labels.shape
    for b in range(B):
        for t in range(T - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            total = total + (z[b, t].exp().sum().log() - z[b, t, y])
            n += 1
    return total / n


@pytest.mark.equivalence
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_loss_equals_the_plain_loss_and_its_gradient(chunk, bias):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 11, 16, 53
    hidden = torch.randn(B, T, H, generator=g)
    head = nn.Linear(H, V, bias=bias).requires_grad_(False)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 3] = labels[2, :5] = -100  # ignored positions
    h1 = hidden.clone().requires_grad_(True)
    h2 = hidden.double().clone().requires_grad_(True)
    loss = head_loss(h1, head, labels, chunk=chunk)
    ref = reference_loss(h2, head.weight, head.bias, labels)
    assert_equivalent(loss, ref)  # float32 against float64: float32's tolerance
    plain = causal_lm_loss(head(hidden), labels)  # today's form
    assert_equivalent(loss, plain)
    (2.5 * loss).backward()
    (2.5 * ref).backward()
    assert_equivalent(h1.grad, h2.grad)


@pytest.mark.equivalence
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_token_losses_equal_the_plain_ones_and_their_gradient(chunk):
    """Per-token losses (what per-step readouts return) with a per-token incoming gradient."""
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 2, 9, 16, 41
    hidden = torch.randn(B, T, H, generator=g)
    head = nn.Linear(H, V, bias=True).requires_grad_(False)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 2:4] = -100
    weights = torch.rand(B, T, generator=g)  # e.g. a halting distribution's mass on each token
    h1, h2 = hidden.clone().requires_grad_(True), hidden.double().clone().requires_grad_(True)
    ours = head_token_losses(h1, head, labels, chunk=chunk)
    plain = token_losses(F.linear(h2, head.weight.double(), head.bias.double()), labels)
    assert ours.shape == (B, T) and ours.dtype == torch.float32
    assert_equivalent(ours, plain)
    assert (ours[:, -1] == 0).all() and (ours[1, 1:3] == 0).all()  # nothing scored there
    (ours * weights).sum().backward()
    (plain * weights).sum().backward()
    assert_equivalent(h1.grad, h2.grad)
    with torch.no_grad():
        assert_equivalent(head_token_losses(hidden, head, labels), ours)


@pytest.mark.equivalence
def test_chunked_head_loss_without_gradient_and_with_a_trained_head():
    g = torch.Generator().manual_seed(1)
    hidden, labels = torch.randn(2, 9, 8, generator=g), torch.randint(0, 20, (2, 9), generator=g)
    head = nn.Linear(8, 20, bias=False)
    with torch.no_grad():
        a = head_loss(hidden, head, labels)
    head.requires_grad_(True)  # falls back to the plain form, which also trains the head
    b = head_loss(hidden, head, labels)
    b.backward()
    assert head.weight.grad is not None
    assert_equivalent(a, b)
    assert_equivalent(a, reference_loss(hidden, head.weight.detach(), None, labels))


@pytest.mark.equivalence
def test_chunked_head_loss_under_bf16_autocast_matches_the_plain_form():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 30, 32, generator=g).bfloat16()
    head = nn.Linear(32, 300, bias=False).requires_grad_(False).bfloat16()
    labels = torch.randint(0, 300, (2, 30), generator=g)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = head_loss(h1, head, labels, chunk=13)
        b = causal_lm_loss(head(h2), labels)
    assert a.dtype == b.dtype == torch.float32
    assert_equivalent(a, b)  # the same bf16 logits, each chunk's and the whole's: float32 losses from them
    a.backward()
    b.backward()
    assert h1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-4, rtol=2e-2)


@pytest.mark.equivalence
@pytest.mark.parametrize("variant", ["controller", "static"])
def test_model_loss_and_gradients_equal_the_plain_head(variant, tokens):
    """The model's loss and every trainable gradient equal those of lm_head(norm(h)) + F.cross_entropy."""
    model = tiny_ouroboros("llama", variant=variant).train()
    randomize_trainables(model)
    model.double()  # float64 but for the loss (float32, both): the comparison holds on any CPU
    labels = tokens.clone()
    labels[1, :6] = -100
    out = model(tokens, labels=labels, depth=3)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    logits = out.logits  # computed now, lazily, with the forward's graph
    assert logits.shape == (*tokens.shape, TINY["vocab_size"])
    model2 = tiny_ouroboros("llama", variant=variant).train()
    randomize_trainables(model2)
    model2.double()
    h, ctx, _ = model2.embed(tokens)
    h = model2.run_layers("prelude", h, ctx)
    h = model2.recurrent(h, ctx, 3)
    h = model2.run_layers("coda", h, ctx)
    plain_logits = model2.lm_head(model2.norm(h))
    plain = F.cross_entropy(plain_logits[:, :-1].reshape(-1, TINY["vocab_size"]).float(), labels[:, 1:].reshape(-1))
    assert_equivalent(out.loss, plain)
    assert_same_in_float64(logits, plain_logits)
    plain.backward()
    for n, p in model2.named_parameters():
        if p.requires_grad:  # through the float32 losses
            assert_equivalent(ours[n], p.grad, dtype=torch.float32, depth=3, msg=n)


def test_logits_are_lazy_and_follow_the_forward_modes(tokens):
    model = tiny_ouroboros("llama")
    with torch.no_grad():
        out = model(tokens, labels=tokens, depth=2)
    assert callable(out.logits_or_thunk)  # not computed yet
    logits = out.logits
    assert not logits.requires_grad and out.logits is logits  # computed once, in the forward's grad mode
    assert torch.is_tensor(OuroborosOutput(None, logits).logits)
    # DDP (find_unused_parameters) walks a dataclass's fields for tensors: it finds the loss and
    # leaves the logits uncomputed
    import dataclasses

    from torch.nn.parallel.distributed import _find_tensors

    out = model.train()(tokens, labels=tokens, depth=2)
    assert [f.name for f in dataclasses.fields(out)] == ["loss", "steps", "step_losses", "step_halts", "ce_loss", "kl_loss"]
    assert [t is out.loss for t in _find_tensors(out)] == [True] and callable(out.logits_or_thunk)
