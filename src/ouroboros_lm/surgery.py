"""Surgery on a pretrained decoder (the families of `families.FAMILIES`): keep prelude, recurrent layer and coda
(the first and last layers, or any kept layers the config lists: `OuroborosConfig.keep_layers`),
factor the removed layers into SVD bases, drop the rest; fingerprints of what is kept (so an
adapter can tell whether a base model is the one it was made from)."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .config import TARGETS, OuroborosConfig
from .families import FAMILIES, Family, refusal, submodule
from .projections import get_projection
from .svd_bases import SVDBases

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def missing_parts(base: nn.Module, family: Family) -> list[str]:
    """What `base` lacks of a decoder Ouroboros can convert: model.embed_tokens, model.layers[*] with
    the family's projection modules and step norms (the Llama layer: and mlp.act_fn), model.norm,
    model.rotary_emb, lm_head."""
    inner = getattr(base, "model", None)
    missing = [f"model.{a}" for a in ("embed_tokens", "layers", "norm", "rotary_emb") if inner is None or not hasattr(inner, a)]
    if not hasattr(base, "lm_head"):
        missing.append("lm_head")
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is not None and len(layers) > 0:
        extra = [] if family.own_forward else ["mlp.act_fn"]
        missing += [f"model.layers[i].{p}" for p in list(family.projections) + list(family.step_norms) + extra
                    if submodule(layers[0], p) is None]
    return missing


def unsupported_reason(base: nn.Module) -> str | None:
    """Why `base` cannot be converted (ruled out whatever its parts, a layer class its table entry does
    not run, parts missing, no `families.FAMILIES` entry), or None."""
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    layers = getattr(getattr(base, "model", None), "layers", None)
    layer = layers[0] if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None
    family = FAMILIES.get(model_type)
    if (why := refusal(config, layer)) is not None:
        return why
    if family is not None and family.own_forward and layer is not None and type(layer).__name__ != family.layer:
        return f"its layers are {type(layer).__name__}, not the {family.layer} its families.FAMILIES entry runs"
    if missing := missing_parts(base, family or FAMILIES["llama"]):
        return f"missing {', '.join(missing)}"
    if family is None:
        return (f"model_type {model_type!r} has no entry in families.FAMILIES (a decoder whose layers transformers "
                "runs needs one, and tests)")
    return None


def check_architecture(base: nn.Module) -> None:
    """Raise ValueError naming the architecture and why it cannot be converted, in one line, unless
    it is a supported decoder."""
    why = unsupported_reason(base)
    if why is not None:
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        raise ValueError(f"unsupported architecture {type(base).__name__} (model_type={model_type!r}): {why}. "
                         f"Ouroboros supports these decoders: {', '.join(SUPPORTED_MODEL_TYPES)}.")


def split_layers(base: nn.Module, config: OuroborosConfig, compute_bases: bool = True):
    """Compute the SVD bases from the removed layers, then delete the removed layers from the
    base model to free their memory. The caller (`OuroborosModel.from_base`) has already run
    `check_architecture` and `config.validate(num_layers=...)`.

    compute_bases=False allocates the bases without factoring anything (an adapter's saved
    bases are about to be loaded into them).
    The recurrent block is `config.block_layers` consecutive layers; each has its own bases, from
    the mean residual of the removed layers against it.
    A heal model (`config.heal_layers`) has no bases; its middle layers but the last run as the
    prelude's tail, the last in the recurrent layer's place (once, `OuroborosModel.forward`).
    Returns (prelude layers, the recurrent block's layers, coda layers, one SVDBases per block layer
    or None).
    """
    layers = base.model.layers
    L = len(layers)
    removed_idx = config.removed_layers(L)
    middle = [layers[i] for i in config.middle_layers(L)]
    block = middle[-1:] if config.heal_layers else middle  # a heal model's last middle layer, run once
    bases = None
    if config.variant != "none" and not config.heal_layers:
        if not removed_idx:
            raise ValueError(
                f"variant={config.variant!r} needs removed layers to build the SVD bases, but the split keeps all "
                f"{L} layers; drop some layers or use variant='none'"
            )
        limit = min(min(get_projection(layer, t).weight.shape) for layer in block for t in TARGETS)
        if config.rank > limit:
            raise ValueError(f"rank must be in [1, {limit}] (the smallest side of the recurrent layer's projections); got {config.rank}")
        removed = [layers[i] for i in removed_idx] if compute_bases else None
        with torch.no_grad():
            bases = [SVDBases.from_layers(layer, removed, config.rank, config.alpha) for layer in block]
    prelude = [layers[i] for i in config.prelude_layers(L)] + (middle[:-1] if config.heal_layers else [])
    coda = [layers[i] for i in config.coda_layers(L)]
    # Free the removed layers: the base model keeps only what we use.
    base.model.layers = nn.ModuleList(prelude + block + coda)
    base.config.num_hidden_layers = len(base.model.layers)
    return prelude, block, coda, bases


def tensor_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, shapes and a strided sample of values rounded to bfloat16, so the same
    weights loaded in fp32 or bf16 give the same fingerprint."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        if t.is_meta:
            continue
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        h.update(sample.to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def kept_fingerprints(base: nn.Module, config: OuroborosConfig) -> dict[str, str]:
    """Fingerprints of what an Ouroboros model keeps from `base` (before surgery): each kept
    layer under its index in the base, the embeddings, the final norm and the head."""
    return part_fingerprints(base, config.kept_layers(len(base.model.layers)))


def part_fingerprints(base: nn.Module, layers) -> dict[str, str]:
    """Fingerprints of layers `layers` of `base` (under their index), its embeddings, final norm and head."""
    out = {f"layer.{i}": tensor_fingerprint(dict(base.model.layers[i].named_parameters())) for i in layers}
    out["embed_tokens"] = tensor_fingerprint({"w": base.model.embed_tokens.weight})
    out["norm"] = tensor_fingerprint(dict(base.model.norm.named_parameters()))
    out["lm_head"] = tensor_fingerprint({"w": base.lm_head.weight})
    return out
