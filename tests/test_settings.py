"""Settings are declared once (a dataclass field with its help, range and role) and everything
else is derived from them: flags, validation, sweep keys, what an adapter fixes."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest

from conftest import tiny_base, tiny_ouroboros
from ouroboros_lm import OuroborosConfig, RecursionPolicy, TrainConfig, load_adapter, save_adapter
from ouroboros_lm.adapter import CONFIG_NAME, STRUCTURAL
from ouroboros_lm.cli import build_parser
from ouroboros_lm.evaluate import EvalConfig
from ouroboros_lm.export import ExportConfig
from ouroboros_lm.generate import GenerateConfig
from ouroboros_lm.harness import HarnessConfig
from ouroboros_lm.settings import REQUIRED, add_flags, fields, from_flags, overrides, setting, structural_fields
from ouroboros_recipes.report import ReportConfig
from ouroboros_recipes.sweep import SweepConfig, grid_keys


@dataclass
class Extended(OuroborosConfig):
    warp: float = setting(1.5, "a knob added by a user", low=0.0, high=2.0, structural=True)
    laps: int = setting(3, "another one", low=1, high=9)


def test_a_new_field_gets_its_flag_sweep_key_validation_and_role_from_the_dataclass_alone():
    parser = argparse.ArgumentParser()
    add_flags(parser, Extended)
    cfg = from_flags(Extended, parser.parse_args(["--warp", "0.5", "--rank", "8"]))
    assert (cfg.warp, cfg.laps, cfg.rank) == (0.5, 3, 8)
    assert "a knob added by a user (in [0.0, 2.0])" in parser.format_help()
    assert {"warp", "laps"} <= grid_keys(Extended, TrainConfig)
    assert "warp" in structural_fields(Extended) and "laps" not in structural_fields(Extended)
    with pytest.raises(ValueError, match=r"warp must be in \[0.0, 2.0\]; got 3.0"):
        Extended(warp=3.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--laps", "10"])


def subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command,cls", [("convert", OuroborosConfig), ("convert", RecursionPolicy),
                                         ("train", TrainConfig), ("eval", EvalConfig),
                                         ("generate", GenerateConfig), ("export", ExportConfig),
                                         ("harness", HarnessConfig), ("sweep", SweepConfig), ("report", ReportConfig)])
def test_every_setting_is_a_flag_with_its_default(command, cls):
    dests = {a.dest: a for a in subcommand(command)._actions}
    for f, _ in fields(cls):
        if f.metadata.get("cli", True):
            assert f.name in dests, f.name
            if f.default is REQUIRED:  # a required flag or a positional argument
                assert dests[f.name].required or not dests[f.name].option_strings, f.name
                continue
            default = dests[f.name].default
            assert (list(default) if isinstance(default, tuple) else default) == (
                list(f.default) if isinstance(f.default, tuple) else f.default)


@dataclass
class Job:
    sources: tuple[str, ...] = setting(REQUIRED, "what to read", positional=True)
    out: str = setting(REQUIRED, "where to write")
    depth: int | str | None = setting(None, "a depth, or auto", low=1, words=("auto",))
    paths: tuple[str, ...] | None = setting(None, "more paths")
    fast: bool = setting(False, "go fast", exclusive="pace")
    slow: bool = setting(False, "go slow", exclusive="pace")


def test_positional_required_word_list_and_exclusive_settings_come_from_the_fields():
    parser = argparse.ArgumentParser()
    add_flags(parser, Job)
    job = from_flags(Job, parser.parse_args(["a", "b,c", "--out", "o", "--depth", "auto", "--paths", "x,1", "y",
                                             "--fast"]))
    assert (job.sources, job.out, job.depth, job.paths, job.fast, job.slow) == (("a", "b,c"), "o", "auto",
                                                                              ("x,1", "y"), True, False)
    assert from_flags(Job, parser.parse_args(["a", "--out", "o", "--depth", "3"])).depth == 3
    for bad in (["a"], ["--out", "o"], ["a", "--out", "o", "--fast", "--slow"], ["a", "--out", "o", "--depth", "0"],
                ["a", "--out", "o", "--depth", "deep"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_override_flags_leave_only_what_was_given_and_show_the_file_s_values():
    parser = argparse.ArgumentParser()
    add_flags(parser, TrainConfig, prefix="train", defaults={"steps": 70, "depths": (1, 32)})
    add_flags(parser, OuroborosConfig, prefix="model")
    args = parser.parse_args(["--train.steps", "5", "--train.depths", "1,2", "--model.gate", "false"])
    assert overrides(TrainConfig, args, "train") == {"steps": 5, "depths": (1, 2)}
    assert overrides(OuroborosConfig, args, "model") == {"gate": False}
    assert overrides(TrainConfig, parser.parse_args([]), "train") == {}
    help_text = " ".join(parser.format_help().split())
    assert "--train.steps STEPS optimizer steps (in [1, 1000000000]) (default: 70)" in help_text
    assert "(default: 1,32)" in help_text and "--model.gate {true,false}" in help_text
    for bad in (["--train.steps", "0"], ["--model.gate", "maybe"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_the_adapter_fixes_exactly_the_structural_fields():
    assert set(STRUCTURAL) == {"n_prelude", "recurrent_layer", "n_coda", "rank", "alpha", "variant", "gate",
                               "step_norm", "pooling", "style_dim", "controller_hidden", "max_depth", "halter",
                               "lora_rank", "lora_alpha", "prelude_lora_layers", "recurrent_lora", "recurrent_lora_steps",
                               "heal_layers", "injection", "state_scale", "block_layers", "keep_layers", "loop_start",
                               "tune_layers", "lora_ranks"}


def older_adapter(tmp_path, edit):
    """(a tiny model, its adapter folder rewritten as an earlier release wrote it): no recursion_policy
    block, `max_steps` for `max_depth`, and `edit(architecture dict)` for the rest."""
    model = tiny_ouroboros("llama")
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    del meta["recursion_policy"]
    cfg = meta["ouroboros_config"]
    cfg["max_steps"] = cfg.pop("max_depth")
    edit(cfg)
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(meta))
    return model, tmp_path / "ad"


def test_adapters_written_before_the_split_of_settings_still_load(tmp_path):
    """Format-1 adapters of the first releases kept training depths, checkpointing and the seed in
    the model config; they load, the largest training depth becoming default_depth."""
    def first_release(cfg):
        cfg["seed"] = cfg.pop("init_seed")
        cfg.update(depths=[2, 4, 6], checkpoint_from_depth=8)

    model, folder = older_adapter(tmp_path, first_release)
    loaded = load_adapter(folder, base=tiny_base("llama"))
    assert loaded.policy.default_depth == 6 and loaded.config.init_seed == 0 and loaded.config.max_depth == 16
    assert all((loaded.trainable_state_dict()[k] == v).all() for k, v in model.trainable_state_dict().items())


def previous_release_adapter(tmp_path, **config):
    """An adapter as the release before the policy block wrote it: the inference knobs, `max_steps`
    and the retired features' fields inside the architecture's dict, no recursion_policy."""
    def previous_release(cfg):
        cfg["coda_lora_rank"], cfg["coda_lora_alpha"] = cfg.pop("lora_rank"), cfg.pop("lora_alpha")
        cfg.update({**dict(default_depth=5, step_damping=0.5, trained_depth=4, step_dropout=0.0, coda_norms=False,
                           coda_lora_layers=0), **config})

    return older_adapter(tmp_path, previous_release)


def test_adapters_of_the_release_before_the_policy_block_load_with_their_policy(tmp_path):
    model, folder = previous_release_adapter(tmp_path)
    loaded = load_adapter(folder, base=tiny_base("llama"))
    assert loaded.policy == RecursionPolicy(default_depth=5, step_damping=0.5, trained_depth=4)
    assert loaded.config == model.config
    assert load_adapter(folder, base=tiny_base("llama"), step_damping=0.25).policy.step_damping == 0.25
    save_adapter(loaded, tmp_path / "again")  # written anew: the policy in its own block
    meta = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    assert meta["recursion_policy"]["trained_depth"] == 4 and "trained_depth" not in meta["ouroboros_config"]


@pytest.mark.parametrize("retired", [dict(coda_norms=True), dict(coda_lora_layers=1)])
def test_an_adapter_that_used_a_retired_feature_is_refused_with_the_reason(tmp_path, retired):
    _, folder = previous_release_adapter(tmp_path, **retired)
    with pytest.raises(ValueError, match=f"{next(iter(retired))}=.*retired after ouroboros-lm 0.1.0"):
        load_adapter(folder, base=tiny_base("llama"))
