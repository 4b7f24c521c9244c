"""Forward + backward time of each part changed this round, old form vs new, at SmolLM2 shapes
(2 x 256 tokens): min of `--repeats` interleaved calls, CPU seconds (robust to a shared machine).

    python bench/saved_parts_time.py [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ouroboros_lm.controller import Controller, pool
from ouroboros_lm.layers import _SwiGLU, rms_norm
from ouroboros_lm.loss import causal_lm_loss, head_loss
from ouroboros_lm.recurrence import RecurrenceGate
from saved_changes import old_gate_forward, old_rms_norm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    dt = getattr(torch, args.dtype)
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16)
    torch.manual_seed(0)
    B, T, H, I, V = 2, 256, 576, 1536, 49152
    h = torch.randn(B, T, H, dtype=dt)
    h2 = torch.randn(B, T, H, dtype=dt)
    g, u = torch.randn(B, T, I, dtype=dt), torch.randn(B, T, I, dtype=dt)
    w = torch.nn.Parameter(torch.ones(H))
    head = torch.nn.Linear(H, V, bias=False).to(dt).requires_grad_(False)
    labels = torch.randint(0, V, (B, T))
    gate = RecurrenceGate(H, -2.0)
    with torch.no_grad():
        gate.weight_new.normal_(std=0.02)
        gate.weight_old.normal_(std=0.02)
    ctrl = Controller(H, 256, 128, 32, 8)

    def fb(fn, *xs):
        def run():
            xs_ = [x.detach().requires_grad_(True) for x in xs]
            with amp():
                y = fn(*xs_)
            y.float().sum().backward()
        return run

    pairs = {
        "LM head + loss": (fb(lambda x: causal_lm_loss(head(x), labels), h), fb(lambda x: head_loss(x, head, labels), h)),
        "RMSNorm": (fb(lambda x: old_rms_norm(x, w.to(x.dtype), 1e-5), h), fb(lambda x: rms_norm(x, w.to(x.dtype), 1e-5), h)),
        "SwiGLU": (fb(lambda a, b: F.silu(a) * b, g, u), fb(lambda a, b: _SwiGLU.apply(a, b), g, u)),
        "gate": (fb(lambda a, b: old_gate_forward(gate, a, b), h, h2), fb(lambda a, b: gate(a, b), h, h2)),
        "pool + Controller": (fb(lambda x: ctrl(pool(x, "prefix_mean"), 1), h), fb(lambda x: ctrl.from_hidden(x, 1, "prefix_mean"), h)),
    }
    print(f"SmolLM2 shapes, {B} x {T}, {args.dtype}, forward + backward, min of {args.repeats} interleaved, CPU ms")
    print("| part | old ms | new ms | new / old |")
    print("|---|---:|---:|---:|")
    for name, (old, new) in pairs.items():
        best = {0: float("inf"), 1: float("inf")}
        for _ in range(args.repeats):
            for k, f in ((0, old), (1, new)):
                t0 = time.process_time()
                f()
                best[k] = min(best[k], time.process_time() - t0)
        print(f"| {name} | {best[0] * 1e3:.1f} | {best[1] * 1e3:.1f} | {best[1] / best[0]:.3f} |")


if __name__ == "__main__":
    main()
