"""Shared set-up for the benchmarks: a base model with real (SmolLM2) or random weights."""
from __future__ import annotations

import torch

from ouroboros_lm import load_base_model

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
# SmolLM2-135M's shapes, for building it without weights (device "meta": FLOP counts only)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
SPLITS = {"smollm2": dict(n_prelude=7, recurrent_layer=15, n_coda=7), "qwen2.5-3b": dict(n_prelude=8, recurrent_layer=18, n_coda=8)}


def base_model(shapes: str, device: str, dtype: torch.dtype):
    """SmolLM2-135M (real weights) or Qwen2.5-3B shapes with random weights; on device "meta",
    either one's shapes without any weights (enough to count FLOPs)."""
    if shapes == "smollm2" and device != "meta":
        return load_base_model("smollm2-135m", dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = Qwen2Config(**QWEN25_3B) if shapes == "qwen2.5-3b" else LlamaConfig(**SMOLLM2_135M)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
