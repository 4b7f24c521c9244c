"""Gemma 2, OLMo 2 and Granite through Hugging Face's own layer forward (families.py): the
pruned baseline equals HF's truncated model, every variant is causal, cached decoding equals
recomputing the prefix, training reaches the per-step norms, and the transformers wrapper agrees."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig, Olmo2Config

from conftest import TINY, TINY_SPLIT, randomize_trainables
from ouroboros_lm import OuroborosConfig, OuroborosModel
from ouroboros_lm.hf import OuroborosForCausalLM

FAMILIES = {
    # sliding window 8 < the 24 test tokens, so the alternating local layers really are local
    "gemma2": lambda: Gemma2Config(**TINY, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "olmo2": lambda: Olmo2Config(**TINY),
    "granite": lambda: GraniteConfig(**TINY, embedding_multiplier=6.0, logits_scaling=4.0, residual_multiplier=0.5,
                                     attention_multiplier=0.2),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def family_base(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = FAMILIES[arch]()
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms (Gemma's are 1 + w, zero at init)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def family_model(arch: str, **overrides) -> OuroborosModel:
    model = OuroborosModel.from_base(family_base(arch), OuroborosConfig(**{**TINY_SPLIT, **overrides})).eval()
    randomize_trainables(model, scale=0.3)
    return model


def tokens(batch=2, n=24, seed=123):
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_baseline_loss_equals_hugging_faces_truncated_model(arch):
    base = family_base(arch)
    cfg = OuroborosConfig(**TINY_SPLIT)
    keep = cfg.kept_layers(TINY["num_hidden_layers"])
    ref = copy.deepcopy(base)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [ref.config.layer_types[i] for i in keep]
    model = OuroborosModel.from_base(base, cfg).eval()
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding too
    with torch.no_grad():
        hf = ref(ids, labels=ids, use_cache=False)
        ours = model(ids, labels=ids, baseline=True)
        assert abs(hf.loss.item() - ours.loss.item()) <= 1e-5
        torch.testing.assert_close(ours.logits, hf.logits, atol=1e-5, rtol=1e-5)
        # left padding: the real positions agree (HF given our positions, which skip the padding)
        hf = ref(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
        ours = model(ids, attention_mask=mask, baseline=True)
        real = mask.bool()
        torch.testing.assert_close(ours.logits[real], hf.logits[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("variant", ["controller", "static"])
def test_every_variant_is_causal(arch, variant):
    model = family_model(arch, variant=variant)
    ids = tokens(batch=1)
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 7) % TINY["vocab_size"]
    with torch.no_grad():
        for kw in ({"depth": 3}, {"baseline": True}):
            a, b = model(ids, **kw).logits, model(changed, **kw).logits
            assert torch.equal(a[:, :15], b[:, :15]), kw
            assert not torch.equal(a[:, 15:], b[:, 15:]), kw


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_cached_decoding_equals_recomputing_the_prefix(arch):
    model = family_model(arch)
    ids = tokens(batch=1, n=10)
    cached = model.generate(ids, max_new_tokens=12, depth=3)  # past the sliding window of 8
    assert torch.equal(cached, model.generate(ids, max_new_tokens=12, depth=3, use_cache=False))
    cache, steps = model.new_cache(3), []
    with torch.no_grad():
        steps.append(model(cached[:, :10], depth=3, cache=cache).logits)
        for t in range(10, cached.shape[1]):
            steps.append(model(cached[:, t:t + 1], depth=3, cache=cache).logits)
        full = model(cached, depth=3).logits
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_training_reaches_the_step_norms_and_the_wrapper_agrees(arch, tmp_path):
    model = family_model(arch)
    ids = tokens()
    model.train()
    model(ids, labels=ids, depth=3).loss.backward()
    model.eval()
    g = model.recurrent.step_norms.weight.grad
    assert g is not None and bool(g[:3].abs().sum() > 0) and bool(g[3:].abs().sum() == 0)  # steps 0-2 only
    assert all(p.grad is not None for p in model.recurrent.controller.parameters())
    assert all(p.grad is None for p in model.recurrent.layer.parameters())  # the layer stays frozen
    hf = OuroborosForCausalLM.from_ouroboros(model, depth=3)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids, depth=3).logits)
    assert torch.equal(hf.generate(ids[:1, :8], max_new_tokens=5, do_sample=False),
                       model.generate(ids[:1, :8], max_new_tokens=5, depth=3))
    # saved and loaded: non-persistent buffers (Gemma's embedding scale, rotary tables) rebuilt; the
    # reloaded base may pick SDPA where the test model used eager attention, hence a tolerance
    hf.save_pretrained(tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids, depth=3).logits, atol=1e-4, rtol=1e-4)


def test_generic_path_equals_the_written_out_llama_layer():
    """Granite with neutral multipliers is Llama: the same weights through HF's own Granite layer
    (generic path: hooked projections, per-step norms, our KV slots) and through our written-out
    Llama layer give the same logits and the same cached generation, at every step of the recursion."""
    from conftest import tiny_base

    llama = tiny_base("llama")
    cfg = GraniteConfig(**TINY, tie_word_embeddings=True, embedding_multiplier=1.0, logits_scaling=1.0,
                        residual_multiplier=1.0, attention_multiplier=(TINY["hidden_size"] // TINY["num_attention_heads"]) ** -0.5)
    cfg._attn_implementation = "eager"
    granite = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    granite.load_state_dict(llama.state_dict())
    models = []
    for base in (llama, granite):
        m = OuroborosModel.from_base(base, OuroborosConfig(**TINY_SPLIT)).eval()
        randomize_trainables(m, seed=3, scale=0.3)
        models.append(m)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(models[1](ids, depth=4).logits, models[0](ids, depth=4).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(models[1].generate(ids[:1, :8], max_new_tokens=8, depth=4),
                       models[0].generate(ids[:1, :8], max_new_tokens=8, depth=4))


def test_a_family_without_the_seven_projections_is_refused_naming_what_is_missing():
    from transformers import Phi3Config

    base = AutoModelForCausalLM.from_config(Phi3Config(**{**TINY, "pad_token_id": 0}))
    with pytest.raises(ValueError, match=r"model_type='phi3'.*missing model.layers\[i\].self_attn.q_proj.*"
                                         r"mlp.gate_proj"):
        OuroborosModel.from_base(base, OuroborosConfig(**TINY_SPLIT))
