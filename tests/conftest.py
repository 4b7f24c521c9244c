"""Tiny random Llama-family models built from configs, shared by the unit tests."""
from __future__ import annotations


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


def assert_same_in_float64(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal in float64 up to the float32 rounding Hugging Face's RMSNorm applies inside (it casts to float32):
    a few units of float32's epsilon on the values' scale, whatever the CPU (a wrong layer moves logits by ~0.1)."""
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
    transformers) to float32 tolerance. Returns (model, loaded, adapter folder)."""
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
        torch.testing.assert_close(hf(tokens).logits, ours, atol=1e-5, rtol=1e-5)
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
