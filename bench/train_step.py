"""Time of one training step (forward + backward + AdamW) of Ouroboros at depth N against the
floor: the same pruned model with the recurrent layer simply repeated N times and nothing
added (gradients flow through the same layers, no trainable parameters). Both are measured
interleaved in one run, each call right after an untimed call of the same step; the ratio is
what counts. Also prints training and evaluation
throughput.

Next to each measured ratio stands the FLOP ratio of the same two steps, counted by
torch.utils.flop_counter (matmuls and attention): the ratio an implementation with no
overhead at all beyond the architecture's own arithmetic would reach. With `--device meta`
only the FLOP ratios are computed (no weights, no time: works for Qwen2.5-3B shapes anywhere).

    python bench/train_step.py                                     # SmolLM2-135M shapes, CPU
    python bench/train_step.py --shapes qwen2.5-3b --device meta --seq-len 2048 --batch-size 1
    python bench/train_step.py --shapes qwen2.5-3b --device cuda --dtype bfloat16 --seq-len 2048 --batch-size 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import SPLITS, autocast, base_model, sync
from ouroboros_lm import OuroborosConfig, OuroborosModel, StepTraining


def floor_step(model, ids, depth):
    """Pruned model, recurrent layer repeated `depth` times, nothing added; backward through it."""
    with torch.no_grad():
        h, ctx, _ = model.embed(ids)
        h = model.run_layers("prelude", h, ctx)
    x = h.detach().requires_grad_(True)
    for _ in range(depth):
        x = model.recurrent.plain(x, ctx)
    model.head(model.run_layers("coda", x, ctx), labels=ids).loss.backward()


def ouroboros_step(model, opt, ids, depth, ckpt: bool):
    model(ids, labels=ids, depth=depth, training=StepTraining("always" if ckpt else "never")).loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, device):
    """Seconds of one call of fn, right after an untimed call of the same fn: the steady state of
    a training loop. (Timed right after a different step, the same step ran up to 7% slower on
    the CPU, in the allocator's page faults for the logits, and by different amounts per step.)"""
    fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def build(args, device, dtype, depths):
    torch.manual_seed(0)
    cfg = OuroborosConfig(**SPLITS[args.shapes], rank=args.rank, max_depth=max(64, max(depths)))
    model = OuroborosModel.from_base(base_model(args.shapes, device, dtype), cfg).train()
    ids = torch.randint(0, model.vocab_size, (args.batch_size, args.seq_len), device=device)
    return model, ids


def flop_ratios(args, depths) -> dict[int, tuple[int, int, int]]:
    """depth -> FLOPs of (floor step, Ouroboros step, Ouroboros step with checkpointing), counted
    on a weightless copy of the model (device "meta"), where attention is counted too (the
    counter does not see CPU's fused attention kernel)."""
    model, ids = build(args, "meta", torch.float32, depths)
    return {d: (flops(lambda: floor_step(model, ids, d)),
                flops(lambda: ouroboros_step(model, None, ids, d, ckpt=False)),
                flops(lambda: ouroboros_step(model, None, ids, d, ckpt=True))) for d in depths}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=["smollm2", "qwen2.5-3b"], default="smollm2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda[:i], or meta (FLOP ratios only)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--depths", default="1,4,8,16")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    depths = [int(d) for d in args.depths.split(",")]
    meta = args.device == "meta"
    counted = flop_ratios(args, depths)
    print(f"# {args.shapes} shapes, {args.device}, {args.dtype}, batch {args.batch_size} x {args.seq_len} tokens, rank {args.rank}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + ("" if meta else f"; median of {args.repeats}, interleaved"))
    if meta:
        print(f"{'depth':>5} {'floor GFLOP':>12} {'ouroboros GFLOP':>16} {'ratio':>7} {'+ckpt GFLOP':>12} {'ratio':>7}")
        for d, (ff, fo, fc) in counted.items():
            print(f"{d:>5} {ff / 1e9:>12.1f} {fo / 1e9:>16.1f} {fo / ff:>7.3f} {fc / 1e9:>12.1f} {fc / ff:>7.3f}")
        return
    model, ids = build(args, args.device, dtype, depths)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = ids.numel()
    amp = autocast(args.device, dtype)
    print(f"{'depth':>5} {'floor s':>9} {'ouroboros s':>12} {'ratio':>7} {'FLOPs':>7} {'+ckpt s':>9} {'ratio':>7} {'FLOPs':>7} "
          f"{'train tok/s':>12} {'eval tok/s':>11}")
    for d in depths:
        ff, fo, fc = counted[d]
        with amp:
            fl, ob, ck, ev = [], [], [], []
            for _ in range(args.repeats):
                fl.append(timed(lambda: floor_step(model, ids, d), args.device))
                ob.append(timed(lambda: ouroboros_step(model, opt, ids, d, ckpt=False), args.device))
                ck.append(timed(lambda: ouroboros_step(model, opt, ids, d, ckpt=True), args.device))
                with torch.no_grad():
                    model.eval()
                    ev.append(timed(lambda: model(ids, depth=d), args.device))
                    model.train()
        f, o, c, e = (statistics.median(x) for x in (fl, ob, ck, ev))
        print(f"{d:>5} {f:>9.3f} {o:>12.3f} {o / f:>7.3f} {fo / ff:>7.3f} {c:>9.3f} {c / f:>7.3f} {fc / ff:>7.3f} "
              f"{tokens / o:>12.0f} {tokens / e:>11.0f}")


if __name__ == "__main__":
    main()
