"""What the fused ops (`ouroboros_lm.ops`) buy in a whole training step: time and bytes saved for backward,
with every op fused, every op in its reference form, and each op in turn in its reference form, all
through the package's own switch (`ops.reference(name)`), side by side in one run.

Variants:

    fused                   everything as the package runs it
    reference               every op in its reference form (what OUROBOROS_FUSED=0 runs)
    -rms_norm               RMSNorm by autograd of the plain ops (a float32 copy of x and the normalised product saved)
    -swiglu                 silu(g) * u by autograd (silu(g) saved as well)
    -gate_mix               the gate's mix by autograd (the states' float32 copies and g saved)
    -prefix_mean_rms_norm   the Controller's prefix-mean pooling and norm by autograd (the float32 means saved)
    -chunked_head_loss      the LM head's loss from the full float32 logits (their log-softmax saved)
    -chunked_kl             (with --distill) the KL to a teacher from the full logits of both heads

A training step = forward + backward at `--depth` (SmolLM2 shapes, random weights, no checkpointing;
`--distill`: plus a KL term to random teacher states through the same LM head), median of `--repeats`
in CPU seconds of the process (time.process_time: a shared machine's time slicing does not count), all
variants interleaved in one run, each timed call right after an untimed one. Saved bytes: storages saved
for backward at depth 1 and depth 2 that are freed after the step (as ../shared/bench/saved_bytes.py
counts them).

    python bench/saved_changes.py [--dtype bfloat16] [--batch-size 1 --seq-len 256 --depth 4] [--distill]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch

from common import autocast, random_base
from ouroboros_lm import OuroborosConfig, OuroborosModel, StepTraining, ops
from ouroboros_lm.loss import Teacher


def variants(distill: bool) -> dict[str, tuple[str, ...]]:
    """Variant name -> the ops in reference form."""
    used = [n for n in ops.FUSED_OPS if distill or n != "chunked_kl"]
    return {"fused": (), "reference": ops.FUSED_OPS, **{f"-{n}": (n,) for n in used}}


def switch(names: tuple[str, ...]):
    return ops.reference(*names) if names else ops.fused()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--distill", action="store_true", help="add a KL term to a teacher (exercises chunked_kl)")
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
    teacher = Teacher(torch.randn(*ids.shape, model.lm_head.weight.shape[1], dtype=dtype), model.logits_of, lm_head=model.lm_head) if args.distill else None

    def step(depth, hooks=None):
        with autocast("cpu", dtype), (hooks or contextlib.nullcontext()):
            loss = model(ids, labels=ids, depth=depth, teacher=teacher, training=StepTraining("never")).loss
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

    table = variants(args.distill)
    step(1)
    mem = {}
    for v, names in table.items():
        with switch(names):
            mem[v] = (saved_bytes(1), saved_bytes(2))
    times = {v: [] for v in table}
    for _ in range(args.repeats):
        for v, names in table.items():
            with switch(names):
                step(args.depth)
                t0 = time.process_time()
                step(args.depth)
                times[v].append(time.process_time() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    mb = 2 ** 20
    print(f"SmolLM2 shapes, {args.batch_size} x {args.seq_len}, {args.dtype}{', distillation' if args.distill else ''}, "
          f"training step at depth {args.depth}, median of {args.repeats} (interleaved), {args.threads} thread(s), "
          "CPU seconds of the process (robust to a shared machine)")
    print("| variant | step s | x fused | saved MiB, depth 1 | x fused | per step (depth 2 - 1) | x fused |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    f1, f2 = mem["fused"]
    for v in table:
        d1, d2 = mem[v]
        print(f"| {v} | {med[v]:.3f} | {med[v] / med['fused']:.3f} | {d1 / mb:.1f} | {d1 / f1:.2f} | {(d2 - d1) / mb:.2f} | "
              f"{(d2 - d1) / (f2 - f1):.2f} |")


if __name__ == "__main__":
    main()
