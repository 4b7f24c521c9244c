"""The recipes' `ouroboros` subcommands, registered in pyproject.toml's entry-point group
`ouroboros_lm.commands`; the CLI finds them there (`ouroboros_lm.commands.registered`), so the
library never imports this package. Each command's flags come from its settings dataclass."""
from __future__ import annotations

from ouroboros_lm.commands import Command
from ouroboros_lm.settings import add_flags, from_flags

from .demo import demo_flags, run_from_flags
from .frontier import frontier_flags, run_from_flags as run_frontier_from_flags
from .report import ReportConfig
from .sweep import SweepConfig, run_sweep


def sweep(args) -> None:
    sc = from_flags(SweepConfig, args)
    run_sweep(sc.spec, out=sc.out, only=list(sc.only) if sc.only else None)


SWEEP = Command("run an experiment grid from a YAML spec (resumable)", lambda p: add_flags(p, SweepConfig), sweep,
                "finished runs are kept; rerun the same command to continue (the interrupted run resumes from its "
                "last checkpoint)")
REPORT = Command("tables and plots of a sweep folder", lambda p: add_flags(p, ReportConfig),
                 lambda args: from_flags(ReportConfig, args).run())
DEMO = Command("the main job: SmolLM2-135M on State of the Union addresses", demo_flags, run_from_flags,
               "the partial output is kept (the next demo run to the same --out starts over)")
FRONTIER = Command("the compression frontier: for each layer count, the plan's layers healed at one budget, "
                   "evaluated, exported plain and measured beside the full model (resumable)", frontier_flags,
                   run_frontier_from_flags,
                   "finished counts are kept; rerun the same command to continue")
