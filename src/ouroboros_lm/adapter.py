"""Adapters, in the spirit of PEFT: what training produced, small and separate from the base.

A folder holds
  adapter_config.json        format version, the OuroborosConfig (architecture), the
                             RecursionPolicy (how it runs at inference), the base model's name or path,
                             a hash of the base's architecture, fingerprints of the kept layers'
                             weights, and the sha256 of the weights file
  adapter_model.safetensors  the trained weights and the frozen SVD bases (so loading never
                             recomputes the SVD)

Loading checks everything before building anything: a different base, a different layer
split, an incompatible format, or a corrupt or truncated file each fail with a message that
says which, and no half-loaded model is ever returned. Files are written atomically
(temporary file, fsync, rename).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .atomic import atomic_write_bytes, ensure_dir, open_regular, parse_json, read_json
from .peft_lora import adapted_parameters
from .config import OuroborosConfig
from .layers import attention_kind
from .loading import load_base_model
from .memory import free_bytes
from .model import OuroborosModel
from .policy import POLICY_FIELDS, RecursionPolicy, legacy_policy
from .settings import structural_fields
from .surgery import kept_fingerprints

FORMAT_VERSION = 1  # adapters of a model whose outer layers are not adapted (readable by every release)
OUTER_FORMAT_VERSION = 2  # with an outer-layer section (coda / prelude-tail LoRA, coda norms)
READABLE_VERSIONS = (FORMAT_VERSION, OUTER_FORMAT_VERSION)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Fields that change the shape or meaning of the saved weights; the rest may be overridden.
STRUCTURAL = structural_fields(OuroborosConfig)
SPLIT = ("n_prelude", "recurrent_layer", "n_coda", "keep_layers")
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps")


class AdapterError(ValueError):
    """An adapter that cannot be loaded onto this base; the message says why."""


def architecture(base_config) -> dict:
    return {k: getattr(base_config, k, None) for k in ARCH_FIELDS}


def architecture_hash(base_config) -> str:
    return hashlib.sha256(json.dumps(architecture(base_config), sort_keys=True, default=str).encode()).hexdigest()


GATE = "recurrent.gate."


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable parts' weights (float32; whether or not they are being trained right now, e.g.
    frozen while a halter trains) and the frozen SVD bases. The gate is stored as the spec writes
    it: W_g (H x 2H) whole, `recurrent.gate.proj.weight`, and `recurrent.gate.proj.bias`."""
    state = {f"recurrent.{part}.{n}": p.detach() for part, module in model.recurrent.trainable_parts().items()
             for n, p in module.named_parameters() if part != "gate"}
    if model.recurrent.gate is not None:
        state.update({GATE + k: v for k, v in model.recurrent.gate.joined().items()})
    for part in ("bases", "tail_bases"):  # the block's first layer's, then its further layers'
        if getattr(model.recurrent, part) is not None:
            for n, b in getattr(model.recurrent, part).named_buffers():
                state[f"recurrent.{part}.{n}"] = b.detach()
    # the outer-layer section: PEFT LoRA of the coda / prelude tail and the coda norms, under their model names
    state.update({n: p.detach() for n, p in adapted_parameters(model).items()})
    return {k: v.contiguous().cpu() for k, v in state.items()}


def recurrent_layer_record(model) -> dict:
    """What the adapter records of the recurrent layer (index, attention kind, window); with a block of
    several layers, the same for each of them under "block"."""
    rec = model.recurrent
    out = {"index": model.config.recurrent_layer, "kind": rec.kind, "window": rec.window}
    if len(rec.layers) > 1:
        out["block"] = [{"index": model.config.recurrent_layer + j, "kind": attention_kind(w), "window": w}
                        for j, w in enumerate(rec.windows)]
    return out


# ---------------------------------------------------------------------- save / load
def save_adapter(model: OuroborosModel, directory: str | os.PathLike) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (trained weights and the frozen
    SVD bases) to `directory`, atomically."""
    directory = ensure_dir(directory)
    from safetensors.torch import save

    version = OUTER_FORMAT_VERSION if model.config.adapts_outer_layers else FORMAT_VERSION
    blob = save(adapter_state_dict(model), metadata={"format": "pt", "ouroboros_format_version": str(version)})
    meta = {
        "format_version": version,
        "library": "ouroboros-lm",
        "ouroboros_config": model.config.to_dict(),
        "recursion_policy": model.policy.to_dict(),
        "base_model": model.base_name,
        "base_architecture": architecture(model.base_config),
        "base_architecture_hash": architecture_hash(model.base_config),
        "kept_weights_fingerprints": model.base_fingerprints,
        "recurrent_layer": recurrent_layer_record(model),  # informational
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "trainable_parameters": model.trainable_parameter_breakdown(),
    }
    # weights first, config last: the config names the weights' hash, so a save interrupted in
    # between is detected on load instead of pairing a new config with old weights.
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return directory


def copy_into(model, tensors: dict[str, torch.Tensor], trainable_only: bool = False) -> None:
    """Copy adapter tensors into the model's parameters and buffers of the same names
    (only its trainable parameters with trainable_only, as a resumed run does)."""
    targets = {n: p for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    if not trainable_only:
        targets.update(dict(model.named_buffers()))
    gate = model.recurrent.gate
    if gate is not None and GATE + "proj.weight" in tensors:
        gate.load_joined(tensors[GATE + "proj.weight"], tensors[GATE + "proj.bias"])
    with torch.no_grad():
        for k, t in tensors.items():
            if k in targets:
                targets[k].copy_(t.to(targets[k].dtype))


MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def read_weights(path: Path) -> bytes:
    """The bytes of a safetensors file, read only once its header accounts for its size exactly (the 8-byte
    length, the JSON header, then the tensors' data_offsets up to the last byte) and it fits the free memory: a
    truncated, padded or sparse file is refused without reading it whole. AdapterError naming the file."""
    try:
        f = open_regular(path, "adapter's weights")
    except ValueError as e:
        raise AdapterError(str(e)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 2 <= n <= min(MAX_HEADER, size - 8):
            raise AdapterError(f"{path} is corrupt or truncated: not a safetensors file ({size:,} bytes)")
        try:
            header = parse_json(f.read(n), str(path), "safetensors header")
            spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
            end = max((int(b) for _, b in spans), default=0)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise AdapterError(f"{path} is corrupt or truncated: its header is unreadable ({str(e)[:120]})") from None
        if 8 + n + end != size:
            raise AdapterError(f"{path} is corrupt or truncated: its header accounts for {8 + n + end:,} bytes, the "
                               f"file holds {size:,}")
        free = free_bytes(torch.device("cpu"))
        if free is not None and size > free:
            raise AdapterError(f"{path} is {size:,} bytes, more than the {free:,} of free memory it would be read into")
        f.seek(0)
        return f.read(size)


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors), fully validated against each other; raises AdapterError."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise AdapterError(f"adapter folder not found: {directory}")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterError(f"{p} is missing: {directory} is not a complete adapter (run `ouroboros convert` first)")
    try:
        meta = read_json(cfg_path, "adapter config")
    except ValueError as e:
        raise AdapterError(f"{e}: the adapter is corrupt") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, bool) or version not in READABLE_VERSIONS:  # true == 1 in Python, not in JSON
        raise AdapterError(
            f"{cfg_path} has format_version {version!r}; this ouroboros-lm reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (incompatible format version: a newer release wrote it?)"
        )
    for key, kind in (("base_model", str), ("weights_sha256", str), ("ouroboros_config", dict),
                      ("kept_weights_fingerprints", dict), ("base_architecture_hash", str)):
        if not isinstance(meta.get(key), kind):
            raise AdapterError(f"{cfg_path} is incomplete: {key!r} is missing or not a {kind.__name__}")
    blob = read_weights(w_path)
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise AdapterError(f"{w_path} is corrupt or truncated: its sha256 does not match {CONFIG_NAME}")
    try:
        from safetensors.torch import load

        tensors = load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure means corruption
        raise AdapterError(f"{w_path} is corrupt or truncated ({e})") from None
    try:
        config = OuroborosConfig.from_dict(meta["ouroboros_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{cfg_path} holds an invalid ouroboros_config: {e}") from None
    try:
        saved_policy(meta).check(config.max_depth)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{cfg_path} holds an invalid recursion_policy: {e}") from None
    return meta, tensors


def saved_policy(meta: dict) -> RecursionPolicy:
    """The adapter's RecursionPolicy; adapters written before it had its own block kept its fields
    in the architecture's dict."""
    if "recursion_policy" in meta:
        return RecursionPolicy.from_dict(meta["recursion_policy"])
    return legacy_policy(meta["ouroboros_config"])


def resolve_policy(meta: dict, overrides: dict, max_depth: int) -> RecursionPolicy:
    """The saved policy with the given (non-None) policy fields overridden."""
    changed = {k: v for k, v in overrides.items() if k in POLICY_FIELDS and v is not None}
    try:
        return saved_policy(meta).replace(**changed).check(max_depth)
    except ValueError as e:
        raise AdapterError(f"cannot run this adapter so: {e}") from None


def resolve_config(meta: dict, overrides: dict) -> OuroborosConfig:
    overrides = {k: v for k, v in overrides.items() if k not in POLICY_FIELDS}
    saved = OuroborosConfig.from_dict(meta["ouroboros_config"])
    changed = {k: v for k, v in overrides.items() if v is not None and getattr(saved, k) != v}
    split = {k: v for k, v in changed.items() if k in SPLIT}
    if split:
        have = ", ".join(f"{k}={getattr(saved, k)}" for k in SPLIT)
        want = ", ".join(f"{k}={v}" for k, v in split.items())
        raise AdapterError(f"different layer split: the adapter was made with {have}; asked for {want}")
    structural = {k: v for k, v in changed.items() if k in STRUCTURAL}
    if structural:
        raise AdapterError(
            "the adapter's weights were made with "
            + ", ".join(f"{k}={getattr(saved, k)!r}" for k in structural)
            + "; these cannot be changed on load (asked for "
            + ", ".join(f"{k}={v!r}" for k, v in structural.items())
            + ")"
        )
    return saved.replace(**changed) if changed else saved


def check_base(meta: dict, base, config: OuroborosConfig) -> dict[str, str]:
    """Raise AdapterError unless `base` is the model the adapter was made from."""
    want = meta.get("base_architecture", {})
    have = architecture(base.config)
    if architecture_hash(base.config) != meta.get("base_architecture_hash"):
        diffs = [f"{k}: adapter {want.get(k)!r} vs base {have.get(k)!r}" for k in ARCH_FIELDS if want.get(k) != have.get(k)]
        raise AdapterError(
            f"different base model: the adapter was made from {meta.get('base_model')!r}; the base given differs in "
            + ("; ".join(diffs) or "architecture")
        )
    fps = kept_fingerprints(base, config)
    saved = meta.get("kept_weights_fingerprints", {})
    if not isinstance(saved, dict) or set(saved) != set(fps):
        raise AdapterError(
            f"the adapter's layer split ({config.split_text()}) does not match the layers its fingerprints were recorded for "
            f"({', '.join(sorted(saved)) if isinstance(saved, dict) else saved!r}): the config was edited or is corrupt"
        )
    bad = [k for k in fps if saved.get(k) != fps[k]]
    if bad:
        raise AdapterError(
            f"different base model: the adapter was made from {meta.get('base_model')!r}, and the base given has "
            f"different weights in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
        )
    return fps


def load_adapter(directory, base=None, dtype=torch.float32, device=None, **overrides) -> OuroborosModel:
    """Rebuild a saved model on `base` (a model, a source string, or None for the base recorded
    in the adapter) bit for bit, without recomputing the SVD. `overrides` may change the
    policy (default_depth, step_damping) and the non-structural settings. Fails with AdapterError (a ValueError) on a
    different base, a different layer split, an incompatible format or a corrupt file, before
    anything is loaded."""
    meta, tensors = read_adapter(directory)
    config = resolve_config(meta, overrides)
    policy = resolve_policy(meta, overrides, config.max_depth)
    if base is None:
        base = meta["base_model"]
    if isinstance(base, (str, os.PathLike)):
        base = load_base_model(base, dtype=dtype, device=device)
    layers = base.config.num_hidden_layers
    try:  # the split against the base's layers, before any of them is indexed
        config.validate(layers)
    except ValueError as e:
        raise AdapterError(f"{Path(directory) / CONFIG_NAME}: its ouroboros_config does not fit the base's {layers} "
                           f"layers: {e} (the config was edited or is corrupt)") from None
    check_base(meta, base, config)
    model = OuroborosModel.from_base(base, config, compute_bases=False, base_name=meta.get("base_model"), policy=policy)
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"{Path(directory) / WEIGHTS_NAME} does not fit this configuration: "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, t in expected.items():
        if tuple(tensors[k].shape) != tuple(t.shape):
            raise AdapterError(f"{Path(directory) / WEIGHTS_NAME}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(t.shape)}")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterError(f"{Path(directory) / WEIGHTS_NAME} holds non-finite values (NaN or inf) in "
                           f"{', '.join(bad[:4])}: refusing to load it")
    copy_into(model, tensors)
    return model
