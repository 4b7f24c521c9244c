"""Memory of one training step at several depths, with and without activation checkpointing
per recurrence step. Each configuration runs in a fresh process.

* activations: bytes of the tensors autograd keeps for the backward pass (parameters and
  buffers excluded; each storage counted once), read with saved-tensor hooks: exact and
  deterministic, and exactly what checkpointing is meant to cut.
* peak: on CUDA, torch.cuda.max_memory_allocated above the level before the step (after a
  warm-up step); on CPU, the peak resident memory during the first step above the level just
  before it, sampled every millisecond from /proc/self/statm (allocator caching makes this
  rougher).

    python bench/memory.py                      # SmolLM2-135M shapes, CPU
    python bench/memory.py --shapes qwen2.5-3b --device cuda --dtype bfloat16 --seq-len 2048
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args) -> dict:
    import torch

    from common import SPLITS, autocast, base_model
    from ouroboros_lm import OuroborosConfig, OuroborosModel, StepTraining

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    cfg = OuroborosConfig(**SPLITS[args.shapes], rank=32, max_depth=64)
    model = OuroborosModel.from_base(base_model(args.shapes, args.device, dtype), cfg).train()
    training = StepTraining("always" if args.ckpt else "never")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    amp = autocast(args.device, dtype)

    with torch.no_grad():  # builds the folded [W | B] weights of the low-rank paths: frozen weights, not activations
        model(ids[:, :8], depth=1)
    frozen = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) + model.recurrent.bases.folded_weights()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in frozen:
            st = t.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
        return t

    def step(count: bool):
        with amp:
            if count:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model(ids, labels=ids, depth=args.depth, training=training).loss
            else:
                loss = model(ids, labels=ids, depth=args.depth, training=training).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    if args.device.startswith("cuda"):
        step(False)  # optimizer state and gradient buffers exist from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(True)
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20, "saved_mb": sum(saved.values()) / 2**20}
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=poll)
    t.start()
    step(True)
    done.set()
    t.join()
    return {"peak_mb": (peak[0] - before) / 2**20, "saved_mb": sum(saved.values()) / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=["smollm2", "qwen2.5-3b"], default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--depths", default="1,4,8,16")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    depths = [int(d) for d in args.depths.split(",")]
    print(f"# {args.shapes} shapes, {args.device}, {args.dtype}, batch {args.batch_size} x {args.seq_len}; MiB")
    print(f"{'depth':>5} {'activations':>12} {'+ckpt':>8} {'peak':>8} {'+ckpt':>8}")
    res = {}
    for d in depths:
        for ck in (False, True):
            cmd = [sys.executable, __file__, "--one", "--depth", str(d), "--shapes", args.shapes, "--device", args.device,
                   "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)] + (["--ckpt"] if ck else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            res[(d, ck)] = json.loads(out)
        print(f"{d:>5} {res[(d, False)]['saved_mb']:>12.0f} {res[(d, True)]['saved_mb']:>8.0f} "
              f"{res[(d, False)]['peak_mb']:>8.0f} {res[(d, True)]['peak_mb']:>8.0f}")
    d0, dn = depths[0], depths[-1]
    for key, label in (("saved_mb", "activations"), ("peak_mb", "peak")):
        print(f"{label}: depth {dn} / depth {d0} = plain {res[(dn, False)][key] / res[(d0, False)][key]:.2f}x, "
              f"checkpointed {res[(dn, True)][key] / res[(d0, True)][key]:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
