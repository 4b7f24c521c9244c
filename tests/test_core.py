"""The core model: label alignment with Hugging Face, causality, init, SVD, size, freezing,
validation. Tiny random models built from configs (see conftest.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig, Qwen2Config

from conftest import (CONFIGS, TINY, TINY_SPLIT, assert_equivalent, assert_same_in_float64, randomize_trainables, tiny_base,
                      tiny_ouroboros)
from ouroboros_lm import OuroborosConfig, OuroborosModel, RecursionPolicy
from ouroboros_lm.config import TARGETS
from ouroboros_lm.svd_bases import mean_residual


def hf_pruned(base, keep):
    """Hugging Face's own model with the removed layers deleted."""
    ref = copy.deepcopy(base)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [ref.config.layer_types[i] for i in keep]
    return ref


# ---------------------------------------------------------------- 1. label alignment
@pytest.mark.equivalence
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_baseline_loss_equals_hugging_face(arch, tokens):
    base = tiny_base(arch).double()  # float64: the comparison holds on any CPU
    cfg = OuroborosConfig(**TINY_SPLIT)
    ref = hf_pruned(base, cfg.kept_layers(TINY["num_hidden_layers"]))
    model = OuroborosModel.from_base(base, cfg).double().eval()
    with torch.no_grad():
        hf = ref(tokens, labels=tokens, use_cache=False)
        ours = model.forward_baseline(tokens, labels=tokens)
    assert_equivalent(ours.loss, hf.loss)  # our loss is float32
    assert_same_in_float64(ours.logits, hf.logits)


@pytest.mark.equivalence
def test_labels_are_shifted_once(tokens):
    """Loss equals an independent next-token cross-entropy: logits[t] scored against ids[t+1]."""
    model = tiny_ouroboros("llama")
    with torch.no_grad():
        out = model(tokens, labels=tokens, depth=2)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, TINY["vocab_size"]), tokens[:, 1:].reshape(-1))
    assert_equivalent(out.loss, manual)
    labels = tokens.clone()
    labels[:, :10] = -100  # ignored positions drop out of the mean
    with torch.no_grad():
        masked = model(tokens, labels=labels, depth=2).loss
    manual = torch.nn.functional.cross_entropy(out.logits[:, 9:-1].reshape(-1, TINY["vocab_size"]), tokens[:, 10:].reshape(-1))
    assert_equivalent(masked, manual)


@pytest.mark.equivalence
def test_sliding_window_matches_hugging_face(tokens):
    torch.manual_seed(0)
    cfg = MistralConfig(**TINY, sliding_window=8)
    cfg._attn_implementation = "eager"
    base = AutoModelForCausalLM.from_config(cfg).double().eval()  # float64: the comparison holds on any CPU
    ours_cfg = OuroborosConfig(**TINY_SPLIT)
    ref = hf_pruned(base, ours_cfg.kept_layers(8))
    model = OuroborosModel.from_base(base, ours_cfg).eval()
    with torch.no_grad():
        assert_equivalent(model.forward_baseline(tokens, labels=tokens).loss, ref(tokens, labels=tokens, use_cache=False).loss)


@pytest.mark.equivalence
def test_right_padding_does_not_change_real_positions(tokens):
    model = tiny_ouroboros("qwen2")
    randomize_trainables(model)
    model.double()  # float64: the comparison holds on any CPU
    mask = torch.ones_like(tokens)
    mask[1, 16:] = 0
    with torch.no_grad():
        full = model(tokens[1:, :16], depth=3).logits
        padded = model(tokens, attention_mask=mask, depth=3).logits[1:, :16]
    assert_same_in_float64(padded, full)


# ---------------------------------------------------------------- 2. causality
CAUSAL = [(v, p, g) for v in ("controller", "static", "none") for p in ("prefix_mean", "token") for g in (True, False)]


@pytest.mark.equivalence
@pytest.mark.parametrize("variant,pooling,gate", CAUSAL)
def test_future_tokens_do_not_change_past_logits(variant, pooling, gate, tokens):
    model = tiny_ouroboros("llama", variant=variant, pooling=pooling, gate=gate)
    randomize_trainables(model)
    model.double()  # float64: the comparison holds on any CPU
    t = 13
    changed = tokens.clone()
    changed[:, t:] = (changed[:, t:] + 1 + torch.arange(changed.shape[1] - t)) % TINY["vocab_size"]
    with torch.no_grad():
        a = model(tokens, depth=4).logits
        b = model(changed, depth=4).logits
    assert_same_in_float64(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-3  # the change did reach the model


def test_sequence_mean_leaks_future_tokens(tokens):
    """The published code's whole-sequence mean: past logits DO depend on future tokens."""
    model = tiny_ouroboros("llama", pooling="sequence_mean")
    randomize_trainables(model)
    changed = tokens.clone()
    changed[:, 13:] = (changed[:, 13:] + 7) % TINY["vocab_size"]
    with torch.no_grad():
        a = model(tokens, depth=4).logits
        b = model(changed, depth=4).logits
    assert (a[:, :13] - b[:, :13]).abs().max().item() > 1e-4


# ---------------------------------------------------------------- 3. init
@pytest.mark.equivalence
def test_controller_starts_neutral(tokens):
    ctrl = tiny_ouroboros("llama", variant="controller").double()  # float64: the comparison holds on any CPU
    static = tiny_ouroboros("llama", variant="static").double()
    none = tiny_ouroboros("llama", variant="none").double()
    h = torch.randn(2, 5, TINY["hidden_size"], dtype=torch.float64)
    assert torch.count_nonzero(ctrl.recurrent.controller(h, 3)) == 0
    with torch.no_grad():
        a, b, c = (m(tokens, depth=4).logits for m in (ctrl, static, none))
    assert torch.equal(a, b)
    assert_same_in_float64(a, c)


@pytest.mark.equivalence
def test_gate_keeps_88_percent_of_old_state():
    model = tiny_ouroboros("llama")
    h_new, h_old = torch.randn(3, 4, TINY["hidden_size"]), torch.randn(3, 4, TINY["hidden_size"])
    with torch.no_grad():
        out = model.recurrent.gate(h_new, h_old)
    keep = 0.8807970779778823  # 1 - sigmoid(-2): the specified "88% of the old state kept" at init
    assert_equivalent(out, keep * h_old + (1 - keep) * h_new)


@pytest.mark.equivalence
def test_gate_computes_the_specified_formula_with_W_g_whole():
    """g = sigmoid(W_g [h_new; h_old] + b_g), h = g h_new + (1 - g) h_old, against a direct
    computation with the whole H x 2H matrix (the module holds it as two halves)."""
    H = TINY["hidden_size"]
    gate = tiny_ouroboros("llama").recurrent.gate
    W, b = torch.randn(H, 2 * H) * 0.1, torch.randn(H)
    gate.load_joined(W, b)
    h_new, h_old = torch.randn(3, 4, H), torch.randn(3, 4, H)
    g = torch.sigmoid(torch.cat([h_new, h_old], -1) @ W.t() + b)
    with torch.no_grad():
        assert_equivalent(gate(h_new, h_old), g * h_new + (1 - g) * h_old)
    assert torch.equal(gate.joined()["proj.weight"], W) and torch.equal(gate.joined()["proj.bias"], b)


def test_step_norms_start_as_the_layers_own(tokens):
    model = tiny_ouroboros("llama")
    layer = model.recurrent.layer
    w = model.recurrent.step_norms.weight
    for s in range(w.shape[0]):
        assert torch.equal(w[s, 0], layer.input_layernorm.weight)
        assert torch.equal(w[s, 1], layer.post_attention_layernorm.weight)


# ---------------------------------------------------------------- 4. SVD
@pytest.mark.equivalence
@pytest.mark.parametrize("target", TARGETS)
def test_svd_bases_are_the_best_rank_r_approximation(target):
    base = tiny_base("qwen2")  # the bases are computed in float32 (mean_residual): so are the checks
    cfg = OuroborosConfig(**TINY_SPLIT)
    keep_copy = copy.deepcopy(base)
    model = OuroborosModel.from_base(base, cfg)
    layers = keep_copy.model.layers
    # independent: mean residual of the removed layers 2, 3, 5 against layer 4
    M = sum(getattr_path(layers[i], target).weight - getattr_path(layers[4], target).weight for i in (2, 3, 5)) / 3
    assert_equivalent(mean_residual(layers[4], [layers[i] for i in (2, 3, 5)], target), M)
    bases = model.recurrent.bases
    A, B = bases.A(target), bases.B(target)
    assert A.shape == (cfg.rank, M.shape[1]) and B.shape == (M.shape[0], cfg.rank)
    S = torch.linalg.svdvals(M.double())
    expected = S[cfg.rank :].pow(2).sum().sqrt()
    assert_equivalent(torch.linalg.norm(M.double() - B.double() @ A.double()), expected, dtype=torch.float32)
    assert_equivalent(A @ A.t(), torch.eye(cfg.rank))  # orthonormal rows


def getattr_path(layer, target):
    from ouroboros_lm.layers import get_projection

    return get_projection(layer, target)


# ---------------------------------------------------------------- 5. size
QWEN25_3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
    num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)


def test_paper_configuration_has_9_2M_trainable_parameters():
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_3B), dtype=torch.bfloat16)
    model = OuroborosModel.from_base(base, OuroborosConfig())
    parts = model.trainable_parameter_breakdown()
    print("\nQwen2.5-3B, paper config, trainable parameters:", {k: f"{v:,}" for k, v in parts.items()})
    assert abs(parts["total"] - 9.2e6) <= 0.1e6
    assert parts["total"] == model.num_trainable_parameters()
    assert parts["gate"] == 2 * 2048 * 2048 + 2048
    assert parts["step_norms"] == 64 * 2 * 2048
    assert len(model.prelude) == 8 and len(model.coda) == 8  # 17 of 36 layers kept
    assert model.lm_head.weight is model.embed_tokens.weight  # tied embeddings stay tied


# ---------------------------------------------------------------- 6. frozen
@pytest.mark.parametrize("variant", ["controller", "static"])
def test_one_step_changes_only_trainable_parts(variant, tokens):
    model = tiny_ouroboros("qwen2", variant=variant).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(model.trainable_state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(tokens, labels=tokens, depth=3).loss.backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        if k in trainable:
            continue
        assert torch.equal(before[k], after[k]), f"frozen tensor {k} changed"
    assert any("bases.A_" in k for k in before) and any("bases.B_" in k for k in before)
    changed = {k for k in trainable if not torch.equal(before[k], after[k])}
    head = "recurrent.controller.head.weight" if variant == "controller" else "recurrent.static.vectors"
    for k in (head, "recurrent.gate.weight_new", "recurrent.gate.weight_old", "recurrent.step_norms.weight"):
        assert k in changed
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("recurrent.") or ".layer." in n)


# ---------------------------------------------------------------- 7. bad input
BAD_CONFIGS = [
    (dict(n_prelude=4, n_coda=4), "n_prelude + n_coda + block_layers"),
    (dict(recurrent_layer=1), "recurrent_layer must lie"),
    (dict(recurrent_layer=6), "recurrent_layer must lie"),
    (dict(recurrent_layer=99), "recurrent_layer must lie"),
    (dict(rank=33), "rank must be in [1, 32]"),  # k_proj is 64 -> 32
    (dict(rank=0), "rank must be in [1, 4096]"),
    (dict(variant="dynamic"), "variant must be one of"),
    (dict(pooling="max"), "pooling must be one of"),
    (dict(alpha=float("inf")), "alpha must be a finite number"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(gate_bias=float("-inf")), "gate_bias must be a finite number"),
    (dict(max_depth=10**9), "max_depth must be in [1, 1024]"),
    (dict(style_dim=10**9), "style_dim must be in [1, 65536]"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_configuration_is_refused_before_touching_weights(overrides, message):
    base = tiny_base("llama")
    n_layers = len(base.model.layers)
    with pytest.raises(ValueError) as err:
        OuroborosModel.from_base(base, OuroborosConfig(**{**TINY_SPLIT, **overrides}))
    assert message in str(err.value)
    assert len(base.model.layers) == n_layers  # nothing was removed


@pytest.mark.parametrize("policy,message", [(dict(default_depth=0), "default_depth must be in [1, 1024]"),
                                            (dict(default_depth=17), "default_depth must be an integer in [1, max_depth=16]"),
                                            (dict(trained_depth=17), "trained_depth must be in [0, max_depth=16]")])
def test_a_policy_the_architecture_cannot_run_is_refused_before_touching_weights(policy, message):
    base = tiny_base("llama")
    with pytest.raises(ValueError) as err:
        OuroborosModel.from_base(base, OuroborosConfig(**TINY_SPLIT), policy=RecursionPolicy(**policy))
    assert message in str(err.value) and len(base.model.layers) == 8


def test_bad_forward_inputs(tokens):
    model = tiny_ouroboros("llama")
    for depth in (0, 17, -1):
        with pytest.raises(ValueError, match=r"depth must be an integer in \[1, max_depth=16\]"):
            model(tokens, depth=depth)
    bad = tokens.clone()
    bad[0, 0] = TINY["vocab_size"]
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 96\]"):
        model(bad)
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(tokens, labels=tokens[:, :5])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 300, dtype=torch.long))


def test_unsupported_architecture_is_named():
    base = AutoModelForCausalLM.from_config(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel \(model_type='gpt2'\).*missing model.embed_tokens"):
        OuroborosModel.from_base(base, OuroborosConfig(n_prelude=1, recurrent_layer=2, n_coda=1, rank=4))


def test_initialisation_follows_the_seed():
    a = tiny_ouroboros("llama", seed=0)
    torch.manual_seed(1234)  # the global RNG state must not matter
    b = tiny_ouroboros("llama", seed=0)
    c = OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**{**TINY_SPLIT, "init_seed": 1}))
    sa, sb, sc = a.trainable_state_dict(), b.trainable_state_dict(), c.trainable_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["recurrent.controller.inp.weight"], sc["recurrent.controller.inp.weight"])
