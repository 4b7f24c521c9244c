"""The recursion's state, step by step, on held-out text: its scale ||h_s|| / ||h_0||, the size of
each step's update ||h_s - h_(s-1)|| / ||h_(s-1)||, and the loss had the recursion stopped there
(coda + head on h_s), for trained adapters side by side (e.g. one sweep arm's seeds against
another's). Whether the state's growth tracks the loss is the question of "the readout blind spot"
(a final norm hides the scale from the loss).

    python bench/state_scale.py runs/depth/<run>-seed0 runs/depth/<run>-seed1 ... --depth 32
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics

import torch

from ouroboros_lm import load_adapter
from ouroboros_lm.data import build_corpus
from ouroboros_lm.loading import load_tokenizer

CACHE = os.environ.get("OUROBOROS_CACHE", os.path.expanduser("~/.cache/ouroboros-lm"))
HELDOUT = [f"{CACHE}/sotu/200[1-9]_*.txt", f"{CACHE}/sotu/201*.txt", f"{CACHE}/sotu/202*.txt"]


@torch.no_grad()
def trace(model, blocks: torch.Tensor, depth: int) -> list[tuple[float, float, float]]:
    """(loss, scale, update) after each step 1..depth, averaged over `blocks`."""
    h, ctx, mask = model.embed(blocks)
    h0 = model.run_layers("prelude", h, ctx)
    states = [h0]
    model.recurrent(h0, ctx, depth, mask=mask, observe=lambda s, x: states.append(x))
    out = []
    base = h0.float().norm(dim=-1)
    for prev, x in zip(states, states[1:]):
        loss = model.head(model.run_layers("coda", x, ctx), labels=blocks).loss.item()
        scale = (x.float().norm(dim=-1) / base).mean().item()
        update = ((x.float() - prev.float()).norm(dim=-1) / prev.float().norm(dim=-1)).mean().item()
        out.append((loss, scale, update))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapters", nargs="+", help="trained adapter folders")
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", default="1,2,3,4,6,8,12,16,24,32", help="steps shown")
    args = p.parse_args()
    torch.manual_seed(0)
    traces = {}
    corpus = None
    for folder in args.adapters:
        model = load_adapter(folder).eval()
        if corpus is None:
            files = sorted(f for g in HELDOUT for f in glob.glob(g))
            corpus = build_corpus(files[1:], load_tokenizer(model.base_name), seq_len=args.seq_len, heldout=files[:1])
        traces[folder] = trace(model, corpus.train[: args.blocks], args.depth)
    shown = [int(s) for s in args.steps.split(",") if int(s) <= args.depth]
    print("step | " + " | ".join(f"{os.path.basename(f.rstrip('/'))[-40:]} loss / scale / update" for f in traces))
    for s in shown:
        cells = [f"{t[s - 1][0]:.3f} / {t[s - 1][1]:.3f} / {t[s - 1][2]:.4f}" for t in traces.values()]
        print(f"{s:4d} | " + " | ".join(cells))
    for f, t in traces.items():
        losses, scales = [x[0] for x in t], [x[1] for x in t]
        r = statistics.correlation(losses, scales) if len(t) > 2 else float("nan")
        print(f"{os.path.basename(f.rstrip('/'))}: best step {min(range(len(t)), key=lambda i: losses[i]) + 1}, "
              f"scale at {len(t)} steps {scales[-1]:.3f}, corr(loss, scale) over steps {r:+.2f}")


if __name__ == "__main__":
    main()
