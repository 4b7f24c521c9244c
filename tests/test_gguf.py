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

from conftest import DEMO_18_LAYERS, assert_equivalent, real_heal_adapter
from ouroboros_lm import load_tokenizer

pytestmark = [pytest.mark.real_model, pytest.mark.llama_cpp]
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (`make llama-cpp` builds it once)", allow_module_level=True)

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
    real_heal_adapter(tmp / "heal18")
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


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_decodes_the_same_tokens_with_the_logits_of_transformers(exported, outtype):
    """f32 (KV cache in f32 too): float32's rounding over the 18 layers; f16 (llama.cpp's default f16 KV cache): a
    few float16 epsilons of the logits' scale, and about half the bytes."""
    plain, ggufs = exported
    ids = load_tokenizer("smollm2-135m")(PROMPT).input_ids
    want, want_greedy = transformers_reference(plain, ids)
    got, greedy = llama_cpp_logits_and_greedy(ggufs[outtype], ids, kv_f32=outtype == "f32")
    assert greedy == want_greedy
    if outtype == "f32":
        assert_equivalent(got, want, depth=len(DEMO_18_LAYERS), dtype=torch.float32)
    else:
        tol = 4 * torch.finfo(torch.float16).eps * (1 + want.abs().max().item())
        torch.testing.assert_close(got, want, atol=tol, rtol=0)
        assert ggufs["f16"].stat().st_size < 0.6 * ggufs["f32"].stat().st_size


def test_gguf_files_are_measured_with_the_layers_of_their_plain_folders(exported):
    """bench/deploy_speed.py's llama.cpp rows: the same measurement as the transformers rows, each GGUF's layers
    read from its plain folder, its size the file's."""
    from ouroboros_recipes.deploy import measure_folders

    plain, ggufs = exported
    ids = load_tokenizer("smollm2-135m")(PROMPT).input_ids
    rows = measure_folders({"full": str(ggufs["f32"]), "f16": str(ggufs["f16"])}, ids, 4, 1, runtime="llama.cpp",
                           configs={"full": str(plain), "f16": str(plain)})
    for name, path in (("full", ggufs["f32"]), ("f16", ggufs["f16"])):
        r = rows[name]
        assert r["runtime"] == "llama.cpp" and r["class"] == "GGUF" and r["layers"] == 18
        assert r["disk_bytes"] == path.stat().st_size and r["decode_tps"] > 0 and r["ideal_x"] == 1.0
    assert rows["full"]["decode_x"] == 1.0 and 0.45 < rows["f16"]["size_x"] < 0.55
