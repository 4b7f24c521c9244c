"""Decode speed, measured side by side in one run on SmolLM2-135M (CPU by default).

1. Ouroboros tokens/s with the per-step KV cache vs recomputing the prefix, at several
   context lengths.
2. Per-token decode time of Ouroboros at depth N divided by that of the full base model under
   Hugging Face `generate` with its own cache, against the layer-count ratio (P + N + C) / L.

3. With --exit-thresholds: decoding a held-out State of the Union passage with adaptive exit
   (converged rule, at most --exit-max-depth steps) against fixed depth --exit-reference:
   tokens/s side by side, and the mean steps per token.

    python bench/generate.py [--adapter DIR] [--contexts 128,512] [--depths 1,4,8,16]
    python bench/generate.py --adapter runs/demo --exit-thresholds 0.1,0.05 --depths 8 --contexts 128
"""
from __future__ import annotations

import argparse
import time

import torch

from ouroboros_lm import OuroborosConfig, OuroborosModel, load_adapter, load_base_model, load_tokenizer
from ouroboros_lm.exits import ExitRule


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
    ap.add_argument("--exit-thresholds", default="", help="adaptive exit thresholds to compare (needs --adapter)")
    ap.add_argument("--exit-max-depth", type=int, default=32)
    ap.add_argument("--exit-reference", type=int, default=8, help="the fixed depth adaptive decoding is compared with")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    torch.manual_seed(0)
    full = load_base_model(args.base)
    L = full.config.num_hidden_layers
    if args.adapter:
        model = load_adapter(args.adapter, base=load_base_model(args.base))
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
    if args.exit_thresholds:
        adaptive_decode(model, args)


def adaptive_decode(model, args) -> None:
    """Greedy decoding of a real held-out passage: fixed depth vs adaptive exit, interleaved."""
    from ouroboros_lm.loading import cache_dir

    text = sorted((cache_dir() / "sotu").glob("2019_*.txt"))[0].read_text()
    prompt = load_tokenizer(args.base)(text, return_tensors="pt").input_ids[:, :128]
    n = args.new_tokens

    def run(depth, rule):
        stats = {}
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, depth=depth, exit_rule=rule, stats=stats)
        steps = torch.stack(stats["steps"]).float().mean().item() if stats.get("steps") else float(depth)
        return time.perf_counter() - t, steps

    print(f"\n## adaptive exit vs fixed depth {args.exit_reference} (128-token held-out prompt, {n} new tokens, "
          "prefill included)")
    print(f"{'rule':>34} {'steps/token':>12} {'tok/s':>8} {'vs fixed':>9}")
    ref_t, _ = min(run(args.exit_reference, None) for _ in range(args.repeats))
    print(f"{'fixed depth ' + str(args.exit_reference):>34} {args.exit_reference:>12.2f} {n / ref_t:>8.1f} {1.0:>8.2f}x")
    for t in [float(x) for x in args.exit_thresholds.split(",") if x]:
        rule = ExitRule(threshold=t)
        secs, steps = min(run(args.exit_max_depth, rule) for _ in range(args.repeats))
        name = f"converged<{t:g}, at most {args.exit_max_depth}"
        print(f"{name:>34} {steps:>12.2f} {n / secs:>8.1f} {ref_t / secs:>8.2f}x")


if __name__ == "__main__":
    main()
