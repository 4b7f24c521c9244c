"""The command line as a whole: the recipes found by entry point (never imported by the library),
a plugin that cannot load skipped, and every flag's help saying its default once."""
from __future__ import annotations

import argparse
from importlib.metadata import EntryPoint, entry_points

import pytest

from ouroboros_lm import commands
from ouroboros_lm.cli import COMMANDS, HelpFormatter, all_commands, build_parser


def test_the_recipes_are_registered_commands():
    assert {ep.name for ep in entry_points(group=commands.GROUP)} >= {"sweep", "report", "demo"}
    found = all_commands()
    assert list(found)[: len(COMMANDS)] == list(COMMANDS) and {"sweep", "report", "demo"} <= set(found)
    assert all(isinstance(c, commands.Command) for c in found.values())


def test_a_plugin_that_cannot_load_clashes_or_is_not_a_command_is_skipped_with_a_warning(monkeypatch, capsys):
    eps = [EntryPoint("broken", "no_such_module_anywhere:COMMAND", commands.GROUP),
           EntryPoint("eval", "ouroboros_recipes.commands:SWEEP", commands.GROUP),
           EntryPoint("odd", "ouroboros_recipes.commands:sweep", commands.GROUP),
           EntryPoint("sweep", "ouroboros_recipes.commands:SWEEP", commands.GROUP)]
    monkeypatch.setattr(commands, "entry_points", lambda group: eps)
    commands.registered.cache_clear()
    try:
        found = commands.registered(frozenset(COMMANDS))
    finally:
        commands.registered.cache_clear()
    assert list(found) == ["sweep"]
    err = capsys.readouterr().err
    assert "'broken'" in err and "'eval'" in err and "'odd'" in err and err.count("\n") == 3


def test_every_flag_says_its_default_once():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        fmt = HelpFormatter(name)
        for action in p._actions:
            if action.option_strings and action.help and not action.required and action.dest != "help":
                text = fmt._expand_help(action)
                assert text.count("(default:") == 1, (name, action.option_strings, text)


def test_the_demo_help_lists_the_library_settings_with_the_shipped_values():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["demo"].format_help().split())
    for needle in ("--train.steps STEPS optimizer steps (in [1, 1000000000]) (default: 70)",
                   "--policy.step-damping STEP_DAMPING", "(default: 0.5)", "--model.injection", "--eval.blocks BLOCKS", "(default: 16)",
                   "--data.seq-len SEQ_LEN", "--halter.max-depth", "--no-heal-rows", "--config YAML"):
        assert needle in text, needle
    for fixed in ("--model.init-seed", "--policy.trained-depth", "--eval.seed", "--eval.full", "--data.train",
                  "--halter.seed"):
        assert fixed not in text, fixed


@pytest.mark.parametrize("argv", [["demo", "--model.init-seed", "3"], ["demo", "--steps", "3"]])
def test_settings_the_demo_fixes_or_that_moved_into_a_section_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
