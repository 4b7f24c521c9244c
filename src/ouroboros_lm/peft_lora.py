"""Plain LoRA (PEFT) on the frozen layers around the recursion: the coda (and the prelude's
tail, and the recurrent layer itself: one set shared by every step, or, with `recurrent_lora_steps`,
one set per step, PEFT adapters "default", "step1", ... of the same modules, each step's chosen by
the block through a projection hook, `step_adapter_projection`).
A heal model (`heal_layers`) puts plain LoRA on every layer it keeps.

The recurrent block's low-rank paths are our own (SVD bases, modulated per step); the outer
layers get ordinary LoRA from the PEFT library, injected into their projection modules
(`peft.inject_adapter_in_model`; Phi-3's fused qkv_proj and gate_up_proj as they are). Our layer
forward calls each projection module, so PEFT's
wrapped `nn.Linear` adds its `(alpha/r) B A x` wherever the layer runs: training, cached
decoding, the Hugging Face wrapper, the other families' own forwards. PEFT initialises B to
zero, so a fresh adapter is exactly the model without LoRA. The LoRA weights are kept in
float32 (PEFT casts its input to them and the result back to the layer's dtype).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .projections import MODULE_NAMES, ProjectionSlice, projection_linears
from .tuning import deltas_disabled, tuned_parameters

LORA_MODULES = MODULE_NAMES  # q_proj, ..., down_proj, and Phi-3's fused qkv_proj, gate_up_proj


def lora_target_pattern(layers: dict[str, list[int]], recurrent: bool = False) -> str | None:
    """A regular expression (PEFT's `target_modules`, matched against full module names) naming the
    projection modules of the given prelude / coda layers (and of the recurrent layer); None when
    there are none."""
    alts = [f"{part}\\.({'|'.join(map(str, idx))})" for part, idx in layers.items() if idx]
    alts += ["recurrent\\.(layer|tail_layers\\.\\d+)"] if recurrent else []
    if not alts:
        return None
    return f"({'|'.join(alts)})\\.(self_attn|mlp)\\.({'|'.join(LORA_MODULES)})"


def inject_lora(model) -> None:
    """Wrap the targeted projections of the prelude / coda layers (and of the recurrent layer: one set shared
    by every step, or `recurrent_lora_steps` sets) with PEFT LoRA (float32 weights)."""
    config = model.config
    pattern = lora_target_pattern(config.lora_layers(), config.lora_on_recurrent_layer)
    if pattern is None:
        return
    from peft import LoraConfig, inject_adapter_in_model

    # only the frozen layers go in (PEFT freezes everything else it is handed: the recurrent block's own parts stay out)
    holder = nn.ModuleDict({"prelude": model.prelude, "coda": model.coda,
                            "recurrent": nn.ModuleDict({"layer": model.recurrent.layer,
                                                        "tail_layers": model.recurrent.tail_layers})})
    def lora_config(target_modules: str) -> LoraConfig:
        ranks = layer_rank_pattern(config)
        scale = config.lora_alpha / config.lora_rank
        return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=target_modules, bias="none", rank_pattern=ranks,
                          alpha_pattern={k: r * scale for k, r in ranks.items()})

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed + 1)  # LoRA's A draws, reproducible and apart from the global RNG
        inject_adapter_in_model(lora_config(pattern), holder)
        # the other steps' sets: more adapters on the block's modules alone (PEFT makes the adapter it adds the active
        # one of every LoRA layer it is handed); "default" is made active again (the block picks each step's set itself)
        block = nn.ModuleDict({"recurrent": holder["recurrent"]})
        for i in range(1, config.recurrent_lora_steps):
            torch.manual_seed(config.init_seed + 1 + i)
            with warnings.catch_warnings():  # "multiple adapters in the model": what is meant here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(lora_config(lora_target_pattern({}, recurrent=True)), block,
                                        adapter_name=step_adapter(i))
        if config.recurrent_lora_steps > 1:
            from peft.tuners.lora import LoraLayer

            for m in block.modules():
                if isinstance(m, LoraLayer):
                    m.set_adapter(step_adapter(0))
    for name, p in holder.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def layer_rank_pattern(config) -> dict[str, int]:
    """PEFT's `rank_pattern` for a heal model's per-layer ranks (`lora_ranks`): a pattern naming each kept layer's
    projections whose rank differs from lora_rank, and its rank ({} when they all have it)."""
    if config.lora_ranks is None:
        return {}
    layers = config.lora_layers()
    where = [(f"prelude\\.{i}", config.lora_rank_of("prelude", i)) for i in layers["prelude"]]
    where += [(f"coda\\.{i}", config.lora_rank_of("coda", i)) for i in layers["coda"]]
    if config.lora_on_recurrent_layer:
        where.append(("recurrent\\.layer", config.lora_rank_of("block")))
    return {f"{name}\\.(self_attn|mlp)\\.({'|'.join(LORA_MODULES)})": r for name, r in where if r != config.lora_rank}


def step_adapter(i: int) -> str:
    """The PEFT adapter name of the recurrent block's i-th plain-LoRA set (set 0 is PEFT's "default": the one set
    when every step shares it)."""
    return "default" if i == 0 else f"step{i}"


def plain_lora_delta(wrapped: nn.Module, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor | float:
    """What a PEFT LoRA layer adds to its frozen projection: scaling * B A x summed over its active adapters, or
    `adapter`'s alone, as PEFT's own forward computes it (0 when its adapters are switched off). For a slice of a
    fused module (Phi-3, `projections.ProjectionSlice`): its rows of the fused module's update."""
    if isinstance(wrapped, ProjectionSlice):
        delta = plain_lora_delta(wrapped.linear, x, adapter)
        return delta if isinstance(delta, float) else wrapped.rows(delta)
    if wrapped.disable_adapters or wrapped.merged:
        return 0.0
    out = 0.0
    for name in wrapped.active_adapters if adapter is None else [adapter]:
        if name in wrapped.lora_A:
            A = wrapped.lora_A[name]
            out = out + wrapped.lora_B[name](A(x.to(A.weight.dtype))) * wrapped.scaling[name]
    return out


def step_adapter_projection(adapter: str):
    """A projection hook (`layers.ProjectFn`) for a recurrence step with its own plain-LoRA set: each frozen
    projection plus that set's update alone."""
    def project(target: str, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        base = getattr(linear, "base_layer", linear)
        out = base(x)
        return out if base is linear else out + plain_lora_delta(linear, x, adapter).to(out.dtype)
    return project


def adapted_parameters(model) -> dict[str, nn.Parameter]:
    """Every trainable parameter outside the recurrent block's own parts, by name: the PEFT LoRA, and a heal
    model's tuned layers' deltas (`tuning`)."""
    params = dict(model.named_parameters())
    lora = {n: p for n, p in params.items() if ".lora_" in n and n.split(".")[0] in ("prelude", "coda", "recurrent")}
    return {**lora, **tuned_parameters(model)}


def lora_layers_of(model) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    parts = (model.prelude, model.coda, model.recurrent.layer, model.recurrent.tail_layers)
    return [m for part in parts for m in part.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adaptation_disabled(model):
    """The outer layers as the base has them, for the duration: PEFT's LoRA switched off
    (`enable_adapters`, trainable flags kept as they were), and the tuned layers' deltas."""
    lora = lora_layers_of(model) if model.config.lora_rank else []
    flags = {p: p.requires_grad for m in lora for p in m.parameters()}
    try:
        for m in lora:
            m.enable_adapters(False)
        with deltas_disabled(model):
            yield
    finally:
        for m in lora:
            m.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def adaptation_parameter_count(config, layer: nn.Module, hidden_size: int) -> int:
    """Parameters the outer-layer adaptation adds, from the settings and one layer's shapes."""
    n = 0
    if config.lora_rank:
        per_rank = sum(lin.in_features + lin.out_features for lin in projection_linears(layer))
        layers = config.lora_layers()
        ranks = [config.lora_rank_of(part, i) for part in ("prelude", "coda") for i in layers[part]]
        if config.lora_on_recurrent_layer:
            ranks += [config.lora_rank_of("block")] * (config.block_layers * config.recurrent_lora_steps)
        n += per_rank * sum(ranks)
    return n


def matching_lora_rank(config, layer: nn.Module, hidden_size: int, budget: int) -> int:
    """The plain-LoRA rank (`lora_rank`) at which `config`'s trained weights come closest to
    `budget` (e.g. a heal model with as many weights as a recursive one); at least 1."""
    per_rank = adaptation_parameter_count(config.replace(lora_rank=1), layer, hidden_size)
    return max(1, round(budget / per_rank)) if per_rank else 1
