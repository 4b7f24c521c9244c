"""Shared set-up for the benchmarks: a base model with real (SmolLM2) or random weights."""
from __future__ import annotations

import contextlib

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
    return random_base(shapes, device, dtype)


def random_base(shapes: str, device: str, dtype: torch.dtype, **overrides):
    """A model of the given shapes with random weights (`overrides`: config fields, e.g. fewer layers)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    dims = {**(QWEN25_3B if shapes == "qwen2.5-3b" else SMOLLM2_135M), **overrides}
    config = Qwen2Config(**dims) if shapes == "qwen2.5-3b" else LlamaConfig(**dims)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision in `dtype` on `device`; nothing for float32 (or the meta device)."""
    if dtype == torch.float32 or device == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
