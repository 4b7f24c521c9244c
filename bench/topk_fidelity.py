"""How many of the teacher's predictions to store (issue #34): for K stored tokens per position, in float16,
how much of the teacher's probability the top-K hold, how much of the exact KL(teacher || student) the K + 1
bucket KL sees, and how close its gradient (with respect to the student's logits) is to the exact one, for
two students: the untrained pruned stack (far from the teacher) and the teacher itself with its logits
perturbed (close to it, as a trained student is).

The text: held-out blocks of the addresses the fair comparison trains beside (configs/fair-loop.yaml).

    python bench/topk_fidelity.py                    # SmolLM2-135M, 8 blocks x 128 tokens
    python bench/topk_fidelity.py --blocks 16 --top-k 4 8 16 32 64 128
"""
from __future__ import annotations

import argparse
import glob
import os

import torch
import torch.nn.functional as F

from common import base_model
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_tokenizer
from ouroboros_lm.data import build_corpus
from ouroboros_lm.loading import cache_dir
from ouroboros_lm.ops import topk_distill
from ouroboros_lm.targets import LOGP_DTYPE


def stored(t_logits: torch.Tensor, k: int, storage: str = "float16"):
    """Top-K ids and log-probabilities (+ the rest) as stored: float16, or uint8 (a log-probability step of
    1/8 nat over [-32, 0], the quantised alternative measured against it)."""
    lp = t_logits.float().log_softmax(-1)
    top = lp.topk(k)
    rest = torch.logsumexp(lp.scatter(-1, top.indices, float("-inf")), -1)
    logp = torch.cat([top.values, rest.unsqueeze(-1)], -1)
    if storage == "uint8":
        return top.indices, (logp.clamp(-31.875, 0) * 8).round() / 8
    return top.indices, logp.to(torch.float16).float()


def compare(student_logits: torch.Tensor, t_logits: torch.Tensor, ks, storage: str) -> list[tuple]:
    n = student_logits.shape[0]
    targets = torch.zeros(n, dtype=torch.long)
    s = student_logits.detach().requires_grad_(True)
    lt = t_logits.float().log_softmax(-1)
    exact = (lt.exp() * (lt - s.log_softmax(-1))).sum(-1).mean()
    g_exact, = torch.autograd.grad(exact, s)
    rows = []
    for k in ks:
        ids, logp = stored(t_logits, k, storage)
        loss, _, kl = topk_distill(s, targets, ids, logp, 0.0, 1.0)
        g, = torch.autograd.grad(loss, s)
        cos = F.cosine_similarity(g.flatten(), g_exact.flatten(), dim=0).item()
        mass = logp[:, :k].exp().sum(-1).mean().item()
        rows.append((k, mass, kl.item() / exact.item(), cos))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--top-k", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    args = ap.parse_args()
    torch.manual_seed(0)
    sotu = cache_dir() / "sotu"
    held = sorted(glob.glob(str(sotu / "200[1-9]_*.txt")) + glob.glob(str(sotu / "201*.txt")))
    tok = load_tokenizer("smollm2-135m")
    corpus = build_corpus(held[:2], tok, args.seq_len, heldout=held[2:])
    ids = corpus.heldout[: args.blocks]
    teacher = base_model("smollm2", "cpu", torch.float32)
    pruned = OuroborosModel.from_base(base_model("smollm2", "cpu", torch.float32),
                                      OuroborosConfig(n_prelude=7, recurrent_layer=15, n_coda=7))
    with torch.no_grad():
        t_logits = teacher(ids).logits[:, :-1].flatten(0, 1)
        p_logits = pruned(ids, baseline=True).logits[:, :-1].flatten(0, 1)
    near = t_logits + 0.5 * torch.randn_like(t_logits)
    bytes_ids = 2 if teacher.config.vocab_size <= 1 << 16 else 4
    print(f"SmolLM2-135M teacher, {ids.shape[0]} held-out blocks x {args.seq_len} tokens "
          f"({os.path.basename(held[2])}...)")
    for name, logits in (("pruned stack, untrained", p_logits), ("teacher + N(0, 0.5) on its logits", near)):
        print(f"\nstudent: {name}")
        print("| K | storage | bytes/token | teacher mass in top-K | KL seen / exact KL | gradient cosine to exact |")
        print("|---|---|---|---|---|---|")
        for storage, lp_bytes in (("float16", LOGP_DTYPE.itemsize), ("uint8", 1)):
            for k, mass, seen, cos in compare(logits, t_logits, args.top_k, storage):
                print(f"| {k} | {storage} | {k * bytes_ids + (k + 1) * lp_bytes} | {mass:.3f} | {seen:.3f} | {cos:.4f} |")


if __name__ == "__main__":
    main()
