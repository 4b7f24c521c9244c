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

  .ouroboros-lm.json          our marker: every file the export wrote (`--overwrite` replaces only
                              a folder that holds it and nothing else)

The folder is written under a temporary name and renamed when complete; temporaries an export
that was killed left behind are removed by the next export to the same folder. `ExportConfig`
is `ouroboros export`'s settings.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .atomic import (check_removable, clean_temporaries, refuse_working_folder, remove_tree, replace_dir, temp_dir, temp_path, write_bytes,
                     write_marker, write_text)
from .adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter
from .config import OuroborosConfig
from .hf import OuroborosForCausalLM
from .loading import load_tokenizer
from .settings import REQUIRED, setting, validate_fields

MODELING_FILE = "modeling_ouroboros.py"
ADAPTER_SUBFOLDER = "adapter"
MODELING_SOURCE = '''"""Ouroboros recursive transformer (https://pypi.org/project/ouroboros-lm): loaded by
transformers with trust_remote_code=True. The code lives in the installed `ouroboros-lm` package;
this file only re-exports it. Install it with `pip install ouroboros-lm`."""
from ouroboros_lm.hf import OuroborosForCausalLM, OuroborosHFConfig  # noqa: F401
'''
AUTO_MAP = {"AutoConfig": "modeling_ouroboros.OuroborosHFConfig",
            "AutoModelForCausalLM": "modeling_ouroboros.OuroborosForCausalLM"}


@dataclass
class ExportConfig:
    """What `ouroboros export` writes: which adapter, where, and how the exported model runs."""

    adapter: str = setting(REQUIRED, "adapter folder")
    out: str = setting(REQUIRED, "folder to write (AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True))")
    depth: int | None = setting(None, "depth the exported model runs at (default: the adapter's default_depth; at "
                                "most its max_depth)", low=1)
    baseline: bool = setting(False, "export the pruned stack's behaviour instead of the recursion")
    overwrite: bool = setting(False, "replace a non-empty --out (only an earlier export of ours)")

    def __post_init__(self) -> None:
        validate_fields(self)


def check_out(out: Path, adapter: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded, an --out we must not replace: a link, the adapter's own
    folder (or one holding it), the working folder or an ancestor, or a non-empty folder that is not
    an earlier export of ours (`atomic.check_removable`)."""
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; refusing to write through it (nothing was changed)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder (nothing was changed)")
    refuse_working_folder(out)
    if out.resolve() == Path(adapter).resolve() or out.resolve() in Path(adapter).resolve().parents:
        raise ValueError(f"--out {out} is (or holds) the adapter folder {adapter}; export into a new folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it (nothing was changed)")
        check_removable(out, "export")


def write_folder(hf, tokenizer, adapter: Path, out: Path) -> Path:
    """The export's files into a temporary folder beside `out`, renamed over it once complete. Any
    failure while writing (a full disk, an interrupt) removes the temporary folder; `out` is then as it was."""
    clean_temporaries(out.parent if out.parent.is_dir() else Path("."), out.name)  # earlier exports killed mid-way
    tmp = temp_path(out)
    try:
        tmp = temp_dir(out)
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            write_bytes(tmp / ADAPTER_SUBFOLDER / name, (Path(adapter) / name).read_bytes(), under=tmp)
        write_text(tmp / MODELING_FILE, MODELING_SOURCE)
        write_marker(tmp, "export")
        return replace_dir(tmp, out, "export")
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors and torch report a full disk in their own types
        detail = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0][:200]
        raise OSError(getattr(e, "errno", None) or errno.EIO,
                      f"writing the export to {out} failed ({detail}); nothing was changed there") from None
    finally:
        if tmp.exists() or tmp.is_symlink():
            remove_tree(tmp, None, force=True)


def export_hf(adapter: str | os.PathLike, out: str | os.PathLike, depth: int | None = None, baseline: bool = False,
              overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Write the Hugging Face folder `out` for the adapter folder `adapter` (its base model is
    loaded from where the adapter records it). depth: the depth the exported model runs at
    (default: the adapter's default_depth); baseline=True exports the pruned stack's behaviour.
    An existing non-empty `out` is replaced only with overwrite=True and only if it is an export
    of ours (its marker file lists every file in it)."""
    out = Path(out)
    check_out(out, Path(adapter), overwrite)
    meta, _ = read_adapter(adapter)
    if depth is not None:
        OuroborosConfig.from_dict(meta["ouroboros_config"]).check_depth_flag(depth, "--depth")
    model = load_adapter(adapter, dtype=dtype)
    hf = OuroborosForCausalLM.from_ouroboros(model, depth=depth, baseline=baseline)
    hf.config.auto_map = dict(AUTO_MAP)
    return write_folder(hf, load_tokenizer(meta["base_model"]), Path(adapter), out)
