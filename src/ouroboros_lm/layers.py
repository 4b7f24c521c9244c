"""One Llama-family decoder layer, written out so the recurrent block can hook into it.

Llama, Qwen2/Qwen2.5, Qwen3 and Mistral share this layer: pre-norm attention with rotary
position embeddings (grouped-query, optional q/k/v bias, Qwen3's per-head q/k norms,
optional sliding window) followed by a pre-norm gated MLP. We reuse the Hugging Face
module's weights and compute the layer here, so that

* the recurrent layer can compute its seven projections its own way (with their low-rank
  paths folded in, `lora.ModulatedProjections`) and swap in per-step norms,
* every layer, prelude and coda included, can read and extend a key/value cache that we own
  (generation keeps one per recurrence step).

Its RMSNorm and SwiGLU are `ops.rms_norm` and `ops.swiglu` (hand-written backward passes that save
less; `ops.reference()` switches them off). `tests/test_core.py` checks that this equals Hugging Face's
own forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .families import generic_decoder_layer, is_generic, rotary_tables
from .ops import rms_norm, swiglu
from .projections import PROJECTIONS, get_projection, projection_modules  # noqa: F401 (the seven-projection view)


def gated_activation(act_fn: nn.Module, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """act_fn(g) * u, the gated MLP's product (`ops.swiglu` for SiLU)."""
    if type(act_fn).__name__ in ("SiLU", "SiLUActivation"):
        return swiglu(g, u)
    return act_fn(g) * u


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@dataclass
class AttentionContext:
    """What every layer of one forward pass shares: rotary tables and masks.

    `mask` is None for the plain causal case (no padding, no cache), which lets SDPA use
    its fused causal kernel; otherwise a boolean [B, 1, T, S] mask (True = may attend).
    `window_masks` caches the sliding-window variant per window size. `tables` holds the rotary
    tables by layer kind where a family has several (Gemma 3: local and global); cos, sin are the
    Llama layer's (the only table elsewhere).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    key_padding: torch.Tensor | None  # [B, S] bool, True = real token (S = keys incl. cache)
    query_positions: torch.Tensor  # [T] absolute index of each query among the S keys
    num_keys: int  # S: cached keys + new ones
    window_masks: dict
    tables: dict = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        if window is None:
            return self.mask
        if window not in self.window_masks:
            S = self.num_keys
            kpos = torch.arange(S, device=self.query_positions.device)
            qpos = self.query_positions[:, None]
            allowed = (kpos[None, :] <= qpos) & (qpos - kpos[None, :] < window)
            m = allowed[None, None]
            if self.key_padding is not None:
                m = m & self.key_padding[:, None, None, :]
                m = m | torch.eye(S, device=m.device, dtype=torch.bool)[self.query_positions][None, None]
            self.window_masks[window] = m
        return self.window_masks[window]


def build_context(
    rotary_emb: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    key_padding: torch.Tensor | None,
    past_length: int = 0,
) -> AttentionContext:
    """Rotary tables for `position_ids` and the attention mask for T new queries after
    `past_length` cached keys. `key_padding` ([B, past+T], True = real token) may be None."""
    T = hidden.shape[1]
    tables = rotary_tables(rotary_emb, hidden, position_ids)
    cos, sin = tables.get(None, next(iter(tables.values())))
    S = past_length + T
    qpos = torch.arange(past_length, S, device=hidden.device)
    if key_padding is None and (past_length == 0 or T == 1):
        mask = None  # plain causal (SDPA's fused kernel), or one new query that sees every key
    else:
        kpos = torch.arange(S, device=hidden.device)
        m = (kpos[None, :] <= qpos[:, None])[None, None]  # [1, 1, T, S]
        if key_padding is not None:
            m = m & key_padding[:, None, None, :]
            # A padded query has no real key before it; let it see itself so the softmax
            # stays finite. Its output is never used.
            m = m | (kpos[None, :] == qpos[:, None])[None, None]
        mask = m
    return AttentionContext(cos, sin, mask, key_padding, qpos, S, {}, tables)


def attention_kind(window: int | None) -> str:
    """'sliding_attention' (a local layer: it attends to the last `window` keys) or 'full_attention'
    (a global one): the layer_types names of Gemma 2/3."""
    return "sliding_attention" if window is not None else "full_attention"


def layer_window(layer: nn.Module, base_config) -> int | None:
    """Sliding-window size of this layer, or None for full attention."""
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if getattr(base_config, "model_type", None) in ("mistral", "phi3"):  # one window for every layer
        return getattr(base_config, "sliding_window", None)
    return None


# A projection hook: given the projection's name, its nn.Linear and its input, return the output.
ProjectFn = Callable[[str, nn.Linear, torch.Tensor], torch.Tensor]


def plain_projection(name: str, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class KVSlot:
    """Keys and values one layer application has seen so far (for cached decoding).

    With a `capacity` (prompt + new tokens), the buffers are allocated once on the first call
    and filled in place; without one they grow by concatenation."""

    __slots__ = ("k", "v", "length", "capacity")

    def __init__(self, capacity: int | None = None):
        self.k = None
        self.v = None
        self.length = 0
        self.capacity = capacity

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        if self.capacity is None:
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            self.length += T
            return self.k, self.v
        if self.k is None:
            B, H, _, D = k.shape
            self.k = k.new_empty(B, H, self.capacity, D)
            self.v = v.new_empty(B, H, self.capacity, v.shape[-1])
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded")
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


def decoder_layer(
    layer: nn.Module,
    h: torch.Tensor,
    ctx: AttentionContext,
    *,
    window: int | None = None,
    project: ProjectFn | None = None,
    norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv: KVSlot | None = None,
) -> torch.Tensor:
    """Apply one decoder layer to h [B, T, H].

    project: optional hook computing each of the seven projections (the recurrent block's
        low-rank modulation); by default the layer's own nn.Linear.
    norm_weights: optional (input_norm, post_attention_norm) weights replacing the layer's own.
    kv: optional cache slot; new keys/values are appended and attention covers all of them.
    Other families' layers (Gemma 2/3, OLMo 2, Granite, Phi-3) run Hugging Face's own forward (`families.py`).
    """
    if is_generic(layer):
        return generic_decoder_layer(layer, h, ctx, window=window, project=project, norm_weights=norm_weights, kv=kv,
                                     modules=projection_modules(layer) if project is not None else None)
    attn, mlp = layer.self_attn, layer.mlp
    eps_in = layer.input_layernorm.variance_epsilon
    eps_post = layer.post_attention_layernorm.variance_epsilon
    w_in, w_post = norm_weights if norm_weights is not None else (
        layer.input_layernorm.weight,
        layer.post_attention_layernorm.weight,
    )

    proj = project if project is not None else plain_projection
    B, T, _ = h.shape
    head_dim = attn.head_dim
    x = rms_norm(h, w_in, eps_in)
    q = proj("q", attn.q_proj, x).view(B, T, -1, head_dim)
    k = proj("k", attn.k_proj, x).view(B, T, -1, head_dim)
    v = proj("v", attn.v_proj, x).view(B, T, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rope(q, k, ctx.cos, ctx.sin)
    if kv is not None:
        k, v = kv.extend(k, v)
    mask = ctx.mask_for(window)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and T > 1,
        scale=attn.scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    out = out.transpose(1, 2).reshape(B, T, -1)
    h = h + proj("o", attn.o_proj, out)

    x = rms_norm(h, w_post, eps_post)
    g = proj("gate", mlp.gate_proj, x)
    u = proj("up", mlp.up_proj, x)
    return h + proj("down", mlp.down_proj, gated_activation(mlp.act_fn, g, u))
