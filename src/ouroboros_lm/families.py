"""The decoder families Ouroboros converts, one table entry each, and the general path that runs
a family's layers through Hugging Face's own forward.

Llama, Qwen2/2.5, Qwen3 and Mistral run the layer that `layers.py` writes out (the fast path).
Every other family runs its own Hugging Face layer forward (`generic_decoder_layer`) with

* the seven projections computed by our hook (the recurrent layer's low-rank modulation), by
  overriding each projection module's forward for the duration of the call; a fused module
  (Phi-3's qkv_proj, gate_up_proj) computes its slices one target each and concatenates them;
* the per-step norms: the two norms that lead (Gemma 2/3, Granite, Phi-3) or close (OLMo 2, which
  has no pre-norms) the attention and MLP branches get the step's weights (`torch.func.functional_call`,
  so gradients reach them); the family's other norms (Gemma's post-norms, QK-norms) keep the layer's own;
* our KV cache: a `SlotCache` whose `update` appends to our `KVSlot`, whatever layer index the
  attention passes, so every recurrence step keeps its own keys and values;
* our masks (causal, padding, sliding window) as the additive masks HF attention expects, and the
  rotary table of the layer's kind (Gemma 3 has one for its local and one for its global layers).

So a decoder whose layers transformers runs with `(hidden, attention_mask, position_embeddings,
cache)` needs a `FAMILIES` entry and tests, not attention code. Family details: Gemma 2 has four
norms per layer (1 + w weights), attention-logit soft-capping, alternating sliding windows, scaled
embeddings and final-logit soft-capping; Gemma 3 adds QK-norm and a local and a global rotary table;
OLMo 2 normalises after each branch and normalises q and k over the whole projection; Granite scales
embeddings, residual branches, attention and logits; Phi-3 / Phi-4-mini fuse q/k/v and gate/up into
one matrix each and rotate part of each head; SmolLM3 skips the rotary embedding in every fourth
layer. This module imports nothing from the package.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

# The projection modules of a layer -> the targets (of the seven) each computes, in output order.
SEPARATE = {"self_attn.q_proj": ("q",), "self_attn.k_proj": ("k",), "self_attn.v_proj": ("v",),
            "self_attn.o_proj": ("o",), "mlp.gate_proj": ("gate",), "mlp.up_proj": ("up",), "mlp.down_proj": ("down",)}
FUSED = {"self_attn.qkv_proj": ("q", "k", "v"), "self_attn.o_proj": ("o",), "mlp.gate_up_proj": ("gate", "up"),
         "mlp.down_proj": ("down",)}
LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
GEMMA_NORMS = ("input_layernorm", "pre_feedforward_layernorm")


@dataclass(frozen=True)
class Family:
    """How one model_type's layers run. layer: its HF decoder layer class; step_norms: the two norms
    per-step norms replace (attention branch, MLP branch); own_forward: HF's own layer forward (the
    general path) rather than `layers.py`'s Llama layer; projections: its projection modules
    (`SEPARATE` or `FUSED`); llama_head: its final norm is Llama's RMSNorm and its logits are neither
    scaled nor capped, so the head may take the Llama head's memory-saving path (`OuroborosModel.head`)."""

    layer: str
    step_norms: tuple[str, str] = LLAMA_NORMS
    own_forward: bool = True
    projections: dict = field(default_factory=lambda: SEPARATE)
    llama_head: bool = False


FAMILIES = {
    "llama": Family("LlamaDecoderLayer", own_forward=False, llama_head=True),
    "qwen2": Family("Qwen2DecoderLayer", own_forward=False, llama_head=True),
    "qwen3": Family("Qwen3DecoderLayer", own_forward=False, llama_head=True),
    "mistral": Family("MistralDecoderLayer", own_forward=False, llama_head=True),
    "gemma2": Family("Gemma2DecoderLayer", GEMMA_NORMS),
    "gemma3_text": Family("Gemma3DecoderLayer", GEMMA_NORMS),
    "olmo2": Family("Olmo2DecoderLayer", ("post_attention_layernorm", "post_feedforward_layernorm")),
    "granite": Family("GraniteDecoderLayer"),
    "phi3": Family("Phi3DecoderLayer", projections=FUSED, llama_head=True),
    "smollm3": Family("SmolLM3DecoderLayer", llama_head=True),  # every 4th layer without rotary: an entry, no code
}
BY_LAYER = {f.layer: f for f in FAMILIES.values()}
LLAMA = FAMILIES["llama"]
# model_types whose final norm or logits differ from Llama's: the head runs their own norm, then `final_logits`
OWN_HEAD_TYPES = tuple(t for t, f in FAMILIES.items() if not f.llama_head)


def family_of(layer) -> Family:
    """The family of a decoder layer, by its class (unknown classes: the Llama layer)."""
    return BY_LAYER.get(type(layer).__name__, LLAMA)


def is_generic(layer) -> bool:
    return family_of(layer).own_forward


def step_norm_names(layer) -> tuple[str, str]:
    """The layer's two norms that per-step norms replace (Llama family: its two pre-norms)."""
    return family_of(layer).step_norms


def layer_kind(layer) -> str | None:
    """'sliding_attention' / 'full_attention' for families that mark their layers (Gemma 2/3), else None."""
    return getattr(layer.self_attn, "layer_type", None)


def rotary_tables(rotary_emb, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """{layer kind: (cos, sin)}: Gemma 3's rotary module holds one table per kind of layer (local
    layers a smaller base frequency); every other family one table, under None."""
    kinds = getattr(rotary_emb, "layer_types", None)
    if kinds is None:
        return {None: rotary_emb(hidden, position_ids)}
    return {k: rotary_emb(hidden, position_ids, k) for k in kinds}


def reset_rotary_tables(module) -> bool:
    """Recompute the per-kind tables of a Gemma 3 rotary module (non-persistent buffers, which a saved
    model does not hold and transformers' generic initialisation does not know); False for other modules."""
    kinds = getattr(module, "layer_types", None)
    if kinds is None or not isinstance(getattr(module, "rope_type", None), dict):
        return False
    from transformers import initialization
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for kind in kinds:
        rope_type = module.rope_type.get(kind, "default")
        fn = module.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
        inv_freq, _ = fn(module.config, layer_type=kind)
        initialization.copy_(getattr(module, f"{kind}_inv_freq"), inv_freq)
        initialization.copy_(getattr(module, f"{kind}_original_inv_freq"), inv_freq)
    return True


def submodule(layer, path: str):
    mod = layer
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def refusal(config, layer) -> str | None:
    """Why a base cannot be converted whatever its parts, in a few words; None when nothing rules it
    out (then what is missing, or the missing `FAMILIES` entry, is said)."""
    if getattr(config, "use_bidirectional_attention", False):
        return "its attention is bidirectional (an encoder such as EmbeddingGemma, not a causal decoder)"
    if getattr(config, "text_config", None) is not None:
        return "a multimodal wrapper (its text decoder is not extracted): convert a text-only model (e.g. gemma3_text)"
    if layer is not None and any(submodule(layer, p) is not None for p in ("mlp.experts", "block_sparse_moe", "mlp.router")):
        return ("its MLPs are mixtures of experts, and the recurrent layer's low-rank paths modulate one dense "
                "gate/up/down projection")
    if layer is not None and submodule(layer, "self_attn") is None:
        return "its layers have no self_attn (not a key/value attention decoder)"
    return None


def scale_embeddings(h: torch.Tensor, base_config) -> torch.Tensor:
    """Granite multiplies the token embeddings (Gemma's embedding module scales its own)."""
    m = getattr(base_config, "embedding_multiplier", None) if base_config.model_type == "granite" else None
    return h if m is None else h * m


def final_logits(logits: torch.Tensor, base_config) -> torch.Tensor:
    """Granite divides the logits by logits_scaling; Gemma 2 and 3 soft-cap them."""
    if base_config.model_type == "granite" and getattr(base_config, "logits_scaling", None):
        return logits / base_config.logits_scaling
    gemma = base_config.model_type in ("gemma2", "gemma3_text")
    cap = getattr(base_config, "final_logit_softcapping", None) if gemma else None
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


def hooked_forward(project, parts: list):
    """A projection module's forward computing `project(target, projection, x)` for its targets."""
    if len(parts) == 1:
        (target, proj), = parts
        return lambda x: project(target, proj, x)
    return lambda x: torch.cat([project(target, proj, x) for target, proj in parts], dim=-1)


@contextlib.contextmanager
def projections_through(layer, project, modules: dict[str, list]):
    """While inside, each projection module (path -> [(target, projection)], `layers.projection_modules`)
    computes its targets through `project` (a fused module: each slice, concatenated)."""
    hooked = []
    for path, parts in modules.items():
        mod = submodule(layer, path)
        mod.forward = hooked_forward(project, parts)
        hooked.append(mod)
    try:
        yield
    finally:
        for mod in hooked:
            del mod.forward  # back to nn.Linear.forward


def generic_decoder_layer(layer, h: torch.Tensor, ctx, *, window=None, project=None, norm_weights=None, kv=None,
                          modules: dict[str, list] | None = None) -> torch.Tensor:
    """Hugging Face's own forward of `layer` on h [B, T, H], with our projections, per-step norms,
    KV slot, masks and rotary table (see the module docstring); the arguments mean what they mean
    for `layers.decoder_layer`, and `modules` is the layer's `layers.projection_modules`."""
    params = {} if norm_weights is None else {f"{n}.weight": w for n, w in zip(step_norm_names(layer), norm_weights)}
    kwargs = dict(attention_mask=additive_mask(ctx, window, h),
                  position_embeddings=ctx.tables.get(layer_kind(layer), (ctx.cos, ctx.sin)),
                  cache=SlotCache(kv) if kv is not None else None, use_cache=kv is not None)
    hook = projections_through(layer, project, modules) if project is not None else contextlib.nullcontext()
    with hook:
        out = torch.func.functional_call(layer, params, (h,), kwargs) if params else layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out
