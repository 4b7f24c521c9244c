"""Decoder families beyond the Llama layer that `layers.py` writes out: Gemma 2, OLMo 2, Granite.

Their layers expose the same seven projections (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)
but add their own details: Gemma 2 has four norms per layer (pre and post each branch, with
1 + w weights), attention-logit soft-capping, alternating sliding windows, scaled embeddings and
final-logit soft-capping; OLMo 2 normalises after each branch (no pre-norms) and normalises q and k
over the whole projection; Granite scales embeddings, residual branches, attention and logits.
Rather than writing each out, `generic_decoder_layer` runs Hugging Face's OWN layer forward with

* the seven projections computed by our hook (the recurrent layer's low-rank modulation), by
  overriding each nn.Linear's forward for the duration of the call;
* the per-step norms: the two norms that lead (Gemma 2, Granite) or close (OLMo 2, which has no
  pre-norms) the attention and MLP branches get the step's weights (`torch.func.functional_call`,
  so gradients reach them); the family's other norms keep the layer's own weights;
* our KV cache: a `SlotCache` whose `update` appends to our `KVSlot`, whatever layer index the
  attention passes, so every recurrence step keeps its own keys and values;
* our masks (causal, padding, sliding window) as the additive masks HF attention expects.

The Llama-family path in `layers.py` stays the fast one for the families it covers. This module
imports nothing from the package (`layers.decoder_layer` dispatches here).
"""
from __future__ import annotations

import contextlib

import torch

# HF layer class -> the two norms that get per-step weights (attention branch, MLP branch)
GENERIC_LAYERS = {
    "Gemma2DecoderLayer": ("input_layernorm", "pre_feedforward_layernorm"),
    "Olmo2DecoderLayer": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "GraniteDecoderLayer": ("input_layernorm", "post_attention_layernorm"),
}
GENERIC_MODEL_TYPES = ("gemma2", "olmo2", "granite")
LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


def is_generic(layer) -> bool:
    return type(layer).__name__ in GENERIC_LAYERS


def step_norm_names(layer) -> tuple[str, str]:
    """The layer's two norms that per-step norms replace (Llama family: its two pre-norms)."""
    return GENERIC_LAYERS.get(type(layer).__name__, LLAMA_NORMS)


def scale_embeddings(h: torch.Tensor, base_config) -> torch.Tensor:
    """Granite multiplies the token embeddings (Gemma 2's embedding module scales its own)."""
    m = getattr(base_config, "embedding_multiplier", None) if base_config.model_type == "granite" else None
    return h if m is None else h * m


def final_logits(logits: torch.Tensor, base_config) -> torch.Tensor:
    """Granite divides the logits by logits_scaling; Gemma 2 soft-caps them."""
    if base_config.model_type == "granite" and getattr(base_config, "logits_scaling", None):
        return logits / base_config.logits_scaling
    cap = getattr(base_config, "final_logit_softcapping", None) if base_config.model_type == "gemma2" else None
    return logits if cap is None else torch.tanh(logits / cap) * cap


class SlotCache:
    """What HF attention sees as its cache: `update` appends to one of our KV slots."""

    def __init__(self, kv):
        self.kv = kv

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.kv.extend(key_states, value_states)


def additive_mask(ctx, window: int | None, like: torch.Tensor) -> torch.Tensor:
    """ctx's boolean mask (causal, padding, sliding window) as HF eager/SDPA attention's additive
    float mask [B or 1, 1, T, S]; the plain causal case (None in ctx) is written out."""
    m = ctx.mask_for(window)
    if m is None:
        kpos = torch.arange(ctx.num_keys, device=like.device)
        m = (kpos[None, :] <= ctx.query_positions[:, None])[None, None]
    return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(~m, torch.finfo(like.dtype).min)


@contextlib.contextmanager
def projections_through(layer, project, paths: dict[str, str]):
    """While inside, each of the seven nn.Linear computes `project(name, linear, x)`."""
    linears = []
    for name, path in paths.items():
        mod = layer
        for part in path.split("."):
            mod = getattr(mod, part)
        mod.forward = (lambda n, m: lambda x: project(n, m, x))(name, mod)
        linears.append(mod)
    try:
        yield
    finally:
        for mod in linears:
            del mod.forward  # back to nn.Linear.forward


def generic_decoder_layer(layer, h: torch.Tensor, ctx, *, window=None, project=None, norm_weights=None, kv=None,
                          paths: dict[str, str] | None = None) -> torch.Tensor:
    """Hugging Face's own forward of `layer` on h [B, T, H], with our projections, per-step norms,
    KV slot and masks (see the module docstring); the arguments mean what they mean for
    `layers.decoder_layer`."""
    params = {} if norm_weights is None else {f"{n}.weight": w for n, w in zip(step_norm_names(layer), norm_weights)}
    kwargs = dict(attention_mask=additive_mask(ctx, window, h), position_embeddings=(ctx.cos, ctx.sin),
                  cache=SlotCache(kv) if kv is not None else None, use_cache=kv is not None)
    hook = projections_through(layer, project, paths) if project is not None else contextlib.nullcontext()
    with hook:
        out = torch.func.functional_call(layer, params, (h,), kwargs) if params else layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out
