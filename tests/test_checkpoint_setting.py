"""The checkpointing setting of the recurrent block: "never", "always", "auto" (by memory)."""
from __future__ import annotations

import gc

import pytest
import torch

import ouroboros_lm.recurrence as rec
from conftest import randomize_trainables, tiny_ouroboros


def count_checkpoints(monkeypatch):
    calls = []
    real = rec.checkpoint
    monkeypatch.setattr(rec, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("setting,free,expected", [("never", 1, 0), ("always", 10**15, 3), ("auto", 10**15, 0), ("auto", 1, 3)])
def test_checkpoint_setting(setting, free, expected, tokens, monkeypatch):
    calls = count_checkpoints(monkeypatch)
    monkeypatch.setattr(rec, "free_memory", lambda device: free)
    model = tiny_ouroboros("llama", checkpoint_from_depth=2).train()  # the setting overrides the depth rule
    model.recurrent.checkpointing = setting
    model(tokens, labels=tokens, depth=3).loss.backward()
    assert len(calls) == expected
    with torch.no_grad():
        model(tokens, depth=3)
    assert len(calls) == expected


def test_auto_checkpointing_gives_the_plain_gradients(tokens, monkeypatch):
    def grads(model):
        model(tokens, labels=tokens, depth=4).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = (tiny_ouroboros("llama", checkpoint_from_depth=0).train() for _ in range(2))
    for m in (plain, ckpt):
        randomize_trainables(m)
    ckpt.recurrent.checkpointing = "auto"
    monkeypatch.setattr(rec, "free_memory", lambda device: 1000)  # nothing fits: checkpoint
    calls = count_checkpoints(monkeypatch)
    a, b = grads(plain), grads(ckpt)
    assert len(calls) == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_unknown_setting_is_refused(tokens):
    model = tiny_ouroboros("llama").train()
    model.recurrent.checkpointing = "sometimes"
    with pytest.raises(ValueError, match="checkpoint must be one of auto, always, never"):
        model(tokens, labels=tokens, depth=2)


def test_step_activation_estimate_is_close_to_what_a_step_saves(tokens):
    """The estimate "auto" decides by, against the bytes a plain step really saves (hooks)."""
    model = tiny_ouroboros("llama", checkpoint_from_depth=0).train()
    randomize_trainables(model)
    rb = model.recurrent
    with torch.no_grad():
        h0, ctx = model._embed(tokens, None)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def saved(depth):
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        h = h0.detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = rb(h, ctx, depth)
        x.sum().backward()
        gc.collect()
        return sum(seen.values())

    per_step = (saved(3) - saved(1)) / 2
    estimate = rb.step_activation_bytes(h0)
    assert 0.7 * per_step <= estimate <= 1.3 * per_step, (estimate, per_step)
