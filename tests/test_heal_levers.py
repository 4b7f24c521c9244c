"""The heal path's levers (issue #42). Full fine-tuning of chosen kept layers of a heal model (`tune_layers`):
W + delta on the frozen weights. A fresh one is the heal model exactly; training moves the tuned layers' weights and nothing else of the
base; the pruned baseline still runs the base's weights; adapters round-trip; the plain export is the base's layers
with the deltas added and the other layers' LoRA merged (checked against Hugging Face's own model in float64).
LoRA rank by layer (`lora_ranks`): each kept layer its rank at the same alpha / r, round trips and plain export."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY, assert_same_in_float64, randomize_trainables, save_tiny_base, tiny_base, tiny_tokenizer, write_corpus
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model
from ouroboros_lm.adapter import load_adapter, save_adapter
from ouroboros_lm.data import build_corpus
from ouroboros_lm.export import export_plain
from ouroboros_lm.train import TrainConfig, train
from ouroboros_lm.tuning import tuned_parameters
from test_families import hf_truncated
from test_plain_export import merged_reference

KEEP = (0, 1, 3, 5, 6, 7)  # of the tiny base's 8
TUNE = (1, 5, 7)  # a prelude layer, the middle (recurrent) layer, a coda layer
HEAL = dict(keep_layers=KEEP, heal_layers=1, lora_rank=2, lora_alpha=4.0, rank=4, style_dim=16, controller_hidden=24,
            n_prelude=2, recurrent_layer=4, n_coda=2)
IDS = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(3))


def heal(base=None, **overrides) -> OuroborosModel:
    return OuroborosModel.from_base(base if base is not None else tiny_base(), OuroborosConfig(**{**HEAL, **overrides}))


def reference(base: str, model: OuroborosModel):
    """Independent of our code: Hugging Face's own model on the kept layers, in float64, with each other layer's PEFT
    update (scaling * B A, at its own rank) added to its projection (test_plain_export's reference) and each tuned
    tensor's delta added."""
    ref = merged_reference(base, model, list(KEEP))
    mine = list(model.prelude) + [model.recurrent.layer] + list(model.coda)
    with torch.no_grad():
        for layer, target in zip(mine, ref.model.layers):
            for name, p in layer.named_parameters():
                if name.endswith(".delta"):  # <module>.parametrizations.<tensor>.0.delta
                    module, tensor = name.split(".parametrizations.")
                    getattr(target.get_submodule(module), tensor.split(".")[0]).add_(p.double())
    return ref


def test_config_places_the_tuned_layers_and_takes_their_lora_away():
    cfg = OuroborosConfig(**HEAL, tune_layers=TUNE)
    assert cfg.recurrent_layer == 5 and cfg.n_prelude == 3 and cfg.n_coda == 2  # keep 0,1,3 | 5 | 6,7
    assert cfg.tuned_positions() == {"prelude": [1], "block": [0], "coda": [1]}
    assert cfg.lora_layers() == {"prelude": [0, 2], "coda": [0]}
    assert not cfg.lora_on_recurrent_layer


@pytest.mark.parametrize("overrides, message", [
    ({"tune_layers": (1, 2)}, "2 is not kept"),
    ({"tune_layers": (5, 1)}, "sorted and without duplicates"),
    ({"tune_layers": (1,), "heal_layers": 0, "keep_layers": None}, "needs heal_layers 1 and keep_layers"),
])
def test_tune_layers_that_cannot_be_built_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        OuroborosConfig(**{**HEAL, **overrides})


@pytest.mark.equivalence
def test_a_fresh_tuned_model_is_the_heal_model_and_trains_only_deltas_and_lora(tokens):
    plain, tuned = heal().eval(), heal(tune_layers=TUNE).eval()
    with torch.no_grad():
        assert torch.equal(tuned(tokens).logits, plain(tokens).logits)  # deltas are zero at init
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    deltas = tuned_parameters(tuned)
    assert set(deltas) <= set(trainable) and all(".lora_" in n for n in set(trainable) - set(deltas))
    per_layer = sum(p.numel() for p in tiny_base().model.layers[0].parameters())
    assert sum(p.numel() for p in deltas.values()) == len(TUNE) * per_layer  # every weight of each tuned layer
    lora_layers = {n.split(".self_attn")[0].split(".mlp")[0] for n in trainable if ".lora_" in n}
    assert lora_layers == {"prelude.0", "prelude.2", "coda.0"}  # the tuned ones carry no LoRA
    breakdown = tuned.trainable_parameter_breakdown()
    assert breakdown["tuned_layers"] == len(TUNE) * per_layer
    assert breakdown["total"] == tuned.num_trainable_parameters()


@pytest.mark.equivalence
def test_training_moves_the_tuned_weights_at_their_own_rate_and_keeps_the_base(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    corpus = build_corpus([str(write_corpus(tmp_path / "text", n_docs=12))], tiny_tokenizer(), seq_len=32,
                          heldout_fraction=0.2)
    model = heal(load_base_model(base), tune_layers=TUNE)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if ".original" in n or
                (not p.requires_grad and ".lora_" not in n)}
    with torch.no_grad():
        floor = model.eval()(IDS, baseline=True).logits
    tc = TrainConfig(steps=3, batch_size=2, lr=1e-2, tune_lr=1e-3, warmup_steps=0, log_every=3, eval_every=3,
                     eval_blocks=2, save_every=3, progress=False, depths=(1,))
    train(model, corpus, tmp_path / "run", tc)
    # Adam's first step moves every weight with a gradient by its group's lr exactly: the deltas moved at tune_lr
    # (1e-3 a step, 3 steps), not at the LoRA's 1e-2
    biggest = max(p.abs().max().item() for p in tuned_parameters(model).values())
    assert 0.9e-3 <= biggest <= 3.5e-3
    for n, p in model.named_parameters():
        if n in original:
            assert torch.equal(p, original[n]), n  # the base's weights are never written
    assert all(p.abs().max() > 0 for p in tuned_parameters(model).values())
    with torch.no_grad():  # the pruned baseline runs the base's weights, whatever was tuned
        assert torch.equal(model.eval()(IDS, baseline=True).logits, floor)


def test_an_adapter_of_a_tuned_model_round_trips_and_stores_deltas_not_base_weights(tmp_path, tokens):
    base = save_tiny_base(tmp_path / "base")
    model = heal(load_base_model(base), tune_layers=TUNE)
    randomize_trainables(model, scale=0.05)
    save_adapter(model, tmp_path / "adapter")
    back = load_adapter(tmp_path / "adapter").eval()
    assert back.config.tune_layers == TUNE
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model.eval()(tokens).logits)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert not any(n.endswith(".original") for n in names)
    assert sum(n.endswith(".delta") for n in names) == len(tuned_parameters(model))


@pytest.mark.equivalence
def test_plain_export_is_the_base_layers_plus_deltas_and_merged_lora(tmp_path):
    """Against `reference`, Hugging Face's own model with the deltas and LoRA added in float64; the baseline export
    is the base's layers alone."""
    base = save_tiny_base(tmp_path / "base")
    model = heal(load_base_model(base), tune_layers=TUNE)
    randomize_trainables(model, scale=0.05)
    save_adapter(model, tmp_path / "adapter")
    ref = reference(base, model)
    folder = export_plain(tmp_path / "adapter", tmp_path / "plain", dtype=torch.float64)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        assert_same_in_float64(plain(IDS).logits, ref(IDS, use_cache=False).logits)
    baseline = export_plain(tmp_path / "adapter", tmp_path / "baseline", dtype=torch.float64, baseline=True)
    floor = hf_truncated(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval(), list(KEEP))
    with torch.no_grad():  # the baseline export: the base's weights, no delta
        assert_same_in_float64(AutoModelForCausalLM.from_pretrained(baseline, dtype=torch.float64)(IDS).logits,
                               floor(IDS, use_cache=False).logits)


@pytest.mark.equivalence
def test_a_tuned_model_exports_as_our_model_type_too(tmp_path, tokens):
    """`--format ouroboros` (remote code + this package) keeps the deltas: the folder computes what the model does."""
    from conftest import round_trip_and_export

    over = {k: v for k, v in HEAL.items() if k not in ("rank", "style_dim", "controller_hidden", "n_prelude",
                                                      "recurrent_layer", "n_coda")}
    model, loaded, _ = round_trip_and_export(tmp_path, tokens, depth=None, **over, tune_layers=TUNE)
    assert loaded.config.tune_layers == TUNE


RANKS = (2, 4, 1, 3, 2, 5)  # one per kept layer (KEEP's order)


def test_lora_ranks_give_each_kept_layer_its_rank_at_the_same_scale(tokens):
    from peft.tuners.lora import LoraLayer

    from ouroboros_lm.peft_lora import adaptation_parameter_count

    model = heal(lora_ranks=RANKS).eval()
    layers = list(model.prelude) + [model.recurrent.layer] + list(model.coda)
    for layer, r in zip(layers, RANKS):
        wrapped = [m for m in layer.modules() if isinstance(m, LoraLayer)]
        assert len(wrapped) == 7
        for m in wrapped:
            assert m.r["default"] == r and m.lora_A["default"].weight.shape[0] == r
            assert m.scaling["default"] == pytest.approx(HEAL["lora_alpha"] / HEAL["lora_rank"])
    count = adaptation_parameter_count(model.config, model.coda[0], TINY["hidden_size"])
    assert model.num_trainable_parameters() == count == model.trainable_parameter_breakdown()["total"]
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, heal().eval()(tokens).logits)  # B = 0: the heal model at init
    with pytest.raises(ValueError, match="as many ranks as kept layers"):
        OuroborosConfig(**{**HEAL, "lora_ranks": RANKS[:-1]})


@pytest.mark.equivalence
def test_per_layer_ranks_with_tuned_layers_round_trip_and_export_plain(tmp_path, tokens):
    """Both levers at once: the tuned layers' ranks are ignored, the others' LoRA merges at its own rank."""
    base = save_tiny_base(tmp_path / "base")
    model = heal(load_base_model(base), tune_layers=TUNE, lora_ranks=RANKS)
    randomize_trainables(model, scale=0.05)
    save_adapter(model, tmp_path / "adapter")
    back = load_adapter(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model.eval()(tokens).logits)
    ref = reference(base, model)
    folder = export_plain(tmp_path / "adapter", tmp_path / "plain", dtype=torch.float64)
    with torch.no_grad():
        assert_same_in_float64(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)(IDS).logits,
                               ref(IDS, use_cache=False).logits)


def test_cut_neighbours_and_last_kept_name_the_layers_the_levers_train():
    from ouroboros_lm.tuning import cut_neighbours, last_kept

    keep = [0, 1, 2, 8, 9, 10, 11, 20, 21, 22, 23, 24, 27, 28, 29]  # configs/half-layers.yaml's 15 planned layers
    assert cut_neighbours(keep, 30) == (2, 8, 11, 20, 24, 27)
    assert cut_neighbours([3, 4, 5], 10) == (3, 5)  # the base's own ends are no cut; a kept layer 0 or L-1 is not
    assert cut_neighbours([0, 1, 2, 3], 4) == ()  # nothing removed, nothing beside a cut
    assert cut_neighbours([5], 10) == (5,)
    assert last_kept(keep, 3) == (27, 28, 29) and last_kept([4, 1, 9], 2) == (4, 9) and last_kept(keep, 0) == ()
