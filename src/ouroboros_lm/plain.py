"""A model in the base's own architecture: what a heal model (or a loop with nothing step-aware) is
once its LoRA is merged, for runtimes that know nothing of this package.

A heal model is the base's decoder with fewer layers and a low-rank update per projection. Merged
(W + (alpha/r) B A, by PEFT's own `merge`, in float64), it is a plain `LlamaForCausalLM` (or the
base's family) with `num_hidden_layers` = the kept layers: stock transformers, vLLM, TGI and
llama.cpp's converter load it. Every per-layer list of the base's configuration (Gemma 2/3 and
Qwen's `layer_types`, SmolLM3's `no_rope_layers`, ...) is re-indexed to the kept layers.

A loop is plain only when every step is the block's layers and nothing else: no Controller or
static modulation, no recurrence gate, no input injection, no anchored state scale, no damping at
the exported depth. Then it is written unrolled, the block's layers once per step (each copy with
its step's norms and, with per-step LoRA sets, its step's set merged in), `depth` copies on disk.
A runtime that shared the block's weights across steps would need to run a layer list with
repeats (llama.cpp: one tensor set mapped to several layer indices, each with its own KV cache),
which none of the stock runtimes do today.

`plain_layout` says what the plain stack is (or why there is none); `plain_state` builds its
configuration and weights; `export.export_plain` writes them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .families import step_norm_names
from .peft_lora import step_adapter
from .tuning import bake

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class PlainLayer:
    """One layer of the plain stack: the base layer it comes from (`index`), the module holding its
    weights (with PEFT LoRA if adapted), the LoRA set merged into it (None: none), the recurrence
    step whose per-step norms it takes (None: its own), and whether a tuned layer's deltas are added
    (False: the base's weights, the pruned baseline)."""

    index: int
    module: nn.Module
    lora: str | None
    step: int | None
    deltas: bool = True


def plain_obstacles(cfg, policy, depth: int | None, baseline: bool = False) -> list[str]:
    """What keeps a model of architecture `cfg` (an OuroborosConfig) and `policy` (its RecursionPolicy), run at
    `depth` (None: the policy's default), from being the base's own architecture, in words; [] when nothing does.
    A heal model and the pruned baseline always are. Needs no weights: export checks it before loading any."""
    if cfg.heal_layers or baseline:
        return []
    d = policy.default_depth if depth is None else depth
    later = d > 1 or cfg.loop_start == "gate"  # whether a step runs behind the gate / ReZero scale (a loop that
    # starts at its stack runs step 1 as the block itself, and the anchored scale acts from step 2 on)
    out = []
    if cfg.variant != "none":
        out.append(f"the {cfg.variant} modulation of the block (variant {cfg.variant!r}; plain needs 'none')")
    if cfg.gate and later:
        out.append("the recurrence gate (convert with --no-gate)")
    if cfg.loop_start == "rezero" and later:
        out.append("the ReZero scale of the steps after the first (loop_start rezero)")
    if cfg.injection != "none":
        out.append(f"input injection ({cfg.injection!r})")
    if cfg.state_scale != "free" and d > 1:
        out.append("the anchored state scale")
    if any(policy.update_scale(s) != 1.0 for s in range(d)):
        out.append(f"step damping {policy.step_damping} past trained_depth {policy.trained_depth} "
                   f"(export at depth <= {policy.trained_depth})")
    return out


def check_plain(cfg, policy, depth: int | None, baseline: bool = False) -> None:
    """ValueError, in one line naming every obstacle, unless the model is plain (`plain_obstacles`)."""
    reasons = plain_obstacles(cfg, policy, depth, baseline)
    if reasons:
        raise ValueError("a loop with " + "; ".join(reasons) + " is not the base's architecture: --format plain "
                         "cannot write it (--format ouroboros can, or --baseline for its pruned stack)")


def plain_layout(model, depth: int | None = None, baseline: bool = False) -> list[PlainLayer]:
    """The plain stack of `model` in the order its layers run: a heal model's kept layers; the pruned
    baseline's (nothing merged); or a loop unrolled to `depth` steps. ValueError naming every obstacle
    when the model is not plain (`plain_obstacles`)."""
    check_plain(model.config, model.policy, depth, baseline)
    cfg = model.config
    L = model.base_config.num_hidden_layers
    adapted = set()
    if cfg.lora_rank and not baseline:
        lora = cfg.lora_layers()
        adapted = {("prelude", i) for i in lora["prelude"]} | {("coda", i) for i in lora["coda"]}

    def outer(part: str, i: int) -> str | None:  # the LoRA set of a prelude / coda layer, if it has one
        return "default" if (part, i) in adapted else None

    if cfg.heal_layers:
        kept = cfg.kept_layers(L)
        mods = list(model.prelude) + [model.recurrent.layer] + list(model.coda)
        n_pre = len(model.prelude)
        parts = [("prelude", i) for i in range(n_pre)] + [("block", 0)] + [("coda", i) for i in range(len(model.coda))]
        block_lora = "default" if cfg.lora_on_recurrent_layer else None  # None: tuned in full (`tune_layers`)
        return [PlainLayer(k, m, None if baseline else (block_lora if part == "block" else outer(part, i)), None,
                           deltas=not baseline)
                for k, m, (part, i) in zip(kept, mods, parts)]
    prelude = [PlainLayer(k, m, outer("prelude", i), None)
               for i, (k, m) in enumerate(zip(cfg.prelude_layers(L), model.prelude))]
    coda = [PlainLayer(k, m, outer("coda", i), None) for i, (k, m) in enumerate(zip(cfg.coda_layers(L), model.coda))]
    block = list(zip(cfg.middle_layers(L), model.recurrent.layers))
    if baseline:
        return prelude + [PlainLayer(block[0][0], block[0][1], None, None)] + coda
    steps = []
    for s in range(model.resolve_depth(depth)):
        p = model.policy.parameter_step(s)
        lora = None
        if cfg.lora_on_recurrent_layer:
            lora = step_adapter(min(p, cfg.recurrent_lora_steps - 1))
        steps += [PlainLayer(k, m, lora, p if cfg.step_norm else None) for k, m in block]
    return prelude + steps + coda


def merged_layer(entry: PlainLayer, model, block_position: int) -> dict[str, torch.Tensor]:
    """The state dict of one plain layer, in float64: a copy of its module with its LoRA set merged
    (PEFT's `merge`) and the PEFT wrappers gone, a tuned layer's deltas added to its weights, and its step's
    norms in place of its own."""
    from peft.tuners.lora import LoraLayer

    layer = copy.deepcopy(entry.module).double()
    bake(layer, entry.deltas)  # a tuned layer's W + delta (`tune_layers`), in float64; W alone for the baseline
    if entry.lora is not None:
        for m in layer.modules():
            if isinstance(m, LoraLayer) and entry.lora in m.lora_A:
                m.merge(adapter_names=[entry.lora])
    if entry.step is not None:
        norms = model.recurrent.step_norms.weight[entry.step, 2 * block_position: 2 * block_position + 2]
        with torch.no_grad():
            for name, w in zip(step_norm_names(entry.module), norms):
                layer.get_submodule(name).weight.copy_(w.double())
    return {name.replace(".base_layer.", "."): t for name, t in layer.state_dict().items() if ".lora_" not in name}


def plain_config(base_config, indices: list[int], dtype: torch.dtype):
    """The base's configuration for the stack of base layers `indices` (in order, repeats for an
    unrolled loop): `num_hidden_layers` their count, every per-layer list re-indexed to them, the dtype
    the weights are saved in."""
    d = base_config.to_dict()
    n = base_config.num_hidden_layers
    for key, value in list(d.items()):
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n:
            d[key] = [value[i] for i in indices]
    if isinstance(d.get("max_window_layers"), int):  # Qwen2/3: the first max_window_layers layers use full attention
        d["max_window_layers"] = sum(i < d["max_window_layers"] for i in indices)
    for key in ("_name_or_path", "auto_map", "quantization_config", "transformers_version"):
        d.pop(key, None)
    d["num_hidden_layers"] = len(indices)
    d["dtype"] = str(dtype).removeprefix("torch.")
    cfg = type(base_config).from_dict(d)
    for key, value in d.items():  # a config class may derive a per-layer list itself: it must be the re-indexed one
        if "layer" in key and isinstance(value, list) and getattr(cfg, key, value) != value:
            raise ValueError(f"the {cfg.model_type} configuration rebuilt its {key} instead of taking the kept "
                             "layers': this family's plain export is not supported")
    return cfg


def plain_state(model, depth: int | None = None, baseline: bool = False, dtype: torch.dtype | None = None):
    """(configuration, state dict under Hugging Face's tensor names, in `dtype`) of `model`'s plain stack
    (`plain_layout`); dtype None: the base's (float32 when it records none). Tied embeddings write no head."""
    layout = plain_layout(model, depth, baseline)
    base_dtype = getattr(model.base_config, "dtype", None)
    if isinstance(base_dtype, str):
        base_dtype = DTYPES.get(base_dtype)
    dtype = dtype or (base_dtype if base_dtype in DTYPES.values() else torch.float32)
    config = plain_config(model.base_config, [e.index for e in layout], dtype)
    block_ids = [id(m) for m in model.recurrent.layers]
    state = {"model.embed_tokens.weight": model.embed_tokens.weight}
    for j, entry in enumerate(layout):
        pos = block_ids.index(id(entry.module)) if id(entry.module) in block_ids else 0
        for name, t in merged_layer(entry, model, pos).items():
            state[f"model.layers.{j}.{name}"] = t
    state.update({f"model.norm.{k}": v for k, v in model.norm.state_dict().items()})
    if not getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = model.lm_head.weight
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    check_names(config, state)
    return config, state


def check_names(config, state: dict) -> None:
    """The state dict's names are exactly what the family's own model class holds (built on the meta
    device: no memory), so `from_pretrained` finds every weight and nothing unexpected."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(config)
    want = set(ref.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        want.discard("lm_head.weight")
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        raise ValueError(f"the plain {config.model_type} weights do not match its model class (missing: "
                         f"{missing[:4]}, unexpected: {extra[:4]}): this family's plain export is not supported")

