"""Which operations' saved tensors make up the bytes autograd keeps for backward.

Same set-up as /work/shared/bench/saved_bytes.py (SmolLM2 shapes, random weights, 1 x 256 tokens,
bf16 base + autocast by default, DTYPE=fp32 for float32, no checkpointing), our model only. Each
tensor saved for backward is attributed to the innermost source line of this package (or of
torch/transformers when the package is not on the stack) that saved it, with its dtype and shape;
storages counted once (as the benchmark does) and only those freed after the step (weights and
caches excluded).

    PYTHONPATH=src python bench/saved_attribution.py [depth]     # default depth 1; also prints depth+1 - depth
"""
from __future__ import annotations

import collections
import gc
import os
import sys
import traceback

import torch

torch.set_num_threads(1)
DIMS = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True)
BF16 = os.environ.get("DTYPE", "bf16") == "bf16"


def where() -> str:
    frames = traceback.extract_stack()[:-2]
    for f in reversed(frames):
        if "ouroboros_lm" in f.filename:
            return f"{os.path.basename(f.filename)}:{f.lineno} {f.line.strip()[:70]}"
    for f in reversed(frames):
        if "site-packages" in f.filename:
            return f"{f.filename.split('site-packages/')[1]}:{f.lineno}"
    return "?"


def attribute(step):
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in saved:
            saved[st.data_ptr()] = (st.nbytes(), where(), str(t.dtype).replace("torch.", ""), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    del loss
    gc.collect()
    alive = {o.untyped_storage().data_ptr() for o in gc.get_objects() if torch.is_tensor(o)}
    rows = collections.Counter()
    for p, (n, w, dt, shape) in saved.items():
        if p not in alive:
            rows[(w, dt, shape)] += n
    return rows


def main():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ouroboros_lm import OuroborosConfig, OuroborosModel, StepTraining

    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**DIMS), dtype=torch.bfloat16 if BF16 else torch.float32)
    model = OuroborosModel.from_base(base.eval().requires_grad_(False),
                                     OuroborosConfig(n_prelude=7, recurrent_layer=15, n_coda=7, rank=32)).train()
    ids = torch.randint(0, DIMS["vocab_size"], (1, 256))
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16)
    with torch.no_grad(), amp():
        model(ids[:, :8], depth=1)

    def step(d):
        def run():
            with amp():
                return model(ids, labels=ids, depth=d, training=StepTraining("never")).loss
        return run

    mb = 2 ** 20
    a = attribute(step(depth))
    b = attribute(step(depth + 1))
    print(f"== depth {depth}: {sum(a.values()) / mb:.2f} MB ({'bf16' if BF16 else 'fp32'})")
    for (w, dt, shape), n in sorted(a.items(), key=lambda kv: -kv[1])[:40]:
        print(f"{n / mb:8.3f}  {dt:9s} {str(shape):22s} {w}")
    diff = collections.Counter(b)
    diff.subtract(a)
    print(f"== one more step (depth {depth + 1} - depth {depth}): {(sum(b.values()) - sum(a.values())) / mb:.2f} MB")
    for (w, dt, shape), n in sorted(diff.items(), key=lambda kv: -kv[1]):
        if n:
            print(f"{n / mb:8.3f}  {dt:9s} {str(shape):22s} {w}")


if __name__ == "__main__":
    main()
