"""`ouroboros export`: an adapter as a model other programs load, in one of three formats.

--format plain (heal models, the pruned baseline, and loops with nothing step-aware, unrolled): the
base family's own model folder (`plain.py`): config.json of the base's model_type with the kept
layers, the LoRA merged into the weights, HF's tensor names, the tokenizer and generation config,
and no file of ours but the marker. Stock `AutoModelForCausalLM.from_pretrained(folder)` loads it
without this package; vLLM, TGI and llama.cpp's converter read it.

--format gguf: that plain folder through llama.cpp's own converter (`convert_hf_to_gguf.py`, from a
llama.cpp source tree: `--llama-cpp DIR`, $LLAMA_CPP_DIR, or the cache's `llama.cpp/` that
`make llama-cpp` extracts from the llama-cpp-python source package), one .gguf file.

--format ouroboros (the default; every model): our own model type. The folder loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` in
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

from .atomic import (check_removable, clean_temporaries, read_json, refuse_working_folder, remove_tree, replace_dir,
                     replace_file, temp_dir, temp_path, write_bytes, write_marker, write_text)
from .adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter, saved_policy
from .config import OuroborosConfig
from .hf import OuroborosForCausalLM
from .loading import cache_dir, load_tokenizer, resolve_source
from .plain import DTYPES, check_plain, plain_state
from .settings import REQUIRED, setting, validate_fields

MODELING_FILE = "modeling_ouroboros.py"
ADAPTER_SUBFOLDER = "adapter"
MODELING_SOURCE = '''"""Ouroboros recursive transformer (https://pypi.org/project/ouroboros-lm): loaded by
transformers with trust_remote_code=True. The code lives in the installed `ouroboros-lm` package;
this file only re-exports it. Install it with `pip install ouroboros-lm`."""
from ouroboros_lm.hf import OuroborosForCausalLM, OuroborosHFConfig  # noqa: F401
'''
FORMATS = ("ouroboros", "plain", "gguf")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
CONVERTER = "convert_hf_to_gguf.py"
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
    overwrite: bool = setting(False, "replace a non-empty --out (only an earlier export of ours; a .gguf: only a GGUF "
                              "file)")
    format: str = setting("ouroboros", "ouroboros: our model type (every model; loads with this package or "
                          "trust_remote_code); plain: the base family's own model, LoRA merged, kept layers only (heal "
                          "models, --baseline, loops without gate, injection or modulation: unrolled), for stock "
                          "transformers, vLLM, llama.cpp's converter; gguf: that plain model as one llama.cpp file "
                          "(--out NAME.gguf)", choices=FORMATS)
    dtype: str | None = setting(None, "plain / gguf: the dtype the merged weights are saved in (merged in float64; "
                                "default: the base's)", choices=tuple(DTYPES))
    outtype: str = setting("f16", "gguf: llama.cpp's tensor type (f32 keeps the weights exactly)", choices=OUTTYPES)
    llama_cpp: str | None = setting(None, "gguf: a llama.cpp source tree holding convert_hf_to_gguf.py (default: "
                                    "$LLAMA_CPP_DIR, then the cache's llama.cpp/, which `make llama-cpp` fills)",
                                    metavar="DIR")

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


def write_folder(write_files, out: Path) -> Path:
    """`write_files(tmp)` into a temporary folder beside `out`, then the marker, renamed over `out` once
    complete. Any failure while writing (a full disk, an interrupt) removes the temporary folder; `out` is
    then as it was."""
    clean_temporaries(out.parent if out.parent.is_dir() else Path("."), out.name)  # earlier exports killed mid-way
    tmp = temp_path(out)
    try:
        tmp = temp_dir(out)
        write_files(tmp)
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
    tokenizer = load_tokenizer(meta["base_model"])

    def write_files(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            write_bytes(tmp / ADAPTER_SUBFOLDER / name, (Path(adapter) / name).read_bytes(), under=tmp)
        write_text(tmp / MODELING_FILE, MODELING_SOURCE)

    return write_folder(write_files, out)



def check_plain_request(adapter: str | os.PathLike, depth: int | None, baseline: bool) -> None:
    """Refuse, from the adapter's config alone (no weights loaded), a --format plain / gguf export that cannot be
    the base's architecture (`plain.check_plain`), and --depth on a heal model (it runs its layers once)."""
    meta, _ = read_adapter(adapter)
    cfg = OuroborosConfig.from_dict(meta["ouroboros_config"])
    if depth is not None:
        cfg.check_depth_flag(depth, "--depth")
    check_plain(cfg, saved_policy(meta), depth, baseline)


def base_generation_config(base: str, config):
    """The base model's generation config (its folder's, or its hub id's when online); from the model
    config when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(resolve_source(base))
    except (OSError, ValueError):
        return GenerationConfig.from_model_config(config)


def export_plain(adapter: str | os.PathLike, out: str | os.PathLike, depth: int | None = None, baseline: bool = False,
                 overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write `out`: the adapter's model as the base family's own Hugging Face model (`plain.py`), loadable with
    stock `AutoModelForCausalLM.from_pretrained(out)` without this package. Refused before anything is
    loaded for a model that is not plain (a loop with a gate, injection, modulation...)."""
    out = Path(out)
    check_out(out, Path(adapter), overwrite)
    check_plain_request(adapter, depth, baseline)
    return write_plain(load_adapter(adapter), out, depth, baseline, dtype)


def write_plain(model, out: str | os.PathLike, depth: int | None = None, baseline: bool = False,
                dtype: torch.dtype | None = None) -> Path:
    """`model` (an OuroborosModel in memory) written to `out` as the base family's own model, with the tokenizer
    and generation config of the base it records (`export_plain` checks `out` and the request first)."""
    config, state = plain_state(model, depth, baseline, dtype)
    tokenizer = load_tokenizer(model.base_name)
    generation = base_generation_config(model.base_name, config)
    config.architectures = [type_name(config)]

    def write_files(tmp: Path) -> None:
        from huggingface_hub import save_torch_state_dict

        config.save_pretrained(tmp)
        save_torch_state_dict(state, tmp, metadata={"format": "pt"})
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder(write_files, Path(out))


def type_name(config) -> str:
    """The family's causal-LM class name (LlamaForCausalLM, ...), as transformers' auto mapping has it."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__


def find_converter(llama_cpp: str | os.PathLike | None = None) -> Path:
    """llama.cpp's `convert_hf_to_gguf.py`: in `llama_cpp`, else $LLAMA_CPP_DIR, else the cache's llama.cpp/
    (`make llama-cpp`); a ValueError saying how to get it when none is found."""
    tried = [Path(p) for p in (llama_cpp, os.environ.get("LLAMA_CPP_DIR")) if p] or [cache_dir() / "llama.cpp"]
    import importlib.util

    for folder in tried:
        if (Path(folder) / CONVERTER).is_file():
            if importlib.util.find_spec("sentencepiece") is None:
                raise ValueError(f"--format gguf: llama.cpp's {CONVERTER} needs the sentencepiece package: `pip install "
                                 "sentencepiece` (`make llama-cpp` installs it)")
            return Path(folder) / CONVERTER
    where = "--llama-cpp" if llama_cpp else ("$LLAMA_CPP_DIR" if os.environ.get("LLAMA_CPP_DIR") else "the cache")
    raise ValueError(f"--format gguf needs llama.cpp's {CONVERTER}, not found in {tried[0]} ({where}): run `make "
                     "llama-cpp` (it extracts llama.cpp from the llama-cpp-python source package into the cache) or "
                     "pass --llama-cpp DIR (a llama.cpp source tree)")


def check_gguf_out(out: Path, overwrite: bool) -> None:
    """A .gguf --out we may write: a new file, or with --overwrite an existing GGUF file (never a link, a
    folder or another kind of file)."""
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out}: --format gguf writes one file; name it NAME.gguf")
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; refusing to write through it (nothing was changed)")
    if out.exists():
        if not out.is_file():
            raise ValueError(f"--out {out} exists and is not a file (nothing was changed)")
        if not overwrite:
            raise ValueError(f"{out} exists; pass --overwrite to replace it (nothing was changed)")
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{out} is not a GGUF file; refusing to replace it (nothing was changed)")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: its folder {out.parent} does not exist")


def export_gguf(adapter: str | os.PathLike, out: str | os.PathLike, depth: int | None = None, baseline: bool = False,
                overwrite: bool = False, outtype: str = "f16", llama_cpp: str | os.PathLike | None = None,
                dtype: torch.dtype | None = None) -> Path:
    """Write the GGUF file `out`: the plain export (`export_plain`, into a temporary folder beside `out`) converted
    by llama.cpp's own converter (`convert_to_gguf`)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    out = Path(out)
    check_gguf_out(out, overwrite)
    converter = find_converter(llama_cpp)
    check_plain_request(adapter, depth, baseline)
    clean_temporaries(out.parent, out.name + ".plain")
    folder = temp_path(out.with_name(out.name + ".plain"))
    try:
        export_plain(adapter, folder, depth, baseline, dtype=dtype)
        return convert_to_gguf(folder, out, outtype, converter)
    finally:
        if folder.exists() or folder.is_symlink():
            remove_tree(folder, None, force=True)


def convert_to_gguf(folder: str | os.PathLike, out: Path, outtype: str, converter: Path) -> Path:
    """A plain Hugging Face folder (an export, or a base itself) through llama.cpp's `convert_hf_to_gguf.py`, run in
    this interpreter, into `out`: written under a temporary name, renamed once the converter has finished."""
    import subprocess
    import sys

    clean_temporaries(out.parent, out.name)
    gguf = temp_path(out)
    try:
        run = subprocess.run([sys.executable, str(converter), str(folder), "--outfile", str(gguf), "--outtype", outtype],
                             capture_output=True, text=True)
        if run.returncode != 0 or not gguf.is_file():
            tail = [line for line in (run.stderr or run.stdout).splitlines() if line.strip()][-3:]
            raise ValueError(f"llama.cpp's converter ({converter}) failed on {folder}: " + " | ".join(tail))
        return replace_file(gguf, out)
    finally:
        clean_temporaries(out.parent, out.name)  # the converter's file, if it stopped half-way


def export(ec: ExportConfig) -> Path:
    """`ouroboros export`: the format ExportConfig names."""
    dtype = DTYPES[ec.dtype] if ec.dtype else None
    if ec.format == "plain":
        return export_plain(ec.adapter, ec.out, ec.depth, ec.baseline, ec.overwrite, dtype)
    if ec.format == "gguf":
        return export_gguf(ec.adapter, ec.out, ec.depth, ec.baseline, ec.overwrite, ec.outtype, ec.llama_cpp, dtype)
    return export_hf(ec.adapter, ec.out, depth=ec.depth, baseline=ec.baseline, overwrite=ec.overwrite)


def describe_export(out, ec) -> str:
    """What `ouroboros export --format plain / gguf` wrote, for its last line: the family, the layers and how
    they came about, the bytes on disk, and how to load it."""
    from .speed import disk_bytes

    meta, _ = read_adapter(ec.adapter)
    cfg = OuroborosConfig.from_dict(meta["ouroboros_config"])
    arch = meta.get("base_architecture")
    L = arch.get("num_hidden_layers") if isinstance(arch, dict) else None
    out = Path(out)
    if ec.format == "gguf":
        return (f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {ec.outtype}) with llama.cpp's own converter: "
                f"llama-cli -m {out}, or llama_cpp.Llama({str(out)!r})")
    config = read_json(out / "config.json", "exported config")
    size = disk_bytes(out)
    if ec.baseline or cfg.heal_layers:
        how = "the pruned stack, nothing merged" if ec.baseline else "the heal model, its LoRA merged"
    else:
        depth = ec.depth or meta.get("recursion_policy", {}).get("default_depth")
        block = f"{cfg.recurrent_layer}" if cfg.block_layers == 1 else \
            f"{cfg.recurrent_layer}-{cfg.recurrent_layer + cfg.block_layers - 1}"
        how = (f"the loop unrolled: {depth} copies of the block (base layer{'s' if cfg.block_layers > 1 else ''} "
               f"{block}) on disk, one per step")
    of = f" of the base's {L}" if L else ""
    return (f"wrote {out}: a plain {config['architectures'][0]} ({config['model_type']}), "
            f"{config['num_hidden_layers']} layers{of} ({how}), {size / 2**20:.1f} MiB of weights "
            f"({config.get('dtype')}): AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it without "
            "ouroboros-lm")
