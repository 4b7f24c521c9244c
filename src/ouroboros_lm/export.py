"""`ouroboros export`: an adapter as a Hugging Face model folder.

The folder loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` in
any process where the `ouroboros-lm` package is installed (the modeling file it holds only
imports `ouroboros_lm.hf`), and with plain `from_pretrained(folder)` once `ouroboros_lm` is
imported. It holds

  config.json                 OuroborosHFConfig (model_type "ouroboros", auto_map, the
                              OuroborosConfig, the full base config, the depth it runs at)
  model.safetensors           the weights the model USES: embeddings, the P + 1 + C kept base
                              layers, final norm and head, plus the trained parts and the frozen
                              SVD bases. The removed layers are not stored (they are never run),
                              so the folder is self-contained and smaller than the base model.
  generation_config.json
  modeling_ouroboros.py       `from ouroboros_lm.hf import ...` (what trust_remote_code runs)
  tokenizer files             the base model's tokenizer
  adapter/                    our adapter, unchanged: `load_adapter(folder / "adapter", base=...)`
                              still works on the full base (e.g. to compare with the full model).
                              In a subfolder: transformers takes an `adapter_config.json` at the
                              top of a model folder for a PEFT adapter whenever peft is installed.

The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter
from .config import OuroborosConfig
from .hf import OuroborosForCausalLM
from .loading import load_tokenizer

MODELING_FILE = "modeling_ouroboros.py"
ADAPTER_SUBFOLDER = "adapter"
MODELING_SOURCE = '''"""Ouroboros recursive transformer (https://pypi.org/project/ouroboros-lm): loaded by
transformers with trust_remote_code=True. The code lives in the installed `ouroboros-lm` package;
this file only re-exports it. Install it with `pip install ouroboros-lm`."""
from ouroboros_lm.hf import OuroborosForCausalLM, OuroborosHFConfig  # noqa: F401
'''
AUTO_MAP = {"AutoConfig": "modeling_ouroboros.OuroborosHFConfig",
            "AutoModelForCausalLM": "modeling_ouroboros.OuroborosForCausalLM"}


def export_hf(adapter: str | os.PathLike, out: str | os.PathLike, depth: int | None = None, baseline: bool = False,
              overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Write the Hugging Face folder `out` for the adapter folder `adapter` (its base model is
    loaded from where the adapter records it). depth: the depth the exported model runs at
    (default: the adapter's default_depth); baseline=True exports the pruned stack's behaviour."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it (nothing was changed)")
    meta, _ = read_adapter(adapter)
    if depth is not None:
        OuroborosConfig.from_dict(meta["ouroboros_config"]).check_depth(depth, "--depth")
    model = load_adapter(adapter, dtype=dtype)
    hf = OuroborosForCausalLM.from_ouroboros(model, depth=depth, baseline=baseline)
    hf.config.auto_map = dict(AUTO_MAP)
    tokenizer = load_tokenizer(meta["base_model"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_SUBFOLDER).mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(Path(adapter) / name, tmp / ADAPTER_SUBFOLDER / name)
        (tmp / MODELING_FILE).write_text(MODELING_SOURCE)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
