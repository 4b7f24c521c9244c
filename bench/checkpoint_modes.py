"""Activation checkpointing of the recurrence steps: plain vs full vs selective, time and memory.

Forward + backward of `--depth` recurrence steps (the recurrent block alone, random weights, a
4-layer model with the chosen shapes), measured interleaved in one run, median of `--repeats` in CPU seconds of the process (time.process_time: a shared machine's
time slicing does not count):

    plain      no checkpointing
    full       torch.utils.checkpoint per step: only the step's input is kept, the whole step is
               recomputed in the backward pass
    selective  checkpoint per step with a policy (keep_matmuls below): the outputs of the
               matmuls and of attention are kept, the element-wise work is recomputed

Memory: bytes kept for the backward pass per step. Plain: saved-tensor hooks (storages counted
once, weights excluded); full: the step input; selective: the step input + the tensors the
policy keeps (read from the selective-checkpoint cache).

    python bench/checkpoint_modes.py                                             # SmolLM2 shapes, 2 x 256
    python bench/checkpoint_modes.py --shapes qwen2.5-3b --batch-size 1 --seq-len 256
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from common import autocast, random_base
from ouroboros_lm import OuroborosConfig, OuroborosModel

aten = torch.ops.aten
# Selective checkpointing keeps these ops' outputs and recomputes everything else in a step.
KEEP = {getattr(aten, n).default for n in ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu",
                                            "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                            "_scaled_dot_product_cudnn_attention") if hasattr(aten, n)}


def keep_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2", choices=["smollm2", "qwen2.5-3b"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = random_base(args.shapes, "cpu", dtype, num_hidden_layers=4, vocab_size=1000)
    cfg = OuroborosConfig(n_prelude=1, recurrent_layer=2, n_coda=1, rank=32)
    model = OuroborosModel.from_base(base, cfg).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    rb = model.recurrent
    ids = torch.randint(0, 1000, (args.batch_size, args.seq_len))
    with torch.no_grad():
        h0, ctx, _ = model.embed(ids)
        h0 = model.run_layers("prelude", h0, ctx)
    amp = lambda: autocast("cpu", dtype)
    with torch.no_grad(), amp():
        rb.step(h0, 0, ctx, None)  # folded weights built
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *rb.bases.folded_weights()]}
    caches = []

    def sac():
        fwd, rec = create_selective_checkpoint_contexts(keep_matmuls)
        caches.append(fwd)
        return fwd, rec

    def run(mode, measure=False):
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in weights:
                saved[st.data_ptr()] = st.nbytes()
            return t

        caches.clear()
        h = h0.detach().requires_grad_(True)
        x = h
        with amp(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for s in range(args.depth):
                if mode == "plain":
                    x = rb.step(x, s, ctx, None)
                elif mode == "full":
                    x = checkpoint(rb.step, x, s, ctx, None, use_reentrant=False)
                else:
                    x = checkpoint(rb.step, x, s, ctx, None, use_reentrant=False, context_fn=sac)
        kept = 0
        if measure:
            if mode == "plain":
                kept = sum(saved.values())
            else:
                kept = args.depth * h0.untyped_storage().nbytes()
                seen = set()
                for fwd in caches:
                    for outs in fwd.storage.values():
                        for t in (outs.values() if isinstance(outs, dict) else outs):
                            for u in (t if isinstance(t, (tuple, list)) else [t]):
                                u = getattr(u, "val", u)  # SAC wraps what it keeps in a _VersionWrapper
                                if torch.is_tensor(u) and u.untyped_storage().data_ptr() not in seen | weights:
                                    seen.add(u.untyped_storage().data_ptr())
                                    kept += u.untyped_storage().nbytes()
        x.float().sum().backward()
        return kept

    modes = ["plain", "full", "selective"]
    mem = {m: run(m, measure=True) for m in modes}
    times = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            run(m)  # the steady state: each timed call right after an untimed one
            t0 = time.process_time()
            run(m)
            times[m].append(time.process_time() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"{args.shapes} shapes, {args.batch_size} x {args.seq_len}, {args.dtype}, depth {args.depth}, "
          f"median of {args.repeats} (interleaved), {args.threads} thread(s), CPU seconds of the process (robust to a shared machine)")
    print("| mode | s (fwd+bwd) | x plain | MiB kept per step | x plain |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        print(f"| {m} | {med[m]:.3f} | {med[m] / med['plain']:.3f} | {mem[m] / args.depth / 2**20:.2f} | {mem[m] / mem['plain']:.2f} |")


if __name__ == "__main__":
    main()
