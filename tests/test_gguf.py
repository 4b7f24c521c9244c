"""`ouroboros export --format gguf`: an 18-layer heal model of the real SmolLM2 (the demo's planned layers, a LoRA
merged) through llama.cpp's own converter, loaded by llama.cpp (llama-cpp-python), decodes the same first 20 greedy
tokens as stock transformers on the plain export, with the same logits: at f32 to float32's rounding over its
layers (the KV cache kept in f32 too), at f16 to a few units of float16's epsilon (weights and the activations
llama.cpp feeds its f16 matrix products are rounded to it).

Opt-in: needs llama-cpp-python (`make llama-cpp`, a cached build from source) and the real model."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from conftest import assert_equivalent
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model, load_tokenizer
from ouroboros_lm.adapter import save_adapter

pytestmark = [pytest.mark.real_model, pytest.mark.llama_cpp]
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (`make llama-cpp` builds it once)", allow_module_level=True)

KEEP = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22, 23, 24, 27, 28, 29)  # the demo plan's first 18 by its ranking
PROMPT = "The state of the Union is strong. Fellow citizens, tonight"
NEW = 20


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ouroboros_lm.export import export_gguf, export_plain, find_converter

    try:
        find_converter()
    except ValueError as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("gguf")
    model = OuroborosModel.from_base(load_base_model("smollm2-135m"),
                                     OuroborosConfig(keep_layers=KEEP, heal_layers=1, lora_rank=4, lora_alpha=8),
                                     base_name="smollm2-135m")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)  # B too: the merge changes every kept layer
    save_adapter(model, tmp / "heal18")
    plain = export_plain(tmp / "heal18", tmp / "plain")
    ggufs = {t: export_gguf(tmp / "heal18", tmp / f"heal18-{t}.gguf", outtype=t) for t in ("f32", "f16")}
    return plain, ggufs


def transformers_reference(folder, ids):
    from ouroboros_lm.speed import TransformersRunner

    runner = TransformersRunner(folder)
    with torch.no_grad():
        logits = runner.model(torch.tensor([ids])).logits[0].double()
    return logits, runner.run(ids, NEW)[2]


def llama_cpp_logits_and_greedy(path, ids, kv_f32: bool):
    import llama_cpp

    kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if kv_f32 else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, **kv)
    try:
        llm.eval(ids)
        logits = torch.tensor(np.array(llm.scores[:len(ids)])).double()
        greedy = []
        for _ in range(NEW):
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([greedy[-1]])
        return logits, greedy
    finally:
        llm.close()


def test_gguf_f32_decodes_the_same_tokens_with_the_same_logits_as_transformers(exported):
    plain, ggufs = exported
    ids = load_tokenizer("smollm2-135m")(PROMPT).input_ids
    want, want_greedy = transformers_reference(plain, ids)
    got, greedy = llama_cpp_logits_and_greedy(ggufs["f32"], ids, kv_f32=True)
    assert greedy == want_greedy
    assert_equivalent(got, want, depth=len(KEEP), dtype=torch.float32)


def test_gguf_f16_decodes_the_same_tokens_within_float16_rounding(exported):
    plain, ggufs = exported
    ids = load_tokenizer("smollm2-135m")(PROMPT).input_ids
    want, want_greedy = transformers_reference(plain, ids)
    got, greedy = llama_cpp_logits_and_greedy(ggufs["f16"], ids, kv_f32=False)
    assert greedy == want_greedy
    tol = 4 * torch.finfo(torch.float16).eps * (1 + want.abs().max().item())
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert ggufs["f16"].stat().st_size < 0.6 * ggufs["f32"].stat().st_size
