"""Ouroboros models as Hugging Face `transformers` models.

`OuroborosForCausalLM` (a `PreTrainedModel` and `GenerationMixin`) holds an `OuroborosModel` as
`.model` and delegates its forward to `OuroborosModel.forward`, so everything `transformers` offers
on top of a causal LM works on the recursion: `generate` (greedy, sampling, beam search,
streaming), `pipeline("text-generation")`, `save_pretrained` / `from_pretrained`, and the tools
built on them (lm-evaluation-harness). Its configuration, `OuroborosHFConfig` (model_type
"ouroboros"), records the `OuroborosConfig`, the full base model's configuration, and the depth
(or the pruned baseline) a loaded model runs at: `from_pretrained(dir, depth=4)` or
`from_pretrained(dir, baseline=True)` override them.

Cached decoding goes through our per-step cache: `OuroborosHFCache` is a `transformers.Cache`
that wraps an `OuroborosCache` (one KV slot per prelude layer, per recurrence step and per coda
layer, and each step's running prefix-mean pool). `generate` never builds a `DynamicCache` for
this model; the first cached forward creates the wrapper. Beam search reorders it with
`OuroborosCache.reorder`. A plain forward call without `use_cache=True` builds no cache (the
cheaper path lm-evaluation-harness's log-likelihoods take).

Both classes are registered with `AutoConfig` / `AutoModelForCausalLM` once `ouroboros_lm` is
imported (the model class lazily, see `hf_config.py`). `export.export_hf` writes a folder that loads with `trust_remote_code=True` in a process
that never imported `ouroboros_lm` itself.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import OuroborosCache
from .families import reset_rotary_tables
from .peft_lora import adapted_parameters
from .hf_config import OuroborosHFConfig, register_config
from .model import OuroborosModel
from .surgery import tensor_fingerprint

class OuroborosHFCache(Cache):
    """A `transformers.Cache` holding our per-step `OuroborosCache` (created by the first cached
    forward, which knows the depth). `get_seq_length`, beam reordering and batch expansion
    work; cropping (assisted decoding) does not."""

    def __init__(self, inner: OuroborosCache | None = None):
        super().__init__(layers=[])
        self.inner = inner

    def bind(self, model: OuroborosModel, depth: int | None, baseline: bool) -> OuroborosCache:
        if self.inner is None:
            self.inner = model.new_cache(depth, baseline=baseline)
        return self.inner

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.inner is None else self.inner.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.inner is not None:
            self.inner.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.inner is not None and self.inner.next_position is not None:
            rows = torch.arange(self.inner.next_position.shape[0], device=self.inner.next_position.device)
            self.inner.reorder(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("OuroborosHFCache cannot drop positions (assisted decoding is not supported)")

    def reset(self) -> None:
        self.inner = None

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.inner is not None

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # attention caches: generate slices new tokens by get_seq_length

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def batch_size(self) -> int:
        nxt = self.inner.next_position if self.inner is not None else None
        return -1 if nxt is None else int(nxt.shape[0])


def check_loaded(hf, info: dict) -> None:
    """Refuse an exported folder that loaded incompletely or with poisoned weights, as `load_adapter`
    refuses an adapter: every tensor present (transformers would re-initialise a missing one with a
    warning), all of them finite, and the embeddings and head the ones the base was fingerprinted with."""
    where = hf.config._name_or_path or "the exported model"
    missing = sorted(info.get("missing_keys") or [])
    if missing or info.get("mismatched_keys"):
        raise ValueError(f"{where}/model.safetensors does not fit its config.json: missing {missing[:3]}, "
                         f"mismatched {list(info.get('mismatched_keys') or [])[:3]}; refusing to load it")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:  # weights the config builds nothing for (fewer per-step LoRA sets than saved, ...): dropped
        raise ValueError(f"{where}/model.safetensors holds weights its config.json builds nothing for "
                         f"({', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}): the config was "
                         "edited; refusing to load it")
    bad = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{where}/model.safetensors holds non-finite values (NaN or inf) in {', '.join(bad[:4])}: "
                         "refusing to load it")
    m, fps = hf.model, hf.config.base_fingerprints
    for key, tensor in (("embed_tokens", m.embed_tokens.weight), ("lm_head", m.lm_head.weight)):
        if tensor_fingerprint({"w": tensor}) != fps.get(key):
            raise ValueError(f"{where}: the {key} weights are not those of the base its config.json records "
                             f"({hf.config.base_model!r}): the folder was edited or is corrupt")


class OuroborosForCausalLM(PreTrainedModel, GenerationMixin):
    """An `OuroborosModel` (`.model`) as a `transformers` causal LM. Build one around a model with
    `from_ouroboros(model)`; `OuroborosForCausalLM(config)` builds the architecture from the
    config (random base weights, zero SVD bases) for `from_pretrained` to fill."""

    config_class = OuroborosHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}  # only when the base ties them
    # the trained parts stay float32 whatever dtype the rest loads in, as with load_adapter(dtype=...)
    _keep_in_fp32_modules = ["recurrent.controller", "recurrent.static", "recurrent.gate", "recurrent.step_norms",
                             "recurrent.injection", "recurrent.state_scale", "recurrent.rezero"]

    def __init__(self, config: OuroborosHFConfig, model: OuroborosModel | None = None):
        super().__init__(config)
        if model is None:
            config.check()  # an exported folder's settings, refused before anything is built
            # the frozen weights in the dtype asked of from_pretrained (its default while building),
            # the trained parts in float32: what load_adapter(dtype=...) builds
            base = AutoModelForCausalLM.from_config(config.base_config(), dtype=torch.get_default_dtype())
            model = OuroborosModel.from_base(base, config.ouroboros_config(), compute_bases=False,
                                             base_name=config.base_model, policy=config.recursion_policy())
            model.base_fingerprints = dict(config.base_fingerprints)
            for part in model.recurrent.trainable_parts().values():
                part.float()
        self.model = model
        self.post_init()

    @classmethod
    def from_ouroboros(cls, model: OuroborosModel, depth: int | None = None, baseline: bool = False) -> "OuroborosForCausalLM":
        """Wrap `model` (shared, not copied)."""
        config = OuroborosHFConfig(ouroboros=model.config.to_dict(), policy=model.policy.to_dict(),
                                   base=model.base_config.to_dict(),
                                   base_model=model.base_name, base_fingerprints=model.base_fingerprints,
                                   depth=depth, baseline=baseline, architectures=[cls.__name__])
        return cls(config, model=model).eval()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "OuroborosForCausalLM":
        """`PreTrainedModel.from_pretrained`, then only the trainable parts require gradients again
        (loading replaces every parameter with one that does)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_loaded(model, info)
        model.model.requires_grad_(False)
        for part in model.model.recurrent.trainable_parts().values():
            part.requires_grad_(True)
        for p in adapted_parameters(model.model).values():  # coda / prelude-tail LoRA, coda norms
            p.requires_grad_(True)
        return (model, info) if want_info else model

    def _init_weights(self, module):
        # Everything of ours is initialised by OuroborosModel (zero Controller head, gate bias...) or
        # loaded; only non-persistent buffers (rotary tables, Gemma's embedding scale) need
        # transformers' initialisation.
        if "RotaryEmbedding" in type(module).__name__:
            if not reset_rotary_tables(module):  # Gemma 3's table per layer kind, else transformers' own
                super()._init_weights(module)
        elif hasattr(module, "scalar_embed_scale") and isinstance(getattr(module, "embed_scale", None), torch.Tensor):
            from transformers import initialization

            initialization.constant_(module.embed_scale, module.scalar_embed_scale)  # Gemma's scaled embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our forward makes its own cache (OuroborosHFCache)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, depth: int | None = None,
                baseline: bool | None = None, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """`OuroborosModel.forward` at `depth` (default: the config's), or the pruned stack with
        `baseline=True`. position_ids are ignored: positions come from the attention mask (and the
        cache), as `OuroborosModel` computes them. With `use_cache=True` (generate passes it) or a
        cache, the new positions are appended to an `OuroborosHFCache`, returned as `.cache`."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("OuroborosForCausalLM takes input_ids (inputs_embeds are not supported)")
        baseline = self.config.baseline if baseline is None else baseline
        depth = None if baseline else (depth if depth is not None else self.config.depth)
        cache = self.own_cache(cache if cache is not None else past_key_values, use_cache)
        inner = cache.bind(self.model, self.model.resolve_depth(depth) if not baseline else None, baseline) \
            if cache is not None else None
        if attention_mask is not None:
            if inner is not None:
                attention_mask = attention_mask[:, -input_ids.shape[1]:]  # generate passes the mask of every position
            elif bool(attention_mask.all()):
                attention_mask = None  # no padding: the plain causal path
        out = self.model(input_ids, attention_mask=attention_mask, labels=labels, depth=depth, cache=inner, baseline=baseline)
        logits = out.logits[:, -logits_to_keep:] if isinstance(logits_to_keep, int) and logits_to_keep > 0 else out.logits
        return CausalLMOutputWithPast(loss=out.loss, logits=logits, cache=cache)

    @staticmethod
    def own_cache(cache, use_cache: bool | None) -> OuroborosHFCache | None:
        """The cache to extend: ours as given, a new one for use_cache=True, an empty foreign
        cache replaced; a non-empty foreign cache is refused (it cannot hold per-step states)."""
        if cache is None or isinstance(cache, OuroborosHFCache):
            return cache if cache is not None or not use_cache else OuroborosHFCache()
        if cache.get_seq_length() == 0:
            return OuroborosHFCache()
        raise ValueError(f"OuroborosForCausalLM needs an OuroborosHFCache (per-step keys, values and pools); "
                         f"got a {type(cache).__name__} that already holds positions")


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type "ouroboros" (`import ouroboros_lm`
    registers the config at once and this on the first OuroborosHFConfig; importing this module
    registers both)."""
    register_config()
    AutoModelForCausalLM.register(OuroborosHFConfig, OuroborosForCausalLM, exist_ok=True)


register()
