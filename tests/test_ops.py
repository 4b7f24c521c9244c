"""`ops.py`: each fused autograd function against its reference form (value and gradient, float64 where
the maths allows it, bf16 within tolerance), proof that the switch really changes the path (the graph's
nodes and the bytes saved for backward differ), the switch itself, and a whole model trained either way."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import TINY, assert_equivalent, equivalence_tolerance, randomize_trainables, tiny_ouroboros
from ouroboros_lm import ops
from ouroboros_lm.controller import Controller, pool
from ouroboros_lm.loss import Teacher, head_loss

SRC = Path(__file__).resolve().parent.parent / "src"


@dataclass
class Case:
    """fn(*inputs) -> tensor; the inputs at `grad_of` (all by default) need a gradient."""

    fn: Callable
    inputs: list
    grad_of: tuple | None = None

    def leaves(self) -> list:
        idx = range(len(self.inputs)) if self.grad_of is None else self.grad_of
        return [x.detach().clone().requires_grad_(i in idx) if torch.is_tensor(x) and x.is_floating_point() else x
                for i, x in enumerate(self.inputs)]


def randn(*shape, dtype=torch.float64, seed=0, scale=1.0, shift=0.0):
    return (shift + scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def node_names(y: torch.Tensor) -> set[str]:
    """The names of every node of y's autograd graph."""
    seen, todo, names = set(), [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo += [n for n, _ in node.next_functions]
    return names


def run(case: Case, fused: bool):
    """(output, gradients of the inputs that need one, graph node names, bytes saved for backward
    beyond the inputs themselves), with the op's fused or reference form."""
    xs = case.leaves()
    inputs = {x.untyped_storage().data_ptr() for x in xs if torch.is_tensor(x)}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with ops.fused() if fused else ops.reference(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = case.fn(*xs)
    wrt = [x for x in xs if torch.is_tensor(x) and x.requires_grad]
    gy = randn(*y.shape, seed=99, dtype=y.dtype)
    grads = torch.autograd.grad(y, wrt, gy)
    return y.detach(), grads, node_names(y), sum(n for p, n in saved.items() if p not in inputs)


def rms_case(dtype, w_dtype=None):
    return Case(lambda x, w: ops.rms_norm(x, w, 1e-6), [randn(2, 5, 12, dtype=dtype), randn(12, seed=1, scale=0.1, shift=1.0, dtype=w_dtype or dtype)])


def swiglu_case(dtype):
    return Case(ops.swiglu, [randn(3, 7, 16, dtype=dtype), randn(3, 7, 16, seed=1, dtype=dtype)])


def gate_case(dtype, dt):
    return Case(lambda z, a, b: ops.gate_mix(z, a, b, dt),
                [randn(2, 6, 16, seed=2, dtype=dt), randn(2, 6, 16, dtype=dtype), randn(2, 6, 16, seed=1, dtype=dtype)])


def prefix_case(dtype, masked):
    m = torch.ones(2, 9)
    if masked:
        m[1, :3] = 0  # left padding
    return Case(lambda h, m, w: ops.prefix_mean_rms_norm(h, m, w, 1e-6),
                [randn(2, 9, 12, dtype=dtype), m if masked else None, randn(12, seed=1, scale=0.1, shift=1.0, dtype=torch.float32)],
                grad_of=(0, 2))


def labels_like(n, vocab, seed=3):
    t = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    t[[2, 5, n - 1]] = ops.IGNORE
    return t


def head_case(dtype, chunk, bias=True, amp=False):
    def fn(h, w, b, t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return ops.chunked_head_loss(h, w, b, t, chunk)

    return Case(fn, [randn(21, 16, dtype=dtype), randn(53, 16, seed=1, dtype=dtype), randn(53, seed=2, dtype=dtype) if bias else None,
                     labels_like(21, 53)], grad_of=(0,))


def token_case(dtype, chunk, amp=False):
    def fn(h, w, b, t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return ops.chunked_token_losses(h, w, b, t, chunk)

    return Case(fn, [randn(21, 16, dtype=dtype), randn(53, 16, seed=1, dtype=dtype), randn(53, seed=2, dtype=dtype),
                     labels_like(21, 53)], grad_of=(0,))


def kl_case(dtype, chunk):
    valid = labels_like(21, 53) != ops.IGNORE
    return Case(lambda h, w, b, t, tw, tb: ops.chunked_kl(h, w, b, t, tw, tb, valid, chunk),
                [randn(21, 16, dtype=dtype), randn(53, 16, seed=1, dtype=dtype), randn(53, seed=2, dtype=dtype),
                 randn(21, 16, seed=3, dtype=dtype), randn(53, 16, seed=4, dtype=dtype), None], grad_of=(0,))


# the precision the maths runs in, for assert_equivalent's tolerance: F32 for ops whose maths is float32 by design
# (Hugging Face's norm statistics, float32 logits) whatever the inputs' dtype
F64, F32 = torch.float64, torch.float32
BF16 = dict(atol=1e-3, rtol=8e-3)  # one bf16 rounding step (2^-7 relative)
BF16_UNIT = dict(atol=1e-2, rtol=8e-3)  # the same for gradients of order 1 (per-token losses, not a mean over tokens)
# (case, tolerance of values, of gradients, whether the forward values are bit for bit the same)
CASES = {
    "rms_norm-f64": (lambda: rms_case(torch.float64), F32, F32, True),
    "rms_norm-f32": (lambda: rms_case(torch.float32), F32, F32, True),
    "rms_norm-bf16-x-f32-weight": (lambda: rms_case(torch.bfloat16, torch.float32), F32, BF16, True),
    "rms_norm-bf16": (lambda: rms_case(torch.bfloat16), F32, BF16, True),
    "swiglu-f64": (lambda: swiglu_case(torch.float64), F64, F64, True),
    "swiglu-bf16": (lambda: swiglu_case(torch.bfloat16), F32, BF16, True),
    "gate_mix-f64": (lambda: gate_case(torch.float64, torch.float64), F64, F64, True),
    "gate_mix-bf16-states-f32-gate": (lambda: gate_case(torch.bfloat16, torch.float32), F32, BF16, True),
    "prefix_mean_rms_norm-f64": (lambda: prefix_case(torch.float64, False), F32, F32, True),
    "prefix_mean_rms_norm-f32-masked": (lambda: prefix_case(torch.float32, True), F32, F32, True),
    "prefix_mean_rms_norm-bf16-masked": (lambda: prefix_case(torch.bfloat16, True), F32, BF16, True),
    "chunked_head_loss-f64-chunk5": (lambda: head_case(torch.float64, 5), F32, F32, False),
    "chunked_head_loss-f32-one-chunk-no-bias": (lambda: head_case(torch.float32, 1000, bias=False), F32, F32, False),
    "chunked_head_loss-bf16-autocast": (lambda: head_case(torch.bfloat16, 4, amp=True), F32, BF16, False),
    "chunked_token_losses-f64-chunk5": (lambda: token_case(torch.float64, 5), F32, F32, False),
    "chunked_token_losses-bf16-autocast": (lambda: token_case(torch.bfloat16, 4, amp=True), F32, BF16_UNIT, False),
    "chunked_kl-f64-chunk5": (lambda: kl_case(torch.float64, 5), F32, F32, False),
    "chunked_kl-bf16": (lambda: kl_case(torch.bfloat16, 7), F32, BF16, False),
}
NODE = {"rms_norm": "_RMSNormBackward", "swiglu": "_SwiGLUBackward", "gate_mix": "_GateMixBackward",
        "prefix_mean_rms_norm": "_PrefixMeanRMSNormBackward", "chunked_head_loss": "_ChunkedHeadLossBackward",
        "chunked_token_losses": "_ChunkedTokenLossesBackward", "chunked_kl": "_ChunkedKLBackward"}


@pytest.mark.equivalence
@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_reference_in_value_and_gradient(name):
    make, value_tol, grad_tol, bitwise = CASES[name]
    yf, gf, _, _ = run(make(), fused=True)
    yr, gr, _, _ = run(make(), fused=False)
    assert yf.dtype == yr.dtype and yf.shape == yr.shape
    if bitwise:
        assert torch.equal(yf, yr)
    else:
        assert_close_in(yf, yr, value_tol)
    assert len(gf) == len(gr) > 0
    for a, b in zip(gf, gr):
        assert a.dtype == b.dtype
        assert_close_in(a, b, grad_tol)


def assert_close_in(ours, reference, tol) -> None:
    """A precision (F64, F32): assert_equivalent in it; bf16's one-rounding tolerances (BF16...) as they are."""
    if isinstance(tol, torch.dtype):
        assert_equivalent(ours, reference, dtype=tol)
    else:
        torch.testing.assert_close(ours.double(), reference.double(), **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_the_switch_changes_the_path(name):
    """Fused: the op's own backward node, and fewer bytes saved for backward than autograd of the
    reference keeps; reference: no such node. (Else the test above compares a path with itself.)"""
    op = name.split("-")[0]
    make = CASES[name][0]
    _, _, fused_nodes, fused_bytes = run(make(), fused=True)
    _, _, ref_nodes, ref_bytes = run(make(), fused=False)
    assert NODE[op] in fused_nodes and not any(n in ref_nodes for n in NODE.values()), (fused_nodes, ref_nodes)
    assert fused_bytes < ref_bytes, (fused_bytes, ref_bytes)


@pytest.mark.equivalence
def test_the_fused_functions_against_finite_differences():
    """Independent of the reference: the hand-written backward passes of the float64-capable ops."""
    a, b, z = (randn(3, 7, seed=s).requires_grad_(True) for s in range(3))
    with ops.fused():
        assert torch.autograd.gradcheck(ops.swiglu, (a, b))
        assert torch.autograd.gradcheck(lambda z, a, b: ops.gate_mix(z, a, b, torch.float64), (z, a, b))
        assert_equivalent(ops.gate_mix(z, a, b, torch.float64), torch.sigmoid(z) * a + (1 - torch.sigmoid(z)) * b)
        assert_equivalent(ops.swiglu(a, b), a * torch.sigmoid(a) * b)


@pytest.mark.equivalence
def test_reference_runs_where_the_fused_form_does_not_apply():
    x, w = randn(2, 3, 8, dtype=torch.float32), randn(8, dtype=torch.float32)
    with ops.fused():
        with torch.no_grad():  # no gradient needed: nothing to save, the plain ops
            assert torch.equal(ops.rms_norm(x, w, 1e-6), ops.rms_norm_reference(x, w, 1e-6))
        y = ops.swiglu(x.requires_grad_(True), x.double())  # mixed dtypes: the plain ops
        assert y.grad_fn.name() == "MulBackward0"
        # a trained head: the fused loss would give it no gradient, so the reference runs
        h, head = randn(2, 5, 8, dtype=torch.float32), torch.nn.Linear(8, 11)
        labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
        loss = ops.chunked_head_loss(h.flatten(0, 1), head.weight, head.bias, labels.flatten(), 3)
        assert NODE["chunked_head_loss"] not in node_names(loss)
        loss.backward()
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        head.requires_grad_(False)  # frozen: fused, and the same value as the module-level helper
        assert_equivalent(head_loss(h, head, labels), ops.chunked_head_loss_reference(
            h[:, :-1].flatten(0, 1), head.weight, head.bias, labels[:, 1:].flatten()))


@pytest.mark.equivalence
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_the_controller_reads_the_same_pooled_norm_either_way(masked, fused):
    """Controller.from_hidden (through `ops.prefix_mean_rms_norm`) equals pool() then the Controller."""
    g = torch.Generator().manual_seed(5)
    ctrl = Controller(12, 10, 6, 4, 8)
    with torch.no_grad():
        ctrl.head.weight.normal_(generator=g)
        ctrl.norm_weight.add_(0.1 * torch.randn(12, generator=g))
    h = torch.randn(2, 9, 12, generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    m = mask if masked else None
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    with ops.switched(fused):
        a = ctrl.from_hidden(h1, 2, "prefix_mean", m)
        b = ctrl(pool(h2, "prefix_mean", m), 2)
    assert torch.equal(a, b)
    assert (NODE["prefix_mean_rms_norm"] in node_names(a)) == fused
    gy = torch.randn(a.shape, generator=g)
    ga = torch.autograd.grad(a, [h1, ctrl.norm_weight], gy)
    gb = torch.autograd.grad(b, [h2, ctrl.norm_weight], gy)
    for x, y in zip(ga, gb):
        assert_equivalent(x, y)


def test_the_switch():
    before = {n: ops.is_fused(n) for n in ops.FUSED_OPS}
    with ops.fused():
        assert all(ops.is_fused(n) for n in ops.FUSED_OPS)
        with ops.reference("swiglu", "gate_mix"):
            assert [n for n in ops.FUSED_OPS if not ops.is_fused(n)] == ["swiglu", "gate_mix"]
            with ops.reference():
                assert not any(ops.is_fused(n) for n in ops.FUSED_OPS)
            assert ops.is_fused("rms_norm") and not ops.is_fused("swiglu")
        assert all(ops.is_fused(n) for n in ops.FUSED_OPS)
        previous = ops.use_fused(False)
        try:
            assert previous == frozenset() and not ops.is_fused("chunked_kl")
            ops.use_fused(True, "chunked_kl")
            assert ops.is_fused("chunked_kl") and not ops.is_fused("rms_norm")
        finally:
            ops.use_fused(True)
        with pytest.raises(RuntimeError), ops.reference():
            raise RuntimeError("restored on the way out")
        assert all(ops.is_fused(n) for n in ops.FUSED_OPS)
    assert {n: ops.is_fused(n) for n in ops.FUSED_OPS} == before
    with pytest.raises(ValueError, match="rmsnorm"):
        ops.reference("rmsnorm")
    with pytest.raises(ValueError, match="rmsnorm"):
        ops.is_fused("rmsnorm")


def test_the_environment_variable():
    assert ops.env_fused(None) and ops.env_fused("") and ops.env_fused("1") and ops.env_fused(" On ")
    assert not ops.env_fused("0") and not ops.env_fused("false") and not ops.env_fused("OFF")
    with pytest.raises(ValueError, match="OUROBOROS_FUSED"):
        ops.env_fused("fast")
    code = "import ouroboros_lm.ops as o; print(' '.join(str(o.is_fused(n)) for n in o.FUSED_OPS))"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OUROBOROS_FUSED": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"] * len(ops.FUSED_OPS)


@pytest.mark.equivalence
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_model_trains_the_same_with_the_switch_on_and_off(dtype, tokens):
    """The whole model (padding, ignored labels, a distillation teacher, a per-step readout): the same
    loss and the same gradient of every trainable parameter with the fused ops and with their
    references; the fused graph holds every fused op (the Controller's pooled norm only for its
    float32 weight)."""
    model = tiny_ouroboros("llama").to(dtype).train()
    randomize_trainables(model)
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    labels = tokens.masked_fill(mask == 0, -100)
    labels[0, 7] = -100
    teacher = Teacher(randn(*tokens.shape, TINY["hidden_size"], seed=8, dtype=dtype), model.logits_of,
                      weight=0.5, lm_head=model.lm_head)
    results = {}
    for fused in (True, False):
        with ops.switched(fused):
            out = model(tokens, attention_mask=mask, labels=labels, depth=3, teacher=teacher, readout_steps=(1, 3))
            out.loss = out.loss + 0.3 * out.step_losses[0].mean()
        nodes = node_names(out.loss)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        results[fused] = out.loss.detach(), grads, {op for op, node in NODE.items() if node in nodes}
    (loss_f, grads_f, ops_f), (loss_r, grads_r, ops_r) = results[True], results[False]
    expected = set(NODE) - ({"prefix_mean_rms_norm"} if dtype != torch.float32 else set())
    assert ops_f == expected and ops_r == set()
    assert_equivalent(loss_f, loss_r, dtype=torch.float32)  # float32 inside the norms and losses either way
    assert grads_f.keys() == grads_r.keys() and len(grads_f) > 5
    tol = equivalence_tolerance(0.0, dtype=torch.float32, depth=3)  # relative to each gradient's norm, so scale 0
    for n in grads_f:
        assert grads_r[n].norm() > 0, n
        assert (grads_f[n] - grads_r[n]).norm() <= tol * grads_r[n].norm(), n
