"""This round's activation-memory changes, each reverted in turn: training-step time and saved bytes.

Variants (the old implementations are restated here and patched in):

    new            everything as in the package now
    old            all five changes reverted (the code before this round)
    -loss          the LM head + loss as before: lm_head(norm(h)) and F.cross_entropy(logits.float())
    -rmsnorm       RMSNorm by autograd of the plain ops (a float32 copy of x and the normalised product saved)
    -swiglu        act_fn(g) * u by autograd (silu(g) saved as well)
    -gate          the gate casting h_new/h_old to float32 first and using lerp under autograd
    -pool          the Controller's prefix-mean pooling and RMSNorm as separate ops (the float32 means saved)

A training step = forward + backward at `--depth` (SmolLM2 shapes, random weights, no
checkpointing), median of `--repeats` in CPU seconds of the process (time.process_time: a shared machine's
time slicing does not count), all variants interleaved in one run, each timed call right
after an untimed one. Saved bytes: storages saved for backward at depth 1 and depth 2 that are freed
after the step (as /work/shared/bench/saved_bytes.py counts them).

    python bench/saved_changes.py [--dtype bfloat16] [--batch-size 1 --seq-len 256 --depth 4]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch

import ouroboros_lm.controller as controller_mod
import ouroboros_lm.layers as layers_mod
from common import autocast, random_base
from ouroboros_lm import OuroborosConfig, OuroborosModel, StepTraining
from ouroboros_lm.controller import Controller, pool
from ouroboros_lm.loss import OuroborosOutput, causal_lm_loss
from ouroboros_lm.model import OuroborosModel as _M
from ouroboros_lm.recurrence import RecurrenceGate


def old_rms_norm(x, weight, eps):
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def old_gate_forward(self, h_new, h_old):
    out_dtype, dt = h_new.dtype, self.bias.dtype
    h_new, h_old = h_new.to(dt), h_old.to(dt)
    z = torch.addmm(torch.addmm(self.bias, h_new.flatten(0, -2), self.weight_new.t()), h_old.flatten(0, -2), self.weight_old.t())
    g = torch.sigmoid(z.to(dt)).view_as(h_new)
    return torch.lerp(h_old, h_new, g).to(out_dtype)


def old_head(self, h, labels=None):
    logits = self.lm_head(self.norm(h))
    return OuroborosOutput(causal_lm_loss(logits, labels) if labels is not None else None, logits)


PATCHES = {
    "loss": [(_M, "head", old_head)],
    "rmsnorm": [(layers_mod, "rms_norm", old_rms_norm), (controller_mod, "rms_norm", old_rms_norm)],
    "swiglu": [(layers_mod, "gated_activation", lambda act, g, u: act(g) * u)],
    "gate": [(RecurrenceGate, "forward", old_gate_forward)],
    "pool": [(Controller, "from_hidden", lambda self, h, step, pooling, mask=None, state=None: self(pool(h, pooling, mask, state), step))],
}
VARIANTS = {"new": [], "old": list(PATCHES), **{f"-{k}": [k] for k in PATCHES}}


@contextlib.contextmanager
def reverted(names):
    saved = []
    for n in names:
        for obj, attr, fn in PATCHES[n]:
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, fn)
    try:
        yield
    finally:
        for obj, attr, fn in reversed(saved):
            setattr(obj, attr, fn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = OuroborosModel.from_base(random_base("smollm2", "cpu", dtype),
                                     OuroborosConfig(n_prelude=7, recurrent_layer=15, n_coda=7, rank=32)).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    ids = torch.randint(0, 49152, (args.batch_size, args.seq_len))

    def step(depth, hooks=None):
        with autocast("cpu", dtype), (hooks or contextlib.nullcontext()):
            loss = model(ids, labels=ids, depth=depth, training=StepTraining("never")).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def saved_bytes(depth):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        step(depth, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        gc.collect()
        alive = {o.untyped_storage().data_ptr() for o in gc.get_objects() if torch.is_tensor(o)}
        return sum(n for p, n in saved.items() if p not in alive)

    step(1)
    mem = {}
    for v, names in VARIANTS.items():
        with reverted(names):
            mem[v] = (saved_bytes(1), saved_bytes(2))
    times = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v, names in VARIANTS.items():
            with reverted(names):
                step(args.depth)
                t0 = time.process_time()
                step(args.depth)
                times[v].append(time.process_time() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    mb = 2 ** 20
    print(f"SmolLM2 shapes, {args.batch_size} x {args.seq_len}, {args.dtype}, training step at depth {args.depth}, "
          f"median of {args.repeats} (interleaved), {args.threads} thread(s), CPU seconds of the process (robust to a shared machine)")
    print("| variant | step s | x new | saved MiB, depth 1 | per step (depth 2 - 1) |")
    print("|---|---:|---:|---:|---:|")
    for v in VARIANTS:
        d1, d2 = mem[v]
        print(f"| {v} | {med[v]:.3f} | {med[v] / med['new']:.3f} | {d1 / mb:.1f} | {(d2 - d1) / mb:.2f} |")


if __name__ == "__main__":
    main()
