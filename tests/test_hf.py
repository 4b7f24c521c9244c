"""The transformers model class and `ouroboros export`: a folder that loads in a fresh process,
Hugging Face `generate` (greedy, sampling, beam search, streaming) through our per-step cache,
logits equal to our forward, bit-exact save/load, and `pipeline("text-generation")`."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_SPLIT, assert_equivalent, randomize_trainables, save_tiny_base
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_adapter, load_base_model, save_adapter
from ouroboros_lm.adapter import adapter_state_dict
from ouroboros_lm.cli import main
from ouroboros_lm.hf import OuroborosHFCache

SRC = Path(__file__).resolve().parent.parent / "src"
DEPTH = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(adapter folder, exported HF folder, tokenizer): a tiny Llama with random trained parts,
    exported by the CLI at depth 3."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hf")
    base = save_tiny_base(root / "base")
    model = OuroborosModel.from_base(load_base_model(base), OuroborosConfig(**TINY_SPLIT), base_name=base)
    randomize_trainables(model, scale=0.3)
    save_adapter(model, root / "adapter")
    assert main(["export", "--adapter", str(root / "adapter"), "--out", str(root / "hf"), "--depth", str(DEPTH)]) == 0
    return root / "adapter", root / "hf", AutoTokenizer.from_pretrained(root / "hf")


@pytest.fixture(scope="module")
def models(exported):
    """(our model from the adapter, the exported folder loaded with transformers)."""
    from transformers import AutoModelForCausalLM

    adapter, hf_dir, _ = exported
    return load_adapter(adapter).eval(), AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def prompt(n=9, batch=1, seed=0):
    return torch.randint(0, 95, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_export_folder_loads_in_a_fresh_process_with_trust_remote_code(exported, models, tmp_path):
    """Nothing but transformers is imported by the test script; it loads the folder, and its
    logits and greedy tokens equal ours."""
    _, hf_dir, _ = exported
    out = tmp_path / "out.pt"
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, trust_remote_code=True).eval()\n"
        f"ids = torch.randint(0, 95, (1, 9), generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad(): logits = m(ids).logits\n"
        "gen = m.generate(ids, max_new_tokens=10, do_sample=False)\n"
        f"torch.save({{'logits': logits, 'gen': gen, 'cls': type(m).__name__}}, {str(out)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    ours, _ = models
    ids = prompt()
    assert got["cls"] == "OuroborosForCausalLM"
    with torch.no_grad():
        assert torch.equal(got["logits"], ours(ids, depth=DEPTH).logits)
    assert torch.equal(got["gen"], ours.generate(ids, max_new_tokens=10, depth=DEPTH, eos_token_id=96))
    # without trust_remote_code, once ouroboros_lm is imported: the Auto classes know model_type
    # "ouroboros", and transformers' modeling code is only imported when a model is loaded
    lazy = ("import sys, ouroboros_lm\n"
            "assert 'ouroboros_lm.hf' not in sys.modules and 'transformers.modeling_utils' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"print(type(AutoModelForCausalLM.from_pretrained({str(hf_dir)!r})).__name__)\n")
    r = subprocess.run([sys.executable, "-c", lazy], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OuroborosForCausalLM"), r.stderr[-3000:]
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "ouroboros" and cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_ouroboros.")
    assert {"tokenizer.json", "model.safetensors"} <= {p.name for p in hf_dir.iterdir()}
    # our adapter travels in a subfolder: at the top, transformers would take it for a PEFT adapter
    assert not (hf_dir / "adapter_config.json").exists()
    assert {"adapter_config.json", "adapter_model.safetensors"} == {p.name for p in (hf_dir / "adapter").iterdir()}


def test_logits_and_loss_equal_our_forward(models):
    ours, hf = models
    ids = prompt(12, batch=2, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in row 0
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            a, b = ours(ids, labels=ids, depth=DEPTH, **kw), hf(ids, labels=ids, **kw)
            assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        assert torch.equal(ours(ids, baseline=True).logits, hf(ids, baseline=True).logits)
        assert torch.equal(ours(ids, depth=5).logits, hf(ids, depth=5).logits)


def test_hf_generate_equals_ours_greedy_padded_sampled_streamed(models):
    from transformers.generation.streamers import BaseStreamer

    ours, hf = models
    eos = 96
    ids = prompt(10, seed=2)
    want = ours.generate(ids, max_new_tokens=6, depth=DEPTH, eos_token_id=eos)
    assert torch.equal(hf.generate(ids, max_new_tokens=6, do_sample=False), want)
    # sampling from the single most likely token is greedy decoding
    assert torch.equal(hf.generate(ids, max_new_tokens=6, do_sample=True, top_k=1), want)

    class Collect(BaseStreamer):
        def __init__(self):
            self.seen = []

        def put(self, value):
            self.seen.append(value.reshape(-1).tolist())

        def end(self):
            pass

    streamer = Collect()
    hf.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert [t for chunk in streamer.seen for t in chunk] == want[0].tolist()
    batch = prompt(10, batch=2, seed=3)
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    batch[1, :3] = eos  # left padding
    want = ours.generate(batch, attention_mask=mask, max_new_tokens=5, depth=DEPTH, eos_token_id=eos)
    got = hf.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=eos)
    assert torch.equal(got, want)
    assert torch.equal(hf.generate(ids, max_new_tokens=4, do_sample=False, baseline=True),
                       ours.generate(ids, max_new_tokens=4, baseline=True, eos_token_id=eos))
    # another depth through generate's model kwargs
    assert torch.equal(hf.generate(ids, max_new_tokens=4, do_sample=False, depth=2),
                       ours.generate(ids, max_new_tokens=4, depth=2, eos_token_id=eos))


@pytest.mark.equivalence
def test_beam_search_through_the_cache_equals_recomputing(models):
    """Beam search reorders our per-step cache (OuroborosCache.reorder); without a cache every
    step recomputes the whole prefix: both give the same beams and scores."""
    hf = copy.deepcopy(models[1]).double()  # float64: the comparison holds on any CPU
    ids = prompt(8, batch=2, seed=4)
    kw = dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    cached, plain = hf.generate(ids, **kw), hf.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    # generate scores in float32 whatever the model's dtype: a sum over the 7 new tokens' log-probabilities
    assert_equivalent(cached.sequences_scores, plain.sequences_scores, depth=kw["max_new_tokens"])
    assert isinstance(hf(ids, use_cache=True).cache, OuroborosHFCache)


def test_save_pretrained_round_trip_is_bit_exact(exported, models, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, _, _ = exported
    _, hf = models
    hf.save_pretrained(tmp_path / "again")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.config.depth == DEPTH and back.model.base_fingerprints == hf.model.base_fingerprints
    ids = prompt(seed=5)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    # the loaded model's adapter is the one we exported, tensor for tensor
    save_adapter(back.model, tmp_path / "adapter_again")
    x, y = adapter_state_dict(load_adapter(adapter)), adapter_state_dict(load_adapter(tmp_path / "adapter_again"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_pipeline_text_generation(exported, models):
    from transformers import pipeline

    _, _, tok = exported
    ours, hf = models
    text = "the state of"
    generator = pipeline("text-generation", model=hf, tokenizer=tok)
    ids = tok(text, return_tensors="pt").input_ids
    want = ours.generate(ids, max_new_tokens=8, depth=DEPTH, eos_token_id=tok.eos_token_id)[0]
    out = generator(text, max_new_tokens=8, do_sample=False, return_tensors=True)
    assert out[0]["generated_token_ids"] == want.tolist()
    assert generator(text, max_new_tokens=8, do_sample=False)[0]["generated_text"].startswith(text)


def test_export_refuses_a_non_empty_folder_and_bad_depth(exported, tmp_path, capsys):
    adapter, hf_dir, _ = exported
    assert main(["export", "--adapter", str(adapter), "--out", str(hf_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "x"), "--depth", "999"]) == 2
    assert "max_depth" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bfloat16_load_matches_load_adapter_in_bfloat16(exported):
    """from_pretrained(dtype=bfloat16) builds what load_adapter(dtype=bfloat16) builds: frozen
    weights and SVD bases in bfloat16, the trained parts in float32; same logits and tokens."""
    from transformers import AutoModelForCausalLM

    adapter, hf_dir, _ = exported
    ours = load_adapter(adapter, dtype=torch.bfloat16).eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    want = {n: p.dtype for n, p in ours.named_parameters()}
    assert want == {n.removeprefix("model."): p.dtype for n, p in hf.named_parameters()}
    assert {want["recurrent.gate.weight_new"], want["prelude.0.self_attn.q_proj.weight"]} == {torch.float32, torch.bfloat16}
    ids = prompt(seed=6)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids, depth=DEPTH).logits)
    assert torch.equal(hf.generate(ids, max_new_tokens=5, do_sample=False),
                       ours.generate(ids, max_new_tokens=5, depth=DEPTH, eos_token_id=96))
