"""Forward + backward time of each fused op (`ouroboros_lm.ops`) against its reference form, through the
package's own switch (`ops.reference(name)` / `ops.fused(name)`), as the model calls it, at SmolLM2 shapes
(2 x 256 tokens): min of `--repeats` interleaved calls, CPU seconds (robust to a shared machine).

    python bench/saved_parts_time.py [--dtype bfloat16] [--repeats 15]

(`bench/saved_changes.py` measures the same switch over a whole training step, with the saved bytes.)
"""
from __future__ import annotations

import argparse
import time

import torch

from ouroboros_lm import ops
from ouroboros_lm.controller import Controller
from ouroboros_lm.layers import gated_activation
from ouroboros_lm.loss import Teacher, default_chunk, distill_loss, head_loss
from ouroboros_lm.recurrence import RecurrenceGate


def parts(dt: torch.dtype):
    """Part name -> (the op it times, a function of the tensors that need a gradient, those tensors)."""
    torch.manual_seed(0)
    B, T, H, I, V = 2, 256, 576, 1536, 49152
    h, h2 = torch.randn(B, T, H, dtype=dt), torch.randn(B, T, H, dtype=dt)
    g, u = torch.randn(B, T, I, dtype=dt), torch.randn(B, T, I, dtype=dt)
    w = torch.nn.Parameter(torch.ones(H))
    head = torch.nn.Linear(H, V, bias=False).to(dt).requires_grad_(False)
    labels = torch.randint(0, V, (B, T))
    teacher = Teacher(torch.randn(B, T, H, dtype=dt), head, lm_head=head)
    chunk = default_chunk(V)
    gate = RecurrenceGate(H, -2.0)
    with torch.no_grad():
        gate.weight_new.normal_(std=0.02)
        gate.weight_old.normal_(std=0.02)
    ctrl = Controller(H, 256, 128, 32, 8)
    silu = torch.nn.SiLU()
    return {
        "LM head + loss": ("chunked_head_loss", lambda x: head_loss(x, head, labels), [h]),
        "KL to a teacher": ("chunked_kl", lambda x: distill_loss(x, head, teacher, labels, chunk, lm_head=head), [h]),
        "RMSNorm": ("rms_norm", lambda x: ops.rms_norm(x, w.to(x.dtype), 1e-5), [h]),
        "SwiGLU": ("swiglu", lambda a, b: gated_activation(silu, a, b), [g, u]),
        "gate": ("gate_mix", lambda a, b: gate(a, b), [h, h2]),
        "pool + Controller": ("prefix_mean_rms_norm", lambda x: ctrl.from_hidden(x, 1, "prefix_mean"), [h]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    dt = getattr(torch, args.dtype)

    def fb(op, fn, xs, fused):
        xs = [x.detach().requires_grad_(True) for x in xs]
        with ops.switched(fused, op), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
            y = fn(*xs)
        y.float().sum().backward()

    print(f"SmolLM2 shapes, 2 x 256, {args.dtype}, forward + backward, min of {args.repeats} interleaved, CPU ms")
    print("| part | op | reference ms | fused ms | fused / reference |")
    print("|---|---|---:|---:|---:|")
    for name, (op, fn, xs) in parts(dt).items():
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            for fused in (False, True):
                t0 = time.process_time()
                fb(op, fn, xs, fused)
                best[fused] = min(best[fused], time.process_time() - t0)
        print(f"| {name} | {op} | {best[False] * 1e3:.1f} | {best[True] * 1e3:.1f} | {best[True] / best[False]:.3f} |")


if __name__ == "__main__":
    main()
