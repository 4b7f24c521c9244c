"""Adapting the outer layers (PEFT LoRA on the coda / prelude tail), the recurrent block's input
injection and anchored state scale, and the Controller's conditioning options (mean_and_token pooling)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import (TINY, TINY_SPLIT, assert_equivalent, assert_same_in_float64, equivalence_tolerance, randomize_trainables,
                      tiny_base, tiny_ouroboros)
from ouroboros_lm import OuroborosConfig, OuroborosModel
from ouroboros_lm.peft_lora import adaptation_parameter_count
from ouroboros_lm.adapter import AdapterError, load_adapter, save_adapter
from ouroboros_lm.memory import trainable_parameter_count
from test_core import hf_pruned

pytestmark = pytest.mark.usefixtures("one_thread")

OUTER = dict(lora_rank=4, prelude_lora_layers=1)
INJECTIONS = [dict(injection="linear"), dict(injection="diagonal")]
ANCHORED = dict(state_scale="anchored", injection="linear")


def test_fresh_outer_adaptation_is_exactly_neutral(tokens):
    """A fresh adapter with coda LoRA and prelude-tail LoRA (or input injection) gives exactly the
    loss of one without them (PEFT's B starts at zero; the injection's weights too)."""
    plain = tiny_ouroboros("llama")
    for options in [OUTER] + INJECTIONS:
        adapted = tiny_ouroboros("llama", **options)
        with torch.no_grad():
            for depth in (1, 3):
                assert adapted(tokens, labels=tokens, depth=depth).loss.item() == \
                    plain(tokens, labels=tokens, depth=depth).loss.item(), options


def merged_base(model: OuroborosModel, seed: int = 0):
    """An independent computation of the adapted model: the tiny base with W + (alpha/r) B A written
    into the adapted layers' weights, no LoRA modules at all (in the model's dtype)."""
    base = tiny_base("llama", seed).to(next(model.parameters()).dtype)
    cfg = model.config
    kept = cfg.kept_layers(TINY["num_hidden_layers"])
    scale = cfg.lora_alpha / cfg.lora_rank
    with torch.no_grad():
        for part, offset in (("prelude", 0), ("coda", cfg.n_prelude + 1)):
            for i, layer in enumerate(getattr(model, part)):
                target = base.model.layers[kept[offset + i]]
                for name, module in layer.named_modules():
                    if hasattr(module, "lora_A") and "default" in module.lora_A:
                        delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
                        target.get_submodule(name).weight.add_(scale * delta)
    return base


@pytest.mark.equivalence
def test_outer_lora_equals_merged_weights(tokens):
    """Trained (here: random) LoRA gives the logits of a base whose weights have the
    low-rank updates merged in, with the same recurrent block."""
    model = tiny_ouroboros("llama", **OUTER)
    randomize_trainables(model, scale=0.3)
    model.double()  # float64: the comparison holds on any CPU
    merged = OuroborosModel.from_base(merged_base(model), OuroborosConfig(**TINY_SPLIT)).double().eval()
    recurrent = {n: p for n, p in model.recurrent.state_dict().items()}
    merged.recurrent.load_state_dict(recurrent)
    with torch.no_grad():
        a = model(tokens, depth=3).logits
        b = merged(tokens, depth=3).logits
        plain = tiny_ouroboros("llama").double()
        plain.recurrent.load_state_dict(recurrent)
        c = plain(tokens, depth=3).logits
    assert_same_in_float64(a, b)
    assert (a - c).abs().max().item() > 1e-2  # the adaptation does change the model


@pytest.mark.equivalence
def test_baseline_ignores_the_adaptation_and_restores_it(tokens):
    """The pruned baseline is the base's own pruned stack (equal to Hugging Face's) even when the
    outer layers are adapted; afterwards the adapted model and its trainable flags are unchanged."""
    model = tiny_ouroboros("llama", **OUTER)
    randomize_trainables(model, scale=0.3)
    model.double()  # float64: the comparison holds on any CPU
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(tokens, labels=tokens, depth=2).loss.item()
        ours = model(tokens, labels=tokens, baseline=True).loss
        after = model(tokens, labels=tokens, depth=2).loss.item()
        ref = hf_pruned(tiny_base("llama").double(), model.config.kept_layers(TINY["num_hidden_layers"]))
        hf = ref(tokens, labels=tokens, use_cache=False).loss
    assert_equivalent(ours, hf)  # our loss is float32
    assert before == after and abs(before - ours.item()) > 1e-3
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_outer_adaptation_round_trips_and_is_a_new_format(tmp_path, tokens):
    model = tiny_ouroboros("llama", **OUTER)
    randomize_trainables(model, scale=0.3)
    save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["format_version"] == 2
    assert meta["trainable_parameters"]["outer_lora"] > 0
    loaded = load_adapter(tmp_path / "a", base=tiny_base("llama")).eval()
    with torch.no_grad():
        assert torch.equal(model(tokens, depth=3).logits, loaded(tokens, depth=3).logits)
        assert torch.equal(model(tokens, baseline=True).logits, loaded(tokens, baseline=True).logits)
    save_adapter(tiny_ouroboros("llama"), tmp_path / "plain")  # nothing outside the recursion: readable by every release
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["format_version"] == 1
    meta["format_version"] = 3
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="reads versions 1, 2"):
        load_adapter(tmp_path / "a", base=tiny_base("llama"))


BLOCKS = [dict(block_layers=2), dict(block_layers=2, variant="static"), dict(block_layers=2, **ANCHORED),
          dict(block_layers=2, variant="none", lora_rank=2, recurrent_lora=True, recurrent_lora_steps=2)]


@pytest.mark.equivalence
@pytest.mark.parametrize("options", [OUTER, dict(pooling="mean_and_token"), ANCHORED] + INJECTIONS + BLOCKS)
def test_options_stay_causal_and_cached_decoding_equals_recomputing(options, tokens):
    """Causal, and greedy decoding with the cache gives the argmax of a full recomputation, through
    the recursion and (with a block of two layers, whose first runs once there) the pruned baseline."""
    model = tiny_ouroboros("llama", **options)
    randomize_trainables(model, scale=0.3)
    model.double()  # float64: the comparison holds on any CPU
    t = 11
    changed = tokens.clone()
    changed[:, t:] = (changed[:, t:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(tokens, depth=3).logits, model(changed, depth=3).logits
        assert_same_in_float64(a[:, :t], b[:, :t])
        for baseline in (False, True) if "block_layers" in options else (False,):
            out = model.generate(tokens[:, :8], max_new_tokens=6, depth=3, baseline=baseline)
            for i in range(8, out.shape[1]):  # every greedy token is the argmax of a full recomputation
                logits = model(out[:, :i], depth=3, baseline=baseline).logits[:, -1]
                assert torch.equal(logits.argmax(-1), out[:, i])


@pytest.mark.parametrize("options", [OUTER, dict(pooling="mean_and_token"), dict(lora_rank=3), ANCHORED] + INJECTIONS)
def test_trainable_count_from_settings_matches_the_model(options):
    model = tiny_ouroboros("llama", **options)
    base = tiny_base("llama")
    expected = trainable_parameter_count(model.config, TINY["hidden_size"]) + \
        adaptation_parameter_count(model.config, base.model.layers[0], TINY["hidden_size"])
    assert expected == model.num_trainable_parameters() == model.trainable_parameter_breakdown()["total"]


def test_training_changes_the_adapted_parameters_and_no_frozen_weight(tokens):
    model = tiny_ouroboros("llama", lora_rank=2, injection="linear")
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # two steps: LoRA's B moves first, then A
        opt.zero_grad()
        model(tokens, labels=tokens, depth=2).loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in frozen.items())
    moved = {n for n, w in trainable.items() if not torch.equal(after[n], w)}
    assert {"coda.1.self_attn.q_proj.lora_B.default.weight", "coda.1.self_attn.q_proj.lora_A.default.weight",
            "coda.0.mlp.down_proj.lora_B.default.weight", "recurrent.injection.proj.weight",
            "recurrent.injection.proj.bias"} <= moved
    assert not any(n.startswith("prelude.") for n in trainable)  # no prelude LoRA asked for


def test_bad_outer_settings_are_refused():
    with pytest.raises(ValueError, match="injection must be one of none, diagonal, linear"):
        OuroborosConfig(**{**TINY_SPLIT, "injection": "gated"})
    with pytest.raises(ValueError, match="prelude_lora_layers needs lora_rank"):
        OuroborosConfig(**{**TINY_SPLIT, "prelude_lora_layers": 1})


@pytest.mark.equivalence
def test_input_injection_recalls_the_prelude_output_at_every_step(tokens):
    """With injection, each step's layer reads h + W_e e + b_e (e: the prelude's output), and the
    gate mixes against the state h itself: equal to the step computed by hand."""
    model = tiny_ouroboros("llama", injection="linear")
    randomize_trainables(model, scale=0.3)
    model.double()  # float64: the comparison holds on any CPU
    rec = model.recurrent
    from ouroboros_lm.layers import decoder_layer

    with torch.no_grad():
        h, ctx, _ = model.embed(tokens)
        e = model.run_layers("prelude", h, ctx)
        h = e
        for s in range(3):
            x = h + e @ rec.injection.proj.weight.T + rec.injection.proj.bias
            d = rec.controller.from_hidden(h, s, "prefix_mean")
            h_new = decoder_layer(rec.layer, x, ctx, project=rec.bases.modulated(d), norm_weights=rec.step_norms(s, h.dtype))
            h = rec.gate(h_new, h)
        reference = model.head(model.run_layers("coda", h, ctx)).logits
        assert_same_in_float64(model(tokens, depth=3).logits, reference)


@pytest.mark.equivalence
def test_anchored_state_scale_holds_each_step_at_step_one_rms_times_its_factor(tokens):
    """Anchored, every token's state after step s >= 2 has the RMS of its state after step 1 times
    exp(a_s) (measured on the states themselves), the direction of the free step's output, and depth 1
    is exactly the free model's."""
    free = tiny_ouroboros("llama", injection="linear")
    anchored = tiny_ouroboros("llama", **ANCHORED)
    randomize_trainables(free, scale=0.3)
    randomize_trainables(anchored, scale=0.3)  # the same draws for the shared parts, then log_scale
    shared = {n: p for n, p in anchored.recurrent.state_dict().items() if not n.startswith("state_scale.")}
    free.recurrent.load_state_dict(shared)
    free.double(), anchored.double()  # float64: the comparison holds on any CPU
    a = anchored.recurrent.state_scale.log_scale.detach()
    assert a.abs().min() > 0  # random factors, so the check below is not of exp(0) = 1
    states = []
    with torch.no_grad():
        torch.testing.assert_close(anchored(tokens, depth=1).logits, free(tokens, depth=1).logits, atol=0, rtol=0)
        rec = anchored.recurrent
        h, ctx, _ = anchored.embed(tokens)
        e = anchored.run_layers("prelude", h, ctx)
        rec(e, ctx, 4, observe=lambda s, h: states.append(h.clone()))
        rms = [h.pow(2).mean(-1).sqrt() for h in states]
        # the rescale runs in float32 and its RMS holds an eps (1e-6, as RMSNorm's): relative errors up to eps / rms^2
        eps_share = 1e-6 / min(r.min().item() for r in rms) ** 2
        for s in range(1, 4):
            torch.testing.assert_close(rms[s], rms[0] * a[s].exp(), rtol=eps_share,
                                       atol=equivalence_tolerance(rms[0], dtype=torch.float32))
        # the direction is the free step's from the same state
        h1 = states[0]
        scale, rec.state_scale = rec.state_scale, None  # the same step without the rescale
        try:
            out = rec.step(h1, 1, ctx, None, e=e)
        finally:
            rec.state_scale = scale
        assert_same_in_float64(torch.nn.functional.normalize(states[1], dim=-1), torch.nn.functional.normalize(out, dim=-1))
        assert (rms[3] / rms[0]).sub(1).abs().max() > 1e-2  # the factors act (it is not a plain renorm)


@pytest.mark.equivalence
def test_anchored_state_scale_round_trips_and_exports(tmp_path, tokens):
    """Its factors are saved, loaded and exported with the rest of the recurrent block."""
    from conftest import round_trip_and_export

    model, loaded, _ = round_trip_and_export(tmp_path, tokens, **ANCHORED)
    assert torch.equal(loaded.recurrent.state_scale.log_scale, model.recurrent.state_scale.log_scale)
    with pytest.raises(ValueError, match="state_scale must be one of free, anchored"):
        OuroborosConfig(**{**TINY_SPLIT, "state_scale": "clipped"})


def test_mean_and_token_reads_both_views(tokens):
    """Changing an earlier token changes a position's prefix mean only; changing the position's own
    state changes both: the Controller's output must move in both cases."""
    model = tiny_ouroboros("llama", pooling="mean_and_token")
    randomize_trainables(model, scale=0.3)
    ctrl = model.recurrent.controller
    h = torch.randn(1, 6, TINY["hidden_size"])
    from ouroboros_lm.controller import pool

    with torch.no_grad():
        base = ctrl(pool(h, "mean_and_token"), 0)[0, -1]
        h2 = h.clone()
        h2[0, 0] += 1.0  # earlier token: the last position's mean changes, its own state does not
        assert (ctrl(pool(h2, "mean_and_token"), 0)[0, -1] - base).abs().max() > 1e-3
        assert torch.equal(pool(h2, "mean_and_token")[0, -1, TINY["hidden_size"]:], h[0, -1])


@pytest.mark.equivalence
def test_export_of_an_adapted_model_equals_our_forward(tmp_path, tokens):
    """The Hugging Face folder of a model with coda LoRA and coda norms loads with the same weights
    (PEFT's modules rebuilt from the config) and gives our logits, at depth and as the pruned stack."""
    from transformers import AutoModelForCausalLM

    from conftest import save_tiny_base
    from ouroboros_lm import load_base_model
    from ouroboros_lm.export import export_hf

    base = save_tiny_base(tmp_path / "base")
    model = OuroborosModel.from_base(load_base_model(base), OuroborosConfig(**TINY_SPLIT, **OUTER), base_name=base)
    randomize_trainables(model, scale=0.3)
    save_adapter(model, tmp_path / "adapter")
    export_hf(tmp_path / "adapter", tmp_path / "hf", depth=3)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trainable = {n.removeprefix("model.") for n, p in hf.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}  # fine-tunable as it was
    hf.double(), model.eval().double()  # float64: the comparison holds on any CPU
    with torch.no_grad():
        assert_same_in_float64(hf(tokens).logits, model(tokens, depth=3).logits)
        assert_same_in_float64(hf(tokens, baseline=True).logits, model(tokens, baseline=True).logits)
