"""The estimate checkpointing="auto" decides by (the setting itself: tests/test_perf_paths.py)."""
from __future__ import annotations

import gc

import torch

from conftest import randomize_trainables, tiny_ouroboros


def test_step_activation_estimate_is_close_to_what_a_step_saves(tokens):
    """The estimate "auto" decides by, against the bytes a plain step really saves (hooks)."""
    model = tiny_ouroboros("llama").train()
    randomize_trainables(model)
    rb = model.recurrent
    with torch.no_grad():
        h0, ctx, _ = model.embed(tokens)
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
