"""Where a recurrence step's time goes: forward + backward of two recurrence steps with the
parts of the step switched on one after another, against the bare recurrent layer applied twice,
measured interleaved in one run, each next to its FLOP ratio (torch.utils.flop_counter).

    bare layer       the frozen layer, nothing added
    + step norms     per-step RMSNorm weights (trainable)
    + Controller     pooling + Controller (its output unused)
    + low-rank       the Controller's d applied through the seven low-rank paths
    + gate           the gated update (full step)

Uses a 4-layer model with the chosen model's layer shapes and random weights (only the
recurrent layer's shapes matter here).

    python bench/step_parts.py                                   # SmolLM2-135M shapes, CPU
    python bench/step_parts.py --shapes qwen2.5-3b --batch-size 1 --seq-len 256
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import autocast, random_base, sync
from ouroboros_lm import OuroborosConfig, OuroborosModel
from ouroboros_lm.layers import decoder_layer

PARTS = ["bare layer", "+ step norms", "+ Controller", "+ low-rank", "+ gate"]
STEPS = 2


def build(shapes: str, device: str, dtype, rank: int) -> OuroborosModel:
    torch.manual_seed(0)
    base = random_base(shapes, device, dtype, num_hidden_layers=4, vocab_size=1000)
    cfg = OuroborosConfig(n_prelude=1, recurrent_layer=2, n_coda=1, rank=rank)
    model = OuroborosModel.from_base(base, cfg).train()
    with torch.no_grad():  # trained-looking values: nothing is trivially zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    return model


def step_fn(model, h0, ctx, upto: int):
    rb = model.recurrent

    def run():
        h = h0.detach().requires_grad_(True)
        x = h
        for s in range(STEPS):
            d = rb.modulation(x, s, None, None) if upto >= 2 else None
            project = rb.bases.modulated(d) if upto >= 3 else None
            norms = rb.step_norms(s, x.dtype) if upto >= 1 else None
            x_new = decoder_layer(rb.layer, x, ctx, window=rb.window, project=project, norm_weights=norms)
            if d is not None and project is None:
                x_new = x_new + 0 * d.sum()  # keep the Controller in the graph
            x = rb.gate(x_new, x) if upto >= 4 else x_new
        x.float().sum().backward()

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=["smollm2", "qwen2.5-3b"], default="smollm2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    amp = autocast(args.device, dtype)

    def prepared(device, dt):
        model = build(args.shapes, device, dt, args.rank)
        ids = torch.randint(0, 1000, (args.batch_size, args.seq_len), device=device)
        with torch.no_grad():
            h0, ctx, _ = model.embed(ids)
        return [step_fn(model, h0, ctx, i) for i in range(len(PARTS))]

    counted = []
    for fn in prepared("meta", torch.float32):  # FLOPs on a weightless copy (attention included)
        with FlopCounterMode(display=False) as c:
            fn()
        counted.append(c.get_total_flops())
    fns = prepared(args.device, dtype)
    times = [[] for _ in fns]
    with amp:
        for fn in fns:
            fn()  # warm-up
        for _ in range(args.repeats):
            for i, fn in enumerate(fns):
                sync(args.device)
                t = time.perf_counter()
                fn()
                sync(args.device)
                times[i].append(time.perf_counter() - t)
    med = [statistics.median(t) / STEPS for t in times]
    print(f"# {args.shapes} layer shapes, {args.device}, {args.dtype}, batch {args.batch_size} x {args.seq_len}, rank {args.rank}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward per step, median of {args.repeats}, interleaved")
    print(f"{'':<14} {'ms/step':>9} {'x layer':>8} {'FLOPs x layer':>14}")
    for name, m, f in zip(PARTS, med, counted):
        print(f"{name:<14} {m * 1e3:>9.1f} {m / med[0]:>8.3f} {f / counted[0]:>14.3f}")


if __name__ == "__main__":
    main()
