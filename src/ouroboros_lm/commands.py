"""`ouroboros` subcommands as values, and the ones other installed packages register.

A `Command` is what the CLI needs of a subcommand: its help line, a function adding its flags to
a parser (from settings dataclasses: `settings.add_flags`), the function running it on the parsed
flags, and what an interrupted run leaves behind. `cli.py` holds the library's own commands. Any
installed distribution adds more by naming a `Command` in the entry-point group
`ouroboros_lm.commands`; this project's pyproject.toml registers the recipes there (sweep, report,
demo in `ouroboros_recipes`), so the CLI finds them through the installed metadata and the library
never imports a recipe.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Callable

GROUP = "ouroboros_lm.commands"


@dataclass(frozen=True)
class Command:
    help: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    interrupted: str = "nothing was written"  # what a Ctrl-C leaves, said when it happens


def warn(message: str) -> None:
    print(f"ouroboros: {message}", file=sys.stderr)


@lru_cache(maxsize=None)
def registered(taken: frozenset[str] = frozenset()) -> dict[str, Command]:
    """The commands installed distributions register in GROUP, by name. One whose name is `taken`
    (the library's own), or that fails to load, is skipped with a warning naming it: a broken
    plugin cannot break the library's commands."""
    out: dict[str, Command] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if ep.name in taken or ep.name in out:
            warn(f"command {ep.name!r} registered by {ep.value} is already taken; skipped")
            continue
        try:
            command = ep.load()
        except Exception as e:  # any error in another package's import: reported, not fatal
            warn(f"command {ep.name!r} ({ep.value}) failed to load and is skipped: {type(e).__name__}: {e}")
            continue
        if not isinstance(command, Command):
            warn(f"command {ep.name!r} ({ep.value}) is not an ouroboros_lm.commands.Command; skipped")
            continue
        out[ep.name] = command
    return out
