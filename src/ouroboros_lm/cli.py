"""The `ouroboros` command: convert, prepare, train, train-halter, eval, generate, export, harness,
and the commands installed packages register (the recipes: sweep, report, demo; see commands.py).

Every flag is a field of a settings dataclass (`settings.add_flags`): the model's (OuroborosConfig:
--n-prelude, --recurrent-layer, ...), training's (TrainConfig), the data's (DataConfig), each
command's own (EvalConfig, GenerateConfig, ExportConfig, HarnessConfig, and the small *Args
classes below for what a command reads and writes). Bad input exits with status 2 and one line
saying what is wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .commands import Command, registered
from .config import OuroborosConfig
from .data import DataConfig
from .evaluate import EvalConfig
from .exit_eval import ExitEvalConfig
from .exits import ExitRule
from .export import ExportConfig
from .generate import GenerateConfig
from .halter_training import HalterConfig
from .harness import HarnessConfig
from .policy import RecursionPolicy
from .plan import PlanConfig
from .prepare import PrepareConfig
from .settings import REQUIRED, add_flags, from_flags, setting
from .train import TrainConfig


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (status 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, once: not again where the help already says it."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


# ---------------------------------------------------------------------- what each command reads and writes
@dataclass
class ConvertArgs:
    base: str = setting(REQUIRED, "local HF folder, hub id, .gguf file, or alias (smollm2-135m)")
    out: str = setting(REQUIRED, "adapter folder to write (must not hold an adapter already)")
    overwrite: bool = setting(False, "replace an adapter already in --out")
    plan: str | None = setting(None, "keep the layers an `ouroboros plan` file chose (and loop its block; a heal model "
                               "keeps its layers) instead of the split's counts", metavar="PLAN.json")


@dataclass
class PrepareArgs:
    sources: tuple[str, ...] = setting(REQUIRED, "text files, folders, globs, .jsonl, .parquet, or hf:<dataset "
                                       "id>[:split] (streamed)", positional=True, metavar="SRC")
    out: str = setting(REQUIRED, "prepared folder to write (an interrupted run resumes in it)")
    base: str = setting(REQUIRED, "the model whose tokenizer is used: local HF folder, hub id, .gguf file, alias "
                        "(smollm2-135m), or an adapter folder")
    heldout: tuple[str, ...] | None = setting(None, "held-out sources (default: a deterministic split of SRC by "
                                              "document)", metavar="SRC")
    overwrite: bool = setting(False, "replace a folder prepared from other sources or settings")
    teacher: str | None = setting(None, "also run this model once over every training block and store its top-K "
                                  "next-token predictions beside the tokens, for `train --distill-weight` (the "
                                  "student's base: an alias, folder, hub id or .gguf; an adapter folder: its base)")
    teacher_top_k: int = setting(32, "predictions stored per token (the rest of the teacher's mass is one bucket)",
                                 low=1, high=1 << 20)
    seq_len: int | None = setting(None, "the blocks the teacher sees, as training will cut them (default: 2048 on "
                                  "GPU, 256 on CPU; train with the same --seq-len)", low=2, high=1 << 20)


@dataclass
class TrainArgs:
    adapter: str = setting(REQUIRED, "adapter folder (from `ouroboros convert`); the run lives here")
    resume: bool = setting(False, "continue from the latest checkpoint in the adapter folder")


@dataclass
class HalterArgs:
    adapter: str = setting(REQUIRED, "trained adapter folder; the halter is saved into it")


@dataclass
class EvalArgs:
    adapter: str = setting(REQUIRED, "adapter folder")
    out: str | None = setting(None, "folder for eval.json / eval.md (default: the adapter folder)")


# ---------------------------------------------------------------------- flags
def convert_flags(p) -> None:
    add_flags(p, ConvertArgs)
    add_flags(p, OuroborosConfig, "model (OuroborosConfig)")
    add_flags(p, RecursionPolicy, "inference (RecursionPolicy)")


def prepare_flags(p) -> None:
    add_flags(p, PrepareArgs)
    add_flags(p, PrepareConfig, "preparation (PrepareConfig)")


def train_flags(p) -> None:
    add_flags(p, TrainArgs)
    add_flags(p, DataConfig, "data (DataConfig)")
    add_flags(p, TrainConfig, "training (TrainConfig; the paper's recipe by default)")


def halter_flags(p) -> None:
    add_flags(p, HalterArgs)
    add_flags(p, DataConfig, "data (DataConfig)")
    add_flags(p, HalterConfig, "halter training (HalterConfig)")


@dataclass
class ExitsArgs:
    adapter: str = setting(REQUIRED, "adapter folder")
    out: str | None = setting(None, "folder for exits.json, exits.md, exits_compute.png and exits_steps.png "
                              "(default: the adapter folder)")


def exits_flags(p) -> None:
    add_flags(p, ExitsArgs)
    add_flags(p, DataConfig, "data (DataConfig)")
    add_flags(p, ExitEvalConfig, "the comparison (ExitEvalConfig)")


def eval_flags(p) -> None:
    add_flags(p, EvalArgs)
    add_flags(p, DataConfig, "data (DataConfig)")
    add_flags(p, EvalConfig, "evaluation (EvalConfig)")
    add_flags(p, ExitRule, "adaptive exit (per token)", skip=("threshold",))


def generate_flags(p) -> None:
    add_flags(p, GenerateConfig)
    add_flags(p, ExitRule, "adaptive exit (with --depth auto)")


# ---------------------------------------------------------------------- commands
def saved_config(adapter: str) -> tuple[dict, OuroborosConfig]:
    """(the adapter's metadata, its model config): what the flags are checked against before loading."""
    from .adapter import read_adapter

    meta, _ = read_adapter(adapter)
    return meta, OuroborosConfig.from_dict(meta["ouroboros_config"])


def cmd_convert(args) -> None:
    from .adapter import CONFIG_NAME, save_adapter
    from .loading import load_base_model
    from .model import OuroborosModel
    from .plan import check_plan_base, check_plan_flags, compact, planned_config, read_plan

    ca, cfg = from_flags(ConvertArgs, args), from_flags(OuroborosConfig, args)  # validated before loading anything
    policy = from_flags(RecursionPolicy, args)
    if not 1 <= policy.default_depth <= cfg.max_depth:  # e.g. --max-depth 4 alone, under the default depth 8
        its = " (its default)" if policy.default_depth == RecursionPolicy.default_depth else ""
        raise ValueError(f"--default-depth {policy.default_depth}{its} is past --max-depth {cfg.max_depth}: give a "
                         f"--default-depth in [1, {cfg.max_depth}] too")
    policy.check(cfg.max_depth)
    out = Path(ca.out)
    if (out / CONFIG_NAME).exists() and not ca.overwrite:
        raise ValueError(f"{out} already holds an adapter; pass --overwrite to replace it (nothing was changed)")
    from .checkpoints import CHECKPOINTS, list_checkpoints

    if list_checkpoints(out):  # --resume would continue that run on the new adapter: refused there too
        raise ValueError(f"{out / CHECKPOINTS} holds a training run's checkpoints, which --overwrite would not replace; "
                         "convert into a new folder, or remove that folder first (nothing was changed)")
    plan = None
    if ca.plan is not None:
        check_plan_flags(cfg)  # a split flag the plan would override silently
        plan = read_plan(ca.plan)
    base_name = str(Path(ca.base).resolve()) if Path(ca.base).exists() else ca.base
    base = load_base_model(ca.base)
    if plan is not None:
        check_plan_base(plan, base, ca.plan)
        cfg = planned_config(plan, cfg)
    model = OuroborosModel.from_base(base, cfg, base_name=base_name, policy=policy)
    save_adapter(model, out)
    parts = model.trainable_parameter_breakdown()
    kept = model.config.kept_layers(model.base_config.num_hidden_layers)
    print(f"wrote untrained adapter to {out} ({len(model.prelude)}+{len(model.recurrent.layers)}+{len(model.coda)} "
          f"layers kept: {compact(kept)}; trainable: "
          + ", ".join(f"{k} {v:,}" for k, v in parts.items()) + ")")


def cmd_plan(args) -> None:
    from .loading import load_base_model, load_tokenizer
    from .plan import PlanConfig, check_out, check_request, make_plan, table, write_plan

    pc = from_flags(PlanConfig, args)
    out = Path(pc.out)
    check_out(pc)  # before the base is loaded
    base = load_base_model(pc.base)
    check_request(pc, len(base.model.layers), getattr(base.config, "max_position_embeddings", None))  # before any text
    base_name = str(Path(pc.base).resolve()) if Path(pc.base).exists() else pc.base
    plan = make_plan(pc, base, load_tokenizer(pc.base), base_name)
    write_plan(plan, out)
    print(table(plan))
    rec = plan["recursion"]
    print(f"\nwrote {out}: keep {plan['keep_layers']} ({plan['rule']})"
          + (f"; loop {rec['recurrent_layer']}" + (f"-{rec['recurrent_layer'] + rec['block_layers'] - 1}"
                                                   if rec["block_layers"] > 1 else "") if rec else
             f"; no run of {pc.block_layers} consecutive layers among them to loop (a heal model only)")
          + f". Build it: ouroboros convert --base {pc.base} --plan {out} --out ADAPTER [--heal-layers 1 --lora-rank R]")


def cmd_prepare(args) -> None:
    from .adapter import CONFIG_NAME, read_adapter
    from .loading import load_base_model, load_tokenizer
    from .prepare import prepare
    from .reading import DataError, printable
    from .shards import tokenizer_identity

    pa, pc = from_flags(PrepareArgs, args), from_flags(PrepareConfig, args)
    of_base = lambda name: read_adapter(name)[0]["base_model"] if (Path(name) / CONFIG_NAME).is_file() else name  # noqa: E731
    base, teacher = of_base(pa.base), of_base(pa.teacher) if pa.teacher else None
    tokenizer = load_tokenizer(base)
    if teacher is None and (pa.seq_len is not None or pa.teacher_top_k != PrepareArgs.teacher_top_k):
        raise DataError(f"--{'seq-len' if pa.seq_len is not None else 'teacher-top-k'} is for the teacher pass: "
                        "give --teacher too, or leave it out (nothing was written)")
    # the same tokenizer by its definition (sha256), whatever name or path it was loaded by
    same = lambda a, b: tokenizer_identity(a)["sha256"] == tokenizer_identity(b)["sha256"]  # noqa: E731
    if teacher is not None and not same(load_tokenizer(teacher), tokenizer):
        raise DataError(f"--teacher {pa.teacher}: its tokenizer is not --base {pa.base}'s; the teacher must share "
                        "the student's vocabulary (nothing was written)")
    if teacher is not None and pa.teacher_top_k >= len(tokenizer):
        raise DataError(f"--teacher-top-k must be below the vocabulary ({len(tokenizer)}); got {pa.teacher_top_k}")
    if teacher is not None:  # before any text is read: the positions both models have, the pass's memory
        from .loading import load_base_config
        from .runtime import choose_runtime
        from .targets import check_pass_fits

        seq_len = pa.seq_len or choose_runtime().default_seq_len
        for flag, name in (("--base", base), ("--teacher", teacher)):
            max_pos = getattr(load_base_config(name), "max_position_embeddings", None)
            if max_pos is not None and seq_len > max_pos:
                raise DataError(f"--seq-len {seq_len} is longer than {flag} {printable(name)}'s {max_pos} positions "
                                "(max_position_embeddings); training could not use these targets (nothing was written)")
        check_pass_fits(pa.teacher_top_k, len(tokenizer), seq_len)
    heldout = list(pa.heldout) if pa.heldout else None
    m = prepare(list(pa.sources), pa.out, tokenizer, pc, heldout=heldout, overwrite=pa.overwrite)
    train, held = m["splits"]["train"], m["splits"]["heldout"]
    print(f"wrote {pa.out}: train {train['documents']} docs, {train['tokens']:,} tokens in {len(train['shards'])} "
          f"shard(s); held-out {held['documents']} docs, {held['tokens']:,} tokens; {m['dtype'][1:]} tokens of "
          f"{m['tokenizer']['name'] or 'the tokenizer'} (vocab {m['vocab_size']}). Train with --data {pa.out}")
    if teacher is not None:
        from .runtime import choose_runtime
        from .shards import Prepared
        from .targets import teacher_pass

        runtime = choose_runtime()
        seq_len = pa.seq_len or runtime.default_seq_len
        model = load_base_model(teacher, dtype=runtime.dtype, device=runtime.device)
        with runtime.autocast():
            tset = teacher_pass(Prepared(pa.out, tokenizer), model, teacher, seq_len, pa.teacher_top_k)
        size = sum((tset.folder / f"{c['name']}.{e}").stat().st_size for c in tset.manifest["chunks"]
                   for e in ("blocks", "ids", "lp"))
        print(f"stored {printable(teacher)}'s top-{pa.teacher_top_k} predictions for {tset.n_blocks} blocks of {seq_len} tokens in "
              f"{tset.folder} ({size / max(1, tset.n_blocks * seq_len):.0f} bytes a token). Train with --data "
              f"{pa.out} --seq-len {seq_len} --distill-weight W --distill-top-k {pa.teacher_top_k}")


def cmd_train(args) -> None:
    from .adapter import load_adapter
    from .loading import load_base_model, load_tokenizer
    from .runtime import choose_runtime
    from .train import Trainer

    ta, data, tc = from_flags(TrainArgs, args), from_flags(DataConfig, args), from_flags(TrainConfig, args)
    meta, _ = saved_config(ta.adapter)  # fail fast on a bad adapter folder
    runtime = choose_runtime(tc.mixed_precision)
    corpus = data.corpus(load_tokenizer(meta["base_model"]), runtime.default_seq_len)
    print(corpus.describe())
    model = load_adapter(ta.adapter, dtype=runtime.dtype)
    teacher = lambda: load_base_model(meta["base_model"], dtype=runtime.dtype)  # noqa: E731 - loaded only if needed
    summary = Trainer(model, corpus, ta.adapter, tc, resume=ta.resume, teacher=teacher).run()
    print(json.dumps(summary, indent=2))


def cmd_train_halter(args) -> None:
    from .adapter import load_adapter
    from .halter_training import train_halter
    from .loading import load_tokenizer
    from .runtime import choose_runtime

    ha, data, hc = from_flags(HalterArgs, args), from_flags(DataConfig, args), from_flags(HalterConfig, args)
    meta, cfg = saved_config(ha.adapter)
    cfg.check_depth(hc.max_depth, "--max-depth")  # before loading anything (train_halter checks it after)
    runtime = choose_runtime()
    corpus = data.corpus(load_tokenizer(meta["base_model"]), runtime.default_seq_len)
    print(corpus.describe())
    model = load_adapter(ha.adapter, dtype=runtime.dtype, device=runtime.device)
    with runtime.autocast():
        print(json.dumps(train_halter(model, corpus, ha.adapter, hc), indent=2))


def cmd_eval(args) -> None:
    from .adapter import load_adapter
    from .evaluate import evaluate
    from .loading import load_base_model, load_tokenizer
    from .plots import plot_depth_curve
    from .runtime import choose_runtime

    ea, data, ec = from_flags(EvalArgs, args), from_flags(DataConfig, args), from_flags(EvalConfig, args)
    rule = from_flags(ExitRule, args)
    meta, saved = saved_config(ea.adapter)
    ec.check(saved, rule)  # depths and the exit rule, before loading anything
    runtime = choose_runtime()
    corpus = data.corpus(load_tokenizer(meta["base_model"]), runtime.default_seq_len)
    model = load_adapter(ea.adapter, dtype=runtime.dtype, device=runtime.device, step_damping=ec.step_damping)
    full = load_base_model(meta["base_model"], dtype=runtime.dtype, device=runtime.device) if ec.full else None
    report = evaluate(model, corpus.eval_splits(ec.blocks, ec.seed), depths=ec.depths, full_model=full,
                      batch_size=ec.batch_size, runtime=runtime, exit_rules=ec.exit_rules(rule),
                      meta={"adapter": str(ea.adapter), "base_model": meta["base_model"], "seq_len": corpus.seq_len})
    print(report.table())
    j, m = report.write(ea.out or ea.adapter)
    curve = plot_depth_curve(report, j.parent / "depth_curve.png")
    print(f"wrote {j}, {m} and {curve}")


def cmd_eval_exits(args) -> None:
    from .adapter import load_adapter
    from .exit_eval import compare_exits
    from .loading import load_tokenizer
    from .runtime import choose_runtime

    xa, data, cfg = from_flags(ExitsArgs, args), from_flags(DataConfig, args), from_flags(ExitEvalConfig, args)
    meta, saved = saved_config(xa.adapter)
    cfg.check_model(saved)  # before loading anything
    runtime = choose_runtime()
    corpus = data.corpus(load_tokenizer(meta["base_model"]), runtime.default_seq_len)
    model = load_adapter(xa.adapter, dtype=runtime.dtype, device=runtime.device)
    blocks = corpus.eval_splits(cfg.blocks, cfg.eval_seed)[cfg.split]
    cmp = compare_exits(model, blocks, cfg, runtime=runtime)
    print(cmp.table())
    print("wrote " + ", ".join(map(str, cmp.write(xa.out or xa.adapter))))


def streaming_printer(tok):
    """on_token callback printing the decoded continuation as it grows."""
    produced: list[int] = []
    shown = [""]

    def stream(token):
        produced.append(int(token[0]))
        text = tok.decode(produced, skip_special_tokens=True)
        print(text[len(shown[0]):], end="", flush=True)
        shown[0] = text

    return stream


def generate_full(full, tok, ids, gc: GenerateConfig) -> None:
    import torch
    from transformers import TextStreamer

    if gc.seed is not None:
        torch.manual_seed(gc.seed)
    sample = gc.sampling() if gc.do_sample else {"do_sample": False}
    full.generate(ids, max_new_tokens=gc.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                  streamer=TextStreamer(tok, skip_prompt=True), **sample)


def prompt_ids(tok, gc: GenerateConfig):
    text = gc.prompt
    if gc.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=not gc.chat).input_ids


def cmd_generate(args) -> None:
    from .adapter import load_adapter, saved_policy
    from .loading import load_base_model, load_tokenizer
    from .runtime import choose_runtime

    gc = from_flags(GenerateConfig, args)
    rule = from_flags(ExitRule, args) if gc.adaptive else None
    meta, cfg = saved_config(gc.adapter)
    depth = gc.checked_depth(cfg, rule, saved_policy(meta).default_depth)  # before loading anything
    tok, runs, runtime = load_tokenizer(meta["base_model"]), gc.runs(), choose_runtime()
    model = load_adapter(gc.adapter, dtype=runtime.dtype, device=runtime.device) if runs != ["full"] else None
    full = load_base_model(meta["base_model"], dtype=runtime.dtype, device=runtime.device) if "full" in runs else None
    ids = prompt_ids(tok, gc).to(runtime.device)
    max_pos = getattr(model.base_config if model is not None else full.config, "max_position_embeddings", None)
    if max_pos is not None and ids.shape[1] + gc.max_new_tokens > max_pos:  # every path, --full included
        raise ValueError(f"the prompt ({ids.shape[1]} tokens) + --max-new-tokens ({gc.max_new_tokens}) exceeds the "
                         f"base model's max_position_embeddings {max_pos}")
    how = f"adaptive depth, at most {depth}" if rule is not None else f"depth {depth}"
    labels = {"full": "full model", "baseline": "pruned baseline", "ouroboros": f"ouroboros ({how})"}
    for who in runs:
        if gc.compare:
            print(f"\n=== {labels[who]} ===")
        print(gc.prompt, end="", flush=True)
        if who == "full":
            generate_full(full, tok, ids, gc)
            continue
        stats: dict = {}
        model.generate(ids, max_new_tokens=gc.max_new_tokens, depth=depth, eos_token_id=tok.eos_token_id,
                       seed=gc.seed, baseline=who == "baseline", on_token=streaming_printer(tok),
                       exit_rule=rule if who == "ouroboros" else None, stats=stats, **gc.sampling())
        print()
        if stats.get("steps"):
            steps = [int(x[0]) for x in stats["steps"]]
            print(f"[recurrence steps per new token: mean {sum(steps) / len(steps):.2f}, {steps}]")


def cmd_export(args) -> None:
    from .export import export

    ec = from_flags(ExportConfig, args)
    out = export(ec)
    if ec.format == "ouroboros":
        print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) after `import ouroboros_lm` "
              "(elsewhere: trust_remote_code=True, which runs the folder's modeling_ouroboros.py)")
        return
    from .export import describe_export

    print(describe_export(out, ec))


def cmd_harness(args) -> None:
    import importlib.util

    hc = from_flags(HarnessConfig, args)
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("ouroboros harness needs lm-evaluation-harness: pip install 'ouroboros-lm[hf]' (or lm-eval)")
    from lm_eval.utils import make_table

    from .atomic import write_json
    from .harness import check_harness, run_harness

    check_harness(hc.model, hc.data, hc.task_names, depth=hc.depth, baseline=hc.baseline,
                  trust_remote_code=hc.trust_remote_code)  # before loading anything
    out = run_harness(hc.model, hc.data, hc.task_names, depth=hc.depth, baseline=hc.baseline,
                      batch_size=hc.batch_size, limit=hc.limit, trust_remote_code=hc.trust_remote_code)
    print(make_table(out))
    if hc.out:
        write_json(hc.out, out["results"])
        print(f"wrote {hc.out}")


COMMANDS = {
    "convert": Command("convert a base model and write an untrained adapter", convert_flags, cmd_convert),
    "plan": Command("choose from calibration text which layers to keep and which block to loop (forward passes only)",
                    lambda p: add_flags(p, PlanConfig), cmd_plan),
    "prepare": Command("tokenize text once into token shards that train and eval read by memory map", prepare_flags,
                       cmd_prepare, "the complete shards are kept: the same command resumes after them"),
    "train": Command("train an adapter on text", train_flags, cmd_train,
                     "the last checkpoint is kept (rerun with --resume to continue)"),
    "train-halter": Command("train a per-token halter on top of a trained adapter (the rest frozen)", halter_flags,
                            cmd_train_halter, "the adapter is as it was before (rerun to train the halter)"),
    "eval": Command("evaluate full model, pruned baseline and Ouroboros on the same tokens", eval_flags, cmd_eval),
    "eval-exits": Command("exit rules against fixed depths at equal mean steps per token", exits_flags,
                          cmd_eval_exits),
    "generate": Command("generate text through the recursion (streams tokens)", generate_flags, cmd_generate),
    "export": Command("write the model for other programs: a Hugging Face folder of our type, the base family's own "
                      "plain model (LoRA merged), or a llama.cpp GGUF",
                      lambda p: add_flags(p, ExportConfig), cmd_export,
                      "nothing was changed (the temporary folder was removed)"),
    "harness": Command("lm-evaluation-harness on our local tasks (perplexity, next sentence)",
                       lambda p: add_flags(p, HarnessConfig), cmd_harness),
}


def all_commands() -> dict[str, Command]:
    """The library's commands, then those installed packages register (`commands.registered`)."""
    return {**COMMANDS, **registered(frozenset(COMMANDS))}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ouroboros", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, command in all_commands().items():
        command.add_flags(sub.add_parser(name, help=command.help, formatter_class=HelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    from .train import TrainingError, is_out_of_memory

    args = build_parser().parse_args(argv)
    command = all_commands()[args.command]
    try:
        command.run(args)
    except (ValueError, OSError) as e:  # bad input, missing/unreadable files, unreachable hub ids, a full disk
        print(f"ouroboros {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"ouroboros {args.command}: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # out of memory outside a training step (eval, generate, export...)
        if not is_out_of_memory(e):
            raise
        print(f"ouroboros {args.command}: out of memory ({str(e).splitlines()[0][:160] if str(e) else 'MemoryError'}); "
              + {"plan": "lower --blocks or --seq-len", "prepare": "lower --teacher-top-k or --seq-len"}.get(
                  args.command, "lower --batch-size or --blocks") + ", or use a machine with more memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ouroboros {args.command}: interrupted; {command.interrupted}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
