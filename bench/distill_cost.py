"""What distillation costs, side by side in one run (issue #34): a training step without a teacher, with the
full model run online beside it (the exact KL), and with the teacher's top-K predictions read from disk
(`train --distill-source stored`); the teacher pass that stores them, per block; bytes per token on disk;
and each mode's peak memory (a child process per mode, its peak resident set).

The models are the fair comparison's planned pair (configs/fair-loop.yaml): the loop (16 stored layers, layers
20-21 looped twice, LoRA r7 alpha 14) and the same 16 layers healed (LoRA r13 alpha 26). Steps are interleaved,
one of each per round, so a busy machine slows them alike; the ratios to the plain step are what count.

    python bench/distill_cost.py                     # SmolLM2-135M, 4 x 128 tokens, top-32, CPU
    python bench/distill_cost.py --top-k 8 32 128 --rounds 6
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from common import base_model
from ouroboros_lm import OuroborosConfig, OuroborosModel, RecursionPolicy
from ouroboros_lm.loss import StoredTeacher
from ouroboros_lm.targets import LOGP_DTYPE, teacher_predictions
from ouroboros_lm.teacher import teacher_targets

KEEP = (0, 1, 2, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 27, 28, 29)
ARMS = {  # name: (OuroborosConfig fields, training depth)
    "loop@2 (16 planned layers, 20-21 twice, LoRA r7)": (dict(keep_layers=KEEP, recurrent_layer=20, block_layers=2,
                                                              injection="linear", lora_rank=7, lora_alpha=14.0,
                                                              prelude_lora_layers=8, recurrent_lora=True,
                                                              variant="none"), 2),
    "heal, same 16 layers (LoRA r13)": (dict(keep_layers=KEEP, heal_layers=1, lora_rank=13, lora_alpha=26.0), 1),
}


def build(name: str):
    fields, depth = ARMS[name]
    model = OuroborosModel.from_base(base_model("smollm2", "cpu", torch.float32), OuroborosConfig(rank=32, **fields),
                                     policy=RecursionPolicy(default_depth=depth)).train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), depth


def step(model, opt, ids, depth, teacher) -> None:
    model(ids, labels=ids, depth=depth, teacher=teacher).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def stored_of(teacher, ids, k) -> StoredTeacher:
    """The targets as training reads them: float16 log-probabilities back to float32."""
    top, lp = teacher_predictions(teacher, ids, k)
    return StoredTeacher(top, lp.to(torch.float16).float(), 1.0, 1.0)


def peak_child(mode: str, args) -> dict:
    """Resident memory (MiB) of a fresh process that builds the loop model and runs two steps in `mode`:
    before the steps, and the peak while they run (sampled every 2 ms)."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--seq-len", str(args.seq_len), "--batch-size",
                          str(args.batch_size), "--top-k", str(args.top_k[0])], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(mode: str, args) -> None:
    name = next(iter(ARMS))
    ids = torch.randint(0, 49152, (args.batch_size, args.seq_len))
    targets = None
    if mode == "stored":  # computed by another process in a real run: here, then the teacher is let go
        teacher = base_model("smollm2", "cpu", torch.float32)
        targets = stored_of(teacher, ids, args.top_k[0])
        del teacher
    model, opt, depth = build(name)
    teacher = base_model("smollm2", "cpu", torch.float32) if mode == "online" else None
    gc.collect()
    before, peak, done = rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample)
    watcher.start()
    for _ in range(2):
        step(model, opt, ids, depth, teacher_targets(teacher, ids, 1.0) if teacher is not None else targets)
    done.set()
    watcher.join()
    print(json.dumps({"before": before, "peak": peak[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--top-k", type=int, nargs="+", default=[32])
    ap.add_argument("--child", default=None)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args)
    torch.manual_seed(0)
    teacher = base_model("smollm2", "cpu", torch.float32)
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch_size, args.seq_len))
    stored = {k: stored_of(teacher, ids, k) for k in args.top_k}
    models = {name: build(name) for name in ARMS}
    modes = ["plain", "online"] + [f"stored top-{k}" for k in args.top_k]
    times = {(name, m): [] for name in models for m in modes}
    passes = []
    for r in range(args.rounds + 1):  # the first round warms up, untimed
        for (name, mode), seen in times.items():
            model, opt, depth = models[name]
            t0 = time.perf_counter()
            target = (teacher_targets(teacher, ids, 1.0) if mode == "online" else
                      stored[int(mode.split("-")[1])] if mode.startswith("stored") else None)
            step(model, opt, ids, depth, target)
            if r:
                seen.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        teacher_predictions(teacher, ids, max(args.top_k))
        if r:
            passes.append(time.perf_counter() - t0)
    print(f"SmolLM2-135M, {args.batch_size} x {args.seq_len} tokens, {args.rounds} rounds, median step time "
          f"(ratio to the same model's plain step)")
    for (name, mode), seen in times.items():
        med, ref = statistics.median(seen), statistics.median(times[(name, "plain")])
        print(f"  {name:50s} {mode:14s} {med:6.2f} s  {med / ref:5.2f}x")
    ref = statistics.median(times[(next(iter(models)), "plain")])
    print(f"  teacher pass (top-{max(args.top_k)}) on the same {args.batch_size} blocks: "
          f"{statistics.median(passes):.2f} s = {statistics.median(passes) / ref:.2f}x the loop's plain step")
    ids_bytes = 2  # SmolLM2's 49,152 ids fit uint16
    for k in args.top_k:
        print(f"  bytes per token on disk, top-{k}: {k * ids_bytes + (k + 1) * LOGP_DTYPE.itemsize}")
    if not args.no_memory:
        print("resident memory, the loop, two steps in a fresh process each (MiB; model built, teacher loaded if "
              "online):")
        for mode in ("plain", "online", "stored"):
            m = peak_child(mode, args)
            print(f"  {mode:8s} before the steps {m['before']:7.0f}   peak during them {m['peak']:7.0f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
