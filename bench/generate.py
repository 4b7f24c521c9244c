"""Decode speed, measured side by side in one run on SmolLM2-135M (CPU by default).

1. Ouroboros tokens/s with the per-step KV cache vs recomputing the prefix, at several
   context lengths.
2. Per-token decode time of Ouroboros at depth N divided by that of the full base model under
   Hugging Face `generate` with its own cache, against the layer-count ratio (P + N + C) / L.

    python bench/generate.py [--adapter DIR] [--contexts 128,512] [--depths 1,4,8,16]
"""
from __future__ import annotations

import argparse
import time

import torch

from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model


@torch.no_grad()
def per_token_cached(model, prompt, depth, n):
    """Seconds per decoded token after the prompt is in the cache (prefill excluded)."""
    cache = model.new_cache(depth, capacity=prompt.shape[1] + n + 1)
    logits = model(prompt, depth=depth, cache=cache).logits[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(n):
        tok = model(tok, depth=depth, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t) / n


@torch.no_grad()
def per_token_uncached(model, prompt, depth, n):
    ids = prompt
    t = time.perf_counter()
    for _ in range(n):
        tok = model(ids, depth=depth).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, tok], 1)
    return (time.perf_counter() - t) / n


@torch.no_grad()
def per_token_hf(full, prompt, n):
    """HF generate with its cache: (time for 1 + n tokens - time for 1 token) / n."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    t = time.perf_counter()
    full.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    one = time.perf_counter() - t
    t = time.perf_counter()
    full.generate(prompt, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)
    return (time.perf_counter() - t - one) / n


def best(fn, repeats):
    return min(fn() for _ in range(repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--adapter", default=None, help="trained adapter (speed does not depend on training)")
    ap.add_argument("--contexts", default="128,512")
    ap.add_argument("--depths", default="1,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--uncached-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    torch.manual_seed(0)
    full = load_base_model(args.base)
    L = full.config.num_hidden_layers
    if args.adapter:
        model = OuroborosModel.load_adapter(args.adapter, base=load_base_model(args.base))
    else:
        model = OuroborosModel.from_base(load_base_model(args.base), OuroborosConfig(n_prelude=7, recurrent_layer=15, n_coda=7))
    model.eval()
    P, C = model.config.n_prelude, model.config.n_coda
    print(f"# {args.base}: L={L}, P={P}, C={C}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {model.device}; best of {args.repeats}")
    vocab = model.vocab_size
    print("\n## cached vs uncached decode (Ouroboros)")
    print(f"{'context':>8} {'depth':>6} {'cached tok/s':>13} {'uncached tok/s':>15} {'speed-up':>9}")
    mid = depths[len(depths) // 2]
    for ctx in contexts:
        prompt = torch.randint(0, vocab, (1, ctx))
        c = best(lambda: per_token_cached(model, prompt, mid, args.new_tokens), args.repeats)
        u = best(lambda: per_token_uncached(model, prompt, mid, args.uncached_tokens), 1)
        print(f"{ctx:>8} {mid:>6} {1 / c:>13.1f} {1 / u:>15.1f} {u / c:>8.1f}x")
    print("\n## per-token decode time vs the full model (HF generate, with cache)")
    print(f"{'context':>8} {'depth':>6} {'ouroboros ms':>13} {'full HF ms':>11} {'ratio':>7} {'(P+N+C)/L':>10} {'target':>7}")
    for ctx in contexts:
        prompt = torch.randint(0, vocab, (1, ctx))
        hf = best(lambda: per_token_hf(full, prompt, args.new_tokens), args.repeats)
        for d in depths:
            o = best(lambda: per_token_cached(model, prompt, d, args.new_tokens), args.repeats)
            ideal = (P + d + C) / L
            print(f"{ctx:>8} {d:>6} {o * 1e3:>13.2f} {hf * 1e3:>11.2f} {o / hf:>7.3f} {ideal:>10.3f} {1.1 * ideal:>7.3f}")


if __name__ == "__main__":
    main()
