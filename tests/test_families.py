"""Gemma 2, Gemma 3, OLMo 2, Granite, Phi-3 and SmolLM3 through Hugging Face's own layer forward (families.py):
the pruned baseline equals HF's truncated model, every variant is causal, cached decoding equals
recomputing the prefix, training reaches the per-step norms, the transformers wrapper agrees, adapters
round-trip and refuse another base; Phi-3's fused projections equal the same weights split into a
Llama layer; bases that cannot work are refused naming why."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GraniteConfig, Olmo2Config, Phi3Config, \
    SmolLM3Config

from conftest import TINY, TINY_SPLIT, assert_equivalent, assert_same_in_float64, randomize_trainables
from ouroboros_lm import OuroborosConfig, OuroborosModel
from ouroboros_lm.peft_lora import adaptation_parameter_count
from ouroboros_lm.adapter import AdapterError, load_adapter, save_adapter
from ouroboros_lm.hf import OuroborosForCausalLM

GEMMA3_KINDS = ["sliding_attention", "full_attention"] * 4  # layer 4 (recurrent) local, 5 global
FAMILIES = {
    # sliding window 8 < the 24 test tokens, so the alternating local layers really are local
    "gemma2": lambda: Gemma2Config(**TINY, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    # local and global layers alternate (the prelude, the removed layers and the coda hold both kinds);
    # the local layers' rotary base (10^4) is not the global layers' (10^6)
    "gemma3": lambda: Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                       final_logit_softcapping=30.0, layer_types=GEMMA3_KINDS),
    "olmo2": lambda: Olmo2Config(**TINY),
    "granite": lambda: GraniteConfig(**TINY, embedding_multiplier=6.0, logits_scaling=4.0, residual_multiplier=0.5,
                                     attention_multiplier=0.2),
    # Phi-4-mini's partial rotary (half of each head rotated); one sliding window for every layer
    "phi3": lambda: Phi3Config(**TINY, pad_token_id=0, eos_token_id=96, sliding_window=8, partial_rotary_factor=0.5),
    # no rotary in layers 3 and 7 (a prelude-side removed layer and the last coda layer)
    "smollm3": lambda: SmolLM3Config(**TINY, pad_token_id=0, eos_token_id=96, no_rope_layer_interval=4),
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


def hf_truncated(base, keep):
    """An independent copy of `base` keeping only the layers `keep` (HF's own model, our split)."""
    ref = copy.deepcopy(base)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [ref.config.layer_types[i] for i in keep]
    return ref


def assert_baseline_equals_hf(arch, **split):
    """The baseline equals HF's truncated model, in float64; returns our model (float64)."""
    base = family_base(arch).double()  # float64: the comparison holds on any CPU
    cfg = OuroborosConfig(**{**TINY_SPLIT, **split})
    # the baseline: the pruned stack (a block's first layer once), or a heal model's whole stack
    ref = hf_truncated(base, (cfg if cfg.heal_layers else cfg.pruned_stack()).kept_layers(TINY["num_hidden_layers"]))
    model = OuroborosModel.from_base(base, cfg).double().eval()
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding too
    with torch.no_grad():
        hf = ref(ids, labels=ids, use_cache=False)
        ours = model(ids, labels=ids, baseline=True)
        assert_equivalent(ours.loss, hf.loss)  # our loss is float32
        assert_same_in_float64(ours.logits, hf.logits)
        # left padding: the real positions agree with HF's model on each row without its padding (HF's own padded
        # forward is no reference in float64: its eager softmax runs in float32, where a fully masked row is NaN)
        ours = model(ids, attention_mask=mask, baseline=True).logits
        for row, real in enumerate(mask.bool()):
            assert_same_in_float64(ours[row, real], ref(ids[row:row + 1, real], use_cache=False).logits[0])
    return model


@pytest.mark.equivalence
def test_gemma3_block_of_a_local_and_a_global_layer_runs_each_with_its_own_window(tmp_path):
    """A block of layers 4 (local) and 5 (global), nothing added: depth 2 equals Hugging Face's model
    running 0, 1, 4, 5, 4, 5, 6, 7 (depth 1: 0, 1, 4, 5, 6, 7); the baseline runs layer 4 once; the
    adapter records both kinds."""
    model = assert_baseline_equals_hf("gemma3", recurrent_layer=4, block_layers=2, variant="none", gate=False,
                                      step_norm=False)
    assert model.recurrent.windows == [8, None]
    ids = tokens()
    with torch.no_grad():
        for depth, keep in ((2, [0, 1, 4, 5, 4, 5, 6, 7]), (1, [0, 1, 4, 5, 6, 7])):
            ref = hf_truncated(family_base("gemma3").double(), keep)
            hf = ref(ids, labels=ids, use_cache=False).loss
            assert_equivalent(model(ids, labels=ids, depth=depth).loss, hf, msg=str(depth))
    meta = json.loads((save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert meta["recurrent_layer"]["block"] == [{"index": 4, "kind": "sliding_attention", "window": 8},
                                                {"index": 5, "kind": "full_attention", "window": None}]


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "smollm3"])
def test_any_kept_layers_keep_each_layers_own_kind(arch):
    """keep_layers 0, 2, 3, 5, 7 (Gemma 3: local, local, global, global, global; SmolLM3: layer 7 without rotary):
    the pruned stack and the heal model equal HF's model on exactly those layers, and a block of 2-3 (a local and a
    global layer) looped twice equals HF's 0, 2, 3, 2, 3, 5, 7."""
    assert_baseline_equals_hf(arch, keep_layers=(0, 2, 3, 5, 7), recurrent_layer=3)
    assert_baseline_equals_hf(arch, keep_layers=(0, 2, 3, 5, 7), heal_layers=1, lora_rank=2)
    model = assert_baseline_equals_hf(arch, keep_layers=(0, 2, 3, 5, 7), recurrent_layer=2, block_layers=2,
                                      variant="none", gate=False, step_norm=False)
    ids = tokens()
    with torch.no_grad():
        ref = hf_truncated(family_base(arch).double(), [0, 2, 3, 2, 3, 5, 7])
        assert_equivalent(model(ids, labels=ids, depth=2).loss, ref(ids, labels=ids, use_cache=False).loss)


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_baseline_loss_equals_hugging_faces_truncated_model(arch):
    assert_baseline_equals_hf(arch)


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


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_cached_decoding_equals_recomputing_the_prefix(arch):
    model = family_model(arch).double()  # float64: the comparison holds on any CPU
    ids = tokens(batch=1, n=10)
    cached = model.generate(ids, max_new_tokens=12, depth=3)  # past the sliding window of 8
    assert torch.equal(cached, model.generate(ids, max_new_tokens=12, depth=3, use_cache=False))
    cache, steps = model.new_cache(3), []
    with torch.no_grad():
        steps.append(model(cached[:, :10], depth=3, cache=cache).logits)
        for t in range(10, cached.shape[1]):
            steps.append(model(cached[:, t:t + 1], depth=3, cache=cache).logits)
        full = model(cached, depth=3).logits
    assert_same_in_float64(torch.cat(steps, 1), full)


@pytest.mark.equivalence
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
    # reloaded base may pick SDPA where the test model used eager attention: compared in float64
    hf.save_pretrained(tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").double().eval()
    with torch.no_grad():
        assert_same_in_float64(back(ids).logits, copy.deepcopy(model).double()(ids, depth=3).logits)


@pytest.mark.equivalence
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
        models.append(m.double())  # float64: the comparison holds on any CPU
    ids = tokens()
    with torch.no_grad():
        assert_same_in_float64(models[1](ids, depth=4).logits, models[0](ids, depth=4).logits)
    assert torch.equal(models[1].generate(ids[:1, :8], max_new_tokens=8, depth=4),
                       models[0].generate(ids[:1, :8], max_new_tokens=8, depth=4))


@pytest.mark.equivalence
def test_gemma3_recurrent_layer_may_be_local_or_global_and_the_kind_is_recorded(tmp_path):
    """Layer 4 is a local (sliding-window) layer, layer 5 a global one: either may recur, the pruned
    baseline equals HF's truncated model both ways, and the kind is recorded (model and adapter)."""
    for layer, kind, window in ((4, "sliding_attention", 8), (5, "full_attention", None)):
        model = assert_baseline_equals_hf("gemma3", recurrent_layer=layer)
        assert (model.recurrent.kind, model.recurrent.window) == (kind, window)
        assert f"recurrent_kind={kind}" in repr(model)
        meta = json.loads((save_adapter(model, tmp_path / kind) / "adapter_config.json").read_text())
        assert meta["recurrent_layer"] == {"index": layer, "kind": kind, "window": window}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_adapter_round_trip_and_fingerprints_refuse_another_base(arch, tmp_path):
    model = family_model(arch, lora_rank=4 if arch == "phi3" else 0)
    randomize_trainables(model, seed=2, scale=0.3)  # the LoRA's B too
    save_adapter(model, tmp_path / "a")
    back = load_adapter(tmp_path / "a", base=family_base(arch))
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(back(ids, depth=3).logits, model(ids, depth=3).logits)
    with pytest.raises(AdapterError, match="different base model.*different weights"):
        load_adapter(tmp_path / "a", base=family_base(arch, seed=1))


def split_phi3_into_llama(phi3):
    """A Llama model holding Phi-3's weights with qkv_proj and gate_up_proj cut into their seven
    projections (Phi-3 with full rotary and no window is the Llama layer with fused matrices)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**TINY, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    llama = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    q, kv, inter = TINY["hidden_size"], TINY["hidden_size"] * TINY["num_key_value_heads"] // TINY["num_attention_heads"], \
        TINY["intermediate_size"]
    state = {}
    for k, v in phi3.state_dict().items():
        if k.endswith("qkv_proj.weight"):
            for name, part in zip("qkv", v.split([q, kv, kv])):
                state[k.replace("qkv_proj", f"{name}_proj")] = part
        elif k.endswith("gate_up_proj.weight"):
            for name, part in zip(("gate", "up"), v.split([inter, inter])):
                state[k.replace("gate_up_proj", f"{name}_proj")] = part
        else:
            state[k] = v
    llama.load_state_dict(state)
    return llama


@pytest.mark.equivalence
def test_phi3_fused_projections_equal_the_same_weights_split_into_the_llama_layer():
    """Phi-3's qkv_proj / gate_up_proj: each of q, k, v, gate, up gets its own SVD basis (from its
    slice of the fused matrices) and its own low-rank path, exactly as a Llama layer with the same
    weights split gets them: same bases, same logits at every depth, same cached generation."""
    from transformers import Phi3Config

    torch.manual_seed(0)
    cfg = Phi3Config(**TINY, pad_token_id=0, eos_token_id=96)
    cfg._attn_implementation = "eager"
    phi3 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    llama = split_phi3_into_llama(phi3)
    models = []
    for base in (phi3, llama):
        m = OuroborosModel.from_base(base, OuroborosConfig(**TINY_SPLIT)).eval()
        randomize_trainables(m, seed=3, scale=0.3)
        models.append(m)
    for name, b in models[1].recurrent.bases.named_buffers():
        assert_equivalent(dict(models[0].recurrent.bases.named_buffers())[name], b, msg=name)  # float32 SVDs
    ids = tokens()
    for m in models:
        m.double()  # float64: the comparison holds on any CPU
    with torch.no_grad():
        for depth in (1, 4):
            assert_same_in_float64(models[0](ids, depth=depth).logits, models[1](ids, depth=depth).logits)
    assert torch.equal(models[0].generate(ids[:1, :8], max_new_tokens=8, depth=4),
                       models[1].generate(ids[:1, :8], max_new_tokens=8, depth=4))


@pytest.mark.equivalence
def test_outer_lora_on_fused_projections_equals_merged_weights_and_trains():
    """PEFT LoRA on Phi-3's outer layers wraps the fused modules; its output equals the base with
    W + (alpha/r) B A merged into qkv_proj / gate_up_proj, and a training step reaches it."""
    model = family_model("phi3", lora_rank=4, prelude_lora_layers=1)
    randomize_trainables(model, seed=4, scale=0.3)
    model.double()  # float64: the comparison holds on any CPU
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {f"{part}.{i}.{m}" for part, i in (("prelude", 1), ("coda", 0), ("coda", 1))
                       for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    base, cfg = family_base("phi3").double(), model.config
    outer = model.trainable_parameter_breakdown()["outer_lora"]  # counted from the fused modules' shapes
    assert adaptation_parameter_count(cfg, base.model.layers[0], TINY["hidden_size"]) == outer
    kept, scale = cfg.kept_layers(TINY["num_hidden_layers"]), cfg.lora_alpha / cfg.lora_rank
    with torch.no_grad():
        for part, offset in (("prelude", 0), ("coda", cfg.n_prelude + 1)):
            for i, layer in enumerate(getattr(model, part)):
                for name, module in layer.named_modules():
                    if hasattr(module, "lora_A") and "default" in module.lora_A:
                        delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
                        base.model.layers[kept[offset + i]].get_submodule(name).weight.add_(scale * delta)
    merged = OuroborosModel.from_base(base, OuroborosConfig(**TINY_SPLIT)).double().eval()
    merged.recurrent.load_state_dict(model.recurrent.state_dict())
    ids = tokens()
    with torch.no_grad():
        assert_same_in_float64(model(ids, depth=3).logits, merged(ids, depth=3).logits)
    model(ids, labels=ids, depth=3).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if n.endswith(("qkv_proj.base_layer.weight",
                                                                                   "gate_up_proj.base_layer.weight")))


def tiny_config(cls, **extra):
    cfg = cls(**{**TINY, "pad_token_id": 0, "eos_token_id": 96, **extra})
    return AutoModelForCausalLM.from_config(cfg)


def test_bases_that_cannot_work_are_refused_in_one_line_naming_why():
    from transformers import HeliumConfig, MixtralConfig, Qwen2MoeConfig

    split = OuroborosConfig(**TINY_SPLIT)
    for cls in (MixtralConfig, Qwen2MoeConfig):
        with pytest.raises(ValueError, match=r"^unsupported architecture \w+ \(model_type='\w+'\): its MLPs are "
                                             r"mixtures of experts.*Ouroboros supports these decoders: llama, .*, phi3, smollm3\.$"):
            OuroborosModel.from_base(tiny_config(cls, num_local_experts=2, num_experts=2), split)
    from transformers import Gemma3Config

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    multimodal = AutoModelForCausalLM.from_config(Gemma3Config(text_config={**TINY, "head_dim": 16}, vision_config=vision,
                                                               mm_tokens_per_image=4))
    with pytest.raises(ValueError, match=r"Gemma3ForConditionalGeneration \(model_type='gemma3'\): a multimodal wrapper"):
        OuroborosModel.from_base(multimodal, split)
    with pytest.raises(ValueError, match=r"model_type='gemma3_text'\): its attention is bidirectional"):
        OuroborosModel.from_base(tiny_config(Gemma3TextConfig, head_dim=16, use_bidirectional_attention=True), split)
    # a layer class other than the one the entry runs (it would fall to the Llama layer unseen)
    base = family_base("phi3")
    base.model.layers = torch.nn.ModuleList(tiny_config(Gemma3TextConfig, head_dim=16).model.layers)
    with pytest.raises(ValueError, match=r"model_type='phi3'\): its layers are Gemma3DecoderLayer, not the Phi3DecoderLayer"):
        OuroborosModel.from_base(base, split)
    # every part present, but no table entry: the general path is not assumed to fit
    with pytest.raises(ValueError, match=r"model_type='helium'\): model_type 'helium' has no entry in families.FAMILIES"):
        OuroborosModel.from_base(tiny_config(HeliumConfig), split)


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_export_folder_loads_and_equals_our_forward(arch, tmp_path):
    """`ouroboros export`'s folder (adapter + base folder -> Hugging Face model folder) loads with
    trust_remote_code and gives our forward's logits and greedy generation."""
    from conftest import tiny_tokenizer
    from ouroboros_lm.export import export_hf

    folder = tmp_path / "base"
    family_base(arch).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model = OuroborosModel.from_base(family_base(arch), OuroborosConfig(**TINY_SPLIT), base_name=str(folder)).eval()
    randomize_trainables(model, scale=0.3)
    out = export_hf(save_adapter(model, tmp_path / "adapter"), tmp_path / "hf", depth=3)
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = tokens()
    with torch.no_grad():  # the reloaded base picks SDPA where the test model used eager attention: in float64
        assert_same_in_float64(copy.deepcopy(back).double()(ids).logits, copy.deepcopy(model).double()(ids, depth=3).logits)
    assert torch.equal(back.generate(ids[:1, :8], max_new_tokens=12, do_sample=False),
                       model.generate(ids[:1, :8], max_new_tokens=12, depth=3))


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_recurrent_lora_equals_recursion_on_merged_weights(arch):
    """Plain LoRA on the recurrent layer (recurrent_lora; on Phi-3 it wraps the fused modules, and each
    slice's low-rank path adds its rows of the LoRA update) is the recursion on a layer with B A merged in."""
    from test_heal import merge_lora_layer

    model = family_model(arch, recurrent_lora=True, lora_rank=2)
    plain = family_model(arch, lora_rank=2)
    randomize_trainables(model, seed=5, scale=0.2)
    plain.load_state_dict(model.state_dict(), strict=False)  # everything but the recurrent LoRA
    model.double(), plain.double()
    merge_lora_layer(model.recurrent.layer, plain.recurrent.layer)
    ids = tokens()
    with torch.no_grad():
        for depth in (1, 3):
            assert_same_in_float64(model(ids, depth=depth).logits, plain(ids, depth=depth).logits)
        assert (model(ids, depth=3).logits - family_model(arch, lora_rank=2).double()(ids, depth=3).logits).abs().max() > 1e-3


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_heal_model_equals_hugging_face_on_its_kept_layers_with_merged_lora(arch):
    from test_heal import merge_lora

    model = family_model(arch, heal_layers=2, lora_rank=2).double()  # LoRA B randomised too; float64: any CPU (#43)
    ref = hf_truncated(family_base(arch).double(), model.config.kept_layers(TINY["num_hidden_layers"]))
    merge_lora(model, ref.model.layers)
    ids = tokens()
    with torch.no_grad():
        assert_same_in_float64(model(ids).logits, ref(ids, use_cache=False).logits)


@pytest.mark.equivalence
@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_cached_decoding_equals_recomputing_under_per_token_exit_decisions(arch):
    """Adaptive depth through HF's own layers: stopped positions lend their last keys and values to the
    later steps (past the sliding window of 8 here), cached or recomputed alike."""
    model = family_model(arch).double()  # float64: the comparison holds on any CPU
    ids = tokens(batch=2, n=14)
    decided = torch.randint(1, 6, ids.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, depth=5, exit_steps=decided)
        cache = model.new_cache(5)
        parts = [model(ids[:, :6], depth=5, cache=cache, exit_steps=decided[:, :6])]
        parts += [model(ids[:, t:t + 1], depth=5, cache=cache, exit_steps=decided[:, t:t + 1]) for t in range(6, 14)]
    assert_same_in_float64(torch.cat([p.logits for p in parts], 1), full.logits)
    assert (full.logits - model(ids, depth=5).logits).abs().max() > 1e-3  # the decisions matter
