"""Shared set-up for the benchmarks: a base model with real (SmolLM2) or random weights."""
from __future__ import annotations

import torch

from ouroboros_lm import load_base_model

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
SPLITS = {"smollm2": dict(n_prelude=7, recurrent_layer=15, n_coda=7), "qwen2.5-3b": dict(n_prelude=8, recurrent_layer=18, n_coda=8)}


def base_model(shapes: str, device: str, dtype: torch.dtype):
    """SmolLM2-135M (real weights) or Qwen2.5-3B shapes with random weights."""
    if shapes == "smollm2":
        return load_base_model("smollm2-135m", dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_3B), dtype=dtype)
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
