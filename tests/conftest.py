"""Tiny random Llama-family models built from configs, shared by the unit tests."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from ouroboros_lm import OuroborosConfig, OuroborosModel

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None, tie_word_embeddings=False),
}

# The tiny split: layers 0-1 prelude, 4 recurrent, 6-7 coda; 2, 3, 5 removed.
TINY_SPLIT = dict(n_prelude=2, recurrent_layer=4, n_coda=2, rank=4, style_dim=16, controller_hidden=24, max_depth=16)


@pytest.fixture(autouse=True, scope="session")
def data_cache(tmp_path_factory):
    """Raw text the tests train on is prepared into a cache of the session's own, never the user's."""
    import os

    folder = tmp_path_factory.mktemp("data-cache")
    before = os.environ.get("OUROBOROS_DATA_CACHE")
    os.environ["OUROBOROS_DATA_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("OUROBOROS_DATA_CACHE", None)
    else:
        os.environ["OUROBOROS_DATA_CACHE"] = before


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and on a shared, busy machine far faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- equivalence
# Two computations of the same thing (ours and a reference: Hugging Face, a plain loop, an unfused op) differ only by
# rounding, and how much depends on the CPU's kernels (AVX-512, AVX2, MKL's code path, the thread count), so a
# constant like atol=1e-5 that passes on one machine fails on another. Compare in float64 where the test allows it
# (model.double(), reference.double()); where float32 is the point of the test, use a tolerance derived from float32's
# epsilon. Tests that compare this way carry @pytest.mark.equivalence: `make test-other-cpu` runs them again with
# other CPU kernels selected (see docs/reliability.md).

EQUIVALENT_ULPS = 64


def equivalence_tolerance(reference, *, dtype: torch.dtype, depth: int = 1, scale: float | None = None) -> float:
    """Absolute tolerance for a computation run in `dtype` through `depth` steps (layers, recursion steps, chunks),
    of values on the scale of `reference`: EQUIVALENT_ULPS * depth * eps(dtype) * (1 + max |reference|).

    - eps(dtype): one rounding changes a value by at most eps/2 relative; reordering a sum (what another kernel,
      chunking or a cache does) changes it by a few eps of the terms' size per operation.
    - EQUIVALENT_ULPS = 64: one step of the tiny models (a norm, dot products of <= 96 terms, a softmax, a residual
      add) adds up to a few dozen such roundings; the slack covers sums whose order a kernel picks.
    - depth: each step's rounding is carried to the next through the residual stream, so errors add up linearly.
    - 1 + max |reference|: rounding is relative to the size of the values that were summed, not to each element
      (a small logit is the difference of large terms), and 1 keeps the floor sensible for values near zero. Where
      the result is far smaller than what was summed (a KL of two near-equal distributions, a residual's norm),
      pass that size as `scale` (e.g. the log-probabilities' log(vocabulary size)).
    A real difference (a wrong layer, a shifted label, a missing scale) moves values by ~1e-2..1e-1, far above this
    (float32, depth 8: ~6e-5 at scale 1)."""
    if scale is None:
        scale = torch.as_tensor(reference).detach().double().abs().max().item()
    return EQUIVALENT_ULPS * depth * torch.finfo(dtype).eps * (1 + scale)


def assert_equivalent(ours, reference, *, depth: int = 1, dtype: torch.dtype | None = None, scale: float | None = None,
                      msg=None) -> None:
    """`ours` equals `reference` up to the rounding of `dtype` (default: the less precise of the two tensors' dtypes)
    through `depth` steps, on values of size `scale` (default: max |reference|; see equivalence_tolerance). Both are
    compared in float64; Python numbers (a loss's .item()) need `dtype`, the precision they were computed in."""
    if dtype is None:
        dtypes = [t.dtype for t in (ours, reference) if isinstance(t, torch.Tensor)]
        assert dtypes, "Python numbers: pass dtype=, the precision they were computed in"
        dtype = min(dtypes, key=lambda d: torch.finfo(d).bits)
    ours, reference = (torch.as_tensor(t).detach().double() for t in (ours, reference))
    tol = equivalence_tolerance(reference, dtype=dtype, depth=depth, scale=scale)
    torch.testing.assert_close(ours, reference, atol=tol, rtol=0, msg=msg)


def assert_same_in_float64(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Both computed in float64 (the model and the reference cast with .double()): equal up to the float32 rounding
    Hugging Face's RMSNorm applies inside (it casts to float32), whatever the CPU (a wrong layer moves logits by
    ~0.1). 32 rather than EQUIVALENT_ULPS units: only the norms round in float32, not the sums."""
    assert ours.dtype == reference.dtype == torch.float64
    tol = 32 * torch.finfo(torch.float32).eps * (1 + reference.abs().max().item())
    torch.testing.assert_close(ours, reference, atol=tol, rtol=0)


def tiny_base(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    cfg = CONFIGS[arch]()
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random but not degenerate: give the biases of Qwen2 some values
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def tiny_ouroboros(arch: str = "llama", seed: int = 0, **overrides) -> OuroborosModel:
    """A tiny model on `tiny_base(arch, seed)`; `overrides` are OuroborosConfig fields."""
    cfg = OuroborosConfig(**{**TINY_SPLIT, **overrides})
    model = OuroborosModel.from_base(tiny_base(arch, seed), cfg).eval()
    return model


def randomize_trainables(model: OuroborosModel, seed: int = 1, scale: float = 0.5) -> None:
    """Give Controller heads, static vectors and gate weights random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, TINY["vocab_size"], (2, 24), generator=g)


# ---------------------------------------------------------------- tokenizer and saved tiny models
def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII: 95 chars + <unk> + <eos> = 97 ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["<unk>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


def save_tiny_base(path, arch: str = "llama", seed: int = 0):
    """A tiny random model + tokenizer saved as a Hugging Face folder (what `--base` takes)."""
    model = tiny_base(arch, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def round_trip_and_export(tmp_path, tokens, depth: int = 3, **overrides):
    """A tiny model (OuroborosConfig `overrides`, random trained parts) on a saved tiny base, saved as an adapter, loaded
    back and exported: the loaded model's logits equal the original's exactly, the exported folder's (through
    transformers) the original's in float64. Returns (model, loaded, adapter folder)."""
    from transformers import AutoModelForCausalLM

    from ouroboros_lm import load_base_model
    from ouroboros_lm.adapter import load_adapter, save_adapter
    from ouroboros_lm.export import export_hf

    base = save_tiny_base(tmp_path / "base")
    model = OuroborosModel.from_base(load_base_model(base), OuroborosConfig(**{**TINY_SPLIT, **overrides}),
                                     base_name=base)
    randomize_trainables(model, scale=0.3)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tmp_path / "adapter").eval()
    export_hf(tmp_path / "adapter", tmp_path / "hf", depth=depth)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ours = model.eval()(tokens, depth=depth).logits
        assert torch.equal(loaded(tokens, depth=depth).logits, ours)
    with torch.no_grad():  # the exported model computes what ours does: compared in float64, on any CPU
        assert_same_in_float64(hf.double()(tokens).logits, copy.deepcopy(model).double()(tokens, depth=depth).logits)
    return model, loaded, tmp_path / "adapter"


def write_corpus(folder, n_docs: int = 12, seed: int = 0, words: int = 120):
    """Plain-text documents of pseudo-words, one file each."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    syll = ["ba", "ko", "ri", "tu", "me", "sa", "lo", "ni", "de", "fa"]
    for i in range(n_docs):
        text = " ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(words)) + ".\n"
        (folder / f"doc_{i:03d}.txt").write_text(text)
    return folder


# ---------------------------------------------------------------- a Python without ouroboros-lm
def clean_python() -> str:
    """A virtual environment with torch and transformers (the versions this one has) and WITHOUT ouroboros-lm, built
    once into the cache (`$OUROBOROS_CACHE/clean-venv-...`): what proves an exported folder needs nothing of ours.
    Returns its interpreter."""
    import subprocess
    import sys

    import transformers

    from ouroboros_lm.loading import cache_dir

    torch_version = torch.__version__.split("+")[0]
    venv = cache_dir() / f"clean-venv-torch{torch_version}-transformers{transformers.__version__}"
    python = venv / "bin" / "python"
    stamp = venv / ".complete"
    if not stamp.is_file():
        import shutil

        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + [f"torch=={torch_version}"], check=True)  # the CPU build first (see the Makefile)
        subprocess.run(pip + [f"transformers=={transformers.__version__}"], check=True)
        stamp.write_text("ok\n")
    found = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('ouroboros_lm') is None)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == "True", f"{venv} can import ouroboros_lm: it would prove nothing"
    return str(python)


@pytest.fixture(scope="session")
def clean_venv_python():
    return clean_python()


# ---------------------------------------------------------------- the demo's 18 planned layers of the real SmolLM2
DEMO_18_LAYERS = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22, 23, 24, 27, 28, 29)  # demo_plan.json's first 18


def real_heal_adapter(folder, keep=DEMO_18_LAYERS):
    """A heal model of the real SmolLM2 on `keep`, every LoRA weight (B too) moved by 0.01 noise so merging changes
    every kept layer, saved as an adapter in `folder`. Returns the model."""
    from ouroboros_lm import load_base_model, save_adapter

    model = OuroborosModel.from_base(load_base_model("smollm2-135m"),
                                     OuroborosConfig(keep_layers=keep, heal_layers=1, lora_rank=4, lora_alpha=8),
                                     base_name="smollm2-135m")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    save_adapter(model, folder)
    return model.eval()
