"""Adapting the frozen layers around the recursion: plain LoRA on the coda (and the prelude's
tail, and the recurrent layer itself, one set shared by every step), and unfrozen coda norms.
A heal model (`heal_layers`) puts plain LoRA on every layer it keeps.

The recurrent block's low-rank paths are our own (SVD bases, modulated per step); the outer
layers get ordinary LoRA from the PEFT library, injected into their projection modules
(`peft.inject_adapter_in_model`; Phi-3's fused qkv_proj and gate_up_proj as they are). Our layer
forward calls each projection module, so PEFT's
wrapped `nn.Linear` adds its `(alpha/r) B A x` wherever the layer runs: training, cached
decoding, the Hugging Face wrapper, the other families' own forwards. PEFT initialises B to
zero, so a fresh adapter is exactly the model without LoRA. The LoRA weights are kept in
float32 (PEFT casts its input to them and the result back to the layer's dtype).

`coda_norms` trains the coda layers' RMSNorm weights and the final norm in place (they are the
base model's modules: a model built with it owns its copy of the base).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .projections import MODULE_NAMES, projection_linears

LORA_MODULES = MODULE_NAMES  # q_proj, ..., down_proj, and Phi-3's fused qkv_proj, gate_up_proj


def lora_target_pattern(layers: dict[str, list[int]], recurrent: bool = False) -> str | None:
    """A regular expression (PEFT's `target_modules`, matched against full module names) naming the
    projection modules of the given prelude / coda layers (and of the recurrent layer); None when
    there are none."""
    alts = [f"{part}\\.({'|'.join(map(str, idx))})" for part, idx in layers.items() if idx]
    alts += ["recurrent\\.layer"] if recurrent else []
    if not alts:
        return None
    return f"({'|'.join(alts)})\\.(self_attn|mlp)\\.({'|'.join(LORA_MODULES)})"


def inject_lora(model) -> None:
    """Wrap the targeted projections of the prelude / coda layers (and of the recurrent layer, shared
    by every step) with PEFT LoRA (float32 weights)."""
    config = model.config
    pattern = lora_target_pattern(config.lora_layers(), config.lora_on_recurrent_layer)
    if pattern is None:
        return
    from peft import LoraConfig, inject_adapter_in_model

    # only the frozen layers go in (PEFT freezes everything else it is handed: the recurrent block's own parts stay out)
    holder = nn.ModuleDict({"prelude": model.prelude, "coda": model.coda,
                            "recurrent": nn.ModuleDict({"layer": model.recurrent.layer})})
    peft_config = LoraConfig(r=config.coda_lora_rank, lora_alpha=config.coda_lora_alpha, lora_dropout=0.0,
                             target_modules=pattern, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed + 1)  # LoRA's A draws, reproducible and apart from the global RNG
        inject_adapter_in_model(peft_config, holder)
    for name, p in holder.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def layer_norms(layer: nn.Module) -> dict[str, nn.Module]:
    """A decoder layer's own RMSNorms (its direct children named *norm / *layernorm)."""
    return {name: m for name, m in layer.named_children() if name.endswith("norm") and hasattr(m, "weight")}


def norm_parameters(coda: nn.ModuleList, final_norm: nn.Module) -> dict[str, nn.Parameter]:
    """The coda layers' RMSNorm weights and the final norm's, by their names in `OuroborosModel`."""
    out = {f"coda.{i}.{name}.weight": m.weight for i, layer in enumerate(coda) for name, m in layer_norms(layer).items()}
    out["norm.weight"] = final_norm.weight
    return out


def adapted_parameters(model) -> dict[str, nn.Parameter]:
    """Every trainable parameter outside the recurrent block, by name: LoRA and unfrozen norms."""
    params = dict(model.named_parameters())
    out = {n: p for n, p in params.items() if ".lora_" in n and n.split(".")[0] in ("prelude", "coda", "recurrent")}
    if model.config.coda_norms:
        out.update(norm_parameters(model.coda, model.norm))
    return out


class BaseNorms(nn.Module):
    """Frozen copies of the norm weights that `coda_norms` trains, taken before training, so the
    pruned baseline (and anything asking for the unadapted stack) still sees the base's norms."""

    def __init__(self, norms: dict[str, nn.Parameter]):
        super().__init__()
        self.names = list(norms)
        for i, w in enumerate(norms.values()):
            self.register_buffer(f"w{i}", w.detach().clone())

    def originals(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"w{i}") for i, name in enumerate(self.names)}


def adapt_outer_layers(model) -> BaseNorms | None:
    """Apply the config's outer-layer adaptation to a freshly built (all frozen) model; returns the
    frozen copies of the norms it unfreezes (None without coda_norms)."""
    inject_lora(model)
    if not model.config.coda_norms:
        return None
    norms = norm_parameters(model.coda, model.norm)
    for p in norms.values():
        p.requires_grad_(True)
    return BaseNorms(norms)


def lora_layers_of(model) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    parts = (model.prelude, model.coda, model.recurrent.layer)
    return [m for part in parts for m in part.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adaptation_disabled(model):
    """The outer layers as the base has them, for the duration: PEFT's LoRA switched off
    (`enable_adapters`, trainable flags kept as they were) and the base's norm weights swapped in."""
    lora = lora_layers_of(model) if model.config.coda_lora_rank else []
    flags = {p: p.requires_grad for m in lora for p in m.parameters()}
    base_norms = model.base_norms.originals() if model.base_norms is not None else {}
    params = dict(model.named_parameters())
    trained = {name: params[name].data for name in base_norms}
    try:
        for m in lora:
            m.enable_adapters(False)
        for name, w in base_norms.items():
            params[name].data = w
        yield
    finally:
        for m in lora:
            m.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for name, w in trained.items():
            params[name].data = w


def adaptation_parameter_count(config, layer: nn.Module, hidden_size: int) -> int:
    """Parameters the outer-layer adaptation adds, from the settings and one layer's shapes."""
    n = 0
    if config.coda_lora_rank:
        per_layer = sum(config.coda_lora_rank * (lin.in_features + lin.out_features)
                        for lin in projection_linears(layer))
        n += per_layer * (sum(len(v) for v in config.lora_layers().values()) + config.lora_on_recurrent_layer)
    if config.coda_norms:
        n += (len(layer_norms(layer)) * config.n_coda + 1) * hidden_size
    return n


def matching_lora_rank(config, layer: nn.Module, hidden_size: int, budget: int) -> int:
    """The plain-LoRA rank (`coda_lora_rank`) at which `config`'s trained weights come closest to
    `budget` (e.g. a heal model with as many weights as a recursive one); at least 1."""
    per_rank = adaptation_parameter_count(config.replace(coda_lora_rank=1), layer, hidden_size)
    return max(1, round(budget / per_rank)) if per_rank else 1
