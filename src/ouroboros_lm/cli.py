"""The `ouroboros` command: convert, prepare, train, eval, generate, export, harness, sweep, report, demo.

Flags use the names of the OuroborosConfig fields (--n-prelude, --recurrent-layer, ...).
Bad input exits with status 2 and one line saying what is wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import OuroborosConfig
from .evaluate import DEFAULT_EVAL_DEPTHS
from .exit_eval import ExitEvalConfig
from .exits import ExitRule
from .halter_training import HalterConfig
from .experiments.demo import DemoConfig
from .prepare import PrepareConfig
from .settings import add_flags, from_flags
from .train import TrainConfig


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (status 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def number_list(kind, example: str, ok, bound: str):
    """argparse type: comma-separated numbers of `kind`, each passing `ok` (e.g. 1,4,8)."""
    noun = "integers" if kind is int else "numbers"

    def parse(text: str) -> tuple:
        try:
            out = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {noun} like {example}; got {text!r}") from None
        if not out or not all(ok(x) for x in out):
            raise argparse.ArgumentTypeError(f"expected {bound}; got {text!r}")
        return out

    return parse


depths_arg = number_list(int, "1,4,8,16", lambda d: d >= 1, "depths: integers >= 1")
floats_arg = number_list(float, "0.1,0.05", lambda x: 0 < x < float("inf"), "finite numbers > 0")


def _positive(kind, noun: str, bound: str):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}; got {text!r}") from None
        if not v > 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {noun} {bound}; got {v}")
        return v

    return parse


positive_int = _positive(int, "an integer", ">= 1")


def seed_arg(text: str) -> int:
    """A random seed: an integer in [0, 2**63 - 1] (what torch accepts)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1]; got {text}")
    return v


def depth_or_auto(text: str):
    return "auto" if text == "auto" else positive_int(text)
positive_float = _positive(float, "a finite number", "> 0")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, metavar="SRC",
                   help="text files, folders, globs, .jsonl, .parquet, hf:<dataset id>, or a folder from `ouroboros "
                   "prepare`; NAME=SRC[:WEIGHT] names sources and mixes them by weight (by size without weights)")
    g.add_argument("--heldout", nargs="+", default=None, metavar="SRC",
                   help="held-out sources (default: a deterministic split of --data by document)")
    g.add_argument("--heldout-fraction", type=float, default=0.1, help="fraction of documents held out without --heldout")
    g.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets")
    g.add_argument("--seq-len", type=positive_int, default=None, help="tokens per block (default 2048 on GPU, 256 on CPU)")


def add_eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter folder")
    add_data_flags(p)
    p.add_argument("--depths", type=depths_arg, default=DEFAULT_EVAL_DEPTHS, help="Ouroboros depths to evaluate")
    p.add_argument("--exit-thresholds", type=floats_arg, default=(), metavar="T[,T...]",
                   help="also evaluate adaptive exit (--exit-rule) at each threshold, up to --exit-max-depth steps")
    p.add_argument("--exit-max-depth", type=positive_int, default=None, help="maximum steps under adaptive exit "
                   "(default: the largest of --depths)")
    add_flags(p, ExitRule, "adaptive exit (per token)", skip=("threshold",))
    p.add_argument("--step-damping", type=float, default=None,
                   help="override the adapter's step_damping (updates past trained_depth scaled geometrically)")
    p.add_argument("--blocks", type=positive_int, default=32, help="blocks evaluated per split")
    p.add_argument("--batch-size", type=positive_int, default=4, help="blocks per forward pass")
    p.add_argument("--no-full", action="store_true", help="skip the full base model row")
    p.add_argument("--out", default=None, help="folder for eval.json / eval.md (default: the adapter folder)")
    p.add_argument("--eval-seed", type=seed_arg, default=0, help="seed choosing the training-distribution blocks")


def add_generate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--depth", type=depth_or_auto, default=None, help="recurrence depth (default: the adapter's "
                   "default_depth), or auto: each token stops by the exit rule below, up to --exit-max-depth steps")
    p.add_argument("--exit-max-depth", type=positive_int, default=32, help="maximum steps with --depth auto")
    add_flags(p, ExitRule, "adaptive exit (with --depth auto)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=positive_float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=seed_arg, default=None, help="sampling seed (reproducible)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--baseline", action="store_true", help="generate with the pruned model instead")
    who.add_argument("--full", action="store_true", help="generate with the full base model instead")
    who.add_argument("--compare", action="store_true", help="print full, pruned and Ouroboros continuations")


def add_export_parser(sub, fmt) -> None:
    p = sub.add_parser("export", help="write a Hugging Face model folder (transformers, pipeline, lm-eval)",
                       formatter_class=fmt)
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True,
                   help="folder to write (AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True))")
    p.add_argument("--depth", type=positive_int, default=None,
                   help="depth the exported model runs at (default: the adapter's default_depth)")
    p.add_argument("--baseline", action="store_true", help="export the pruned stack's behaviour instead of the recursion")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def add_eval_exits_parser(sub, fmt) -> None:
    p = sub.add_parser("eval-exits", help="exit rules against fixed depths at equal mean steps per token",
                       formatter_class=fmt)
    p.add_argument("--adapter", required=True, help="adapter folder")
    add_data_flags(p)
    add_flags(p, ExitEvalConfig, "the comparison (ExitEvalConfig)")
    p.add_argument("--out", default=None, help="folder for exits.json, exits.md, exits_compute.png and "
                   "exits_steps.png (default: the adapter folder)")


def add_harness_parser(sub, fmt) -> None:
    p = sub.add_parser("harness", help="lm-evaluation-harness on our local tasks (perplexity, next sentence)",
                       formatter_class=fmt)
    p.add_argument("--model", required=True, help="folder from `ouroboros export` (or any HF model folder: the full model)")
    p.add_argument("--data", nargs="*", default=None, metavar="SRC",
                   help="text files, folders or globs (default: the sample shipped with the tasks)")
    p.add_argument("--tasks", default="ouroboros_ppl,ouroboros_next_sentence", help="comma-separated task names")
    p.add_argument("--depth", type=positive_int, default=None, help="override the exported model's depth")
    p.add_argument("--baseline", action="store_true", help="evaluate the pruned stack instead of the recursion")
    p.add_argument("--batch-size", type=positive_int, default=1, help="harness batch size")
    p.add_argument("--limit", type=positive_int, default=None, help="documents per task (for a quick look)")
    p.add_argument("--out", default=None, help="write the harness's results as JSON here")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python files the model folder ships (never needed for folders from "
                        "`ouroboros export`: only for a folder of another model type whose code you trust)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="ouroboros", description=__doc__.splitlines()[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("convert", help="convert a base model and write an untrained adapter", formatter_class=fmt)
    p.add_argument("--base", required=True, help="local HF folder, hub id, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--out", required=True, help="adapter folder to write (must not hold an adapter already)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    add_flags(p, OuroborosConfig, "model (OuroborosConfig)")

    p = sub.add_parser("prepare", help="tokenize text once into token shards that train and eval read by memory map",
                       formatter_class=fmt)
    p.add_argument("sources", nargs="+", metavar="SRC", help="text files, folders, globs, .jsonl, .parquet, or "
                   "hf:<dataset id>[:split] (streamed)")
    p.add_argument("--out", required=True, help="prepared folder to write (an interrupted run resumes in it)")
    p.add_argument("--base", required=True, help="the model whose tokenizer is used: local HF folder, hub id, .gguf "
                   "file, alias (smollm2-135m), or an adapter folder")
    p.add_argument("--heldout", nargs="+", default=None, metavar="SRC",
                   help="held-out sources (default: a deterministic split of SRC by document)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder prepared from other sources or settings")
    add_flags(p, PrepareConfig, "preparation (PrepareConfig)")

    p = sub.add_parser("train", help="train an adapter on text", formatter_class=fmt)
    p.add_argument("--adapter", required=True, help="adapter folder (from `ouroboros convert`); the run lives here")
    add_data_flags(p)
    add_flags(p, TrainConfig, "training (TrainConfig; the paper's recipe by default)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the adapter folder")

    p = sub.add_parser("train-halter", help="train a per-token halter on top of a trained adapter (the rest frozen)",
                       formatter_class=fmt)
    p.add_argument("--adapter", required=True, help="trained adapter folder; the halter is saved into it")
    add_data_flags(p)
    add_flags(p, HalterConfig, "halter training (HalterConfig)")

    add_eval_parser(sub.add_parser("eval", help="evaluate full model, pruned baseline and Ouroboros on the same tokens",
                                   formatter_class=fmt))
    add_eval_exits_parser(sub, fmt)
    add_generate_parser(sub.add_parser("generate", help="generate text through the recursion (streams tokens)",
                                       formatter_class=fmt))
    add_export_parser(sub, fmt)
    add_harness_parser(sub, fmt)

    p = sub.add_parser("sweep", help="run an experiment grid from a YAML spec (resumable)", formatter_class=fmt)
    p.add_argument("spec", help="sweep spec (YAML); see configs/")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/<spec name>)")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help="run only these runs (by name)")

    p = sub.add_parser("report", help="tables and plots of a sweep folder", formatter_class=fmt)
    p.add_argument("dir", help="sweep folder")
    p.add_argument("--against", default=None, metavar="DIR",
                   help="another sweep folder scored on the same blocks: paired-by-seed differences of each "
                        "configuration against the same one there (or its only one) -> paired_vs_<DIR>.md/json")
    p.add_argument("--reference", default=None, metavar="CONFIG",
                   help="the configuration summary.md pairs every other one against, seed by seed (its name, or a "
                        "part only it has; default: the one with the fewest trained weights)")

    p = sub.add_parser("demo", help="the main job: SmolLM2-135M on State of the Union addresses", formatter_class=fmt)
    add_flags(p, DemoConfig)
    return parser


# ---------------------------------------------------------------------- commands
def cmd_convert(args) -> None:
    from .adapter import CONFIG_NAME, save_adapter
    from .loading import load_base_model
    from .model import OuroborosModel

    cfg = from_flags(OuroborosConfig, args)  # validates before loading anything
    out = Path(args.out)
    if (out / CONFIG_NAME).exists() and not args.overwrite:
        raise ValueError(f"{out} already holds an adapter; pass --overwrite to replace it (nothing was changed)")
    base_name = str(Path(args.base).resolve()) if Path(args.base).exists() else args.base
    model = OuroborosModel.from_base(load_base_model(args.base), cfg, base_name=base_name)
    save_adapter(model, out)
    parts = model.trainable_parameter_breakdown()
    print(f"wrote untrained adapter to {out} ({len(model.prelude)}+1+{len(model.coda)} layers kept; trainable: "
          + ", ".join(f"{k} {v:,}" for k, v in parts.items()) + ")")


def cmd_prepare(args) -> None:
    from .adapter import CONFIG_NAME, read_adapter
    from .loading import load_tokenizer
    from .prepare import prepare

    pc = from_flags(PrepareConfig, args)
    base = read_adapter(args.base)[0]["base_model"] if (Path(args.base) / CONFIG_NAME).is_file() else args.base
    m = prepare(args.sources, args.out, load_tokenizer(base), pc, heldout=args.heldout, overwrite=args.overwrite)
    train, held = m["splits"]["train"], m["splits"]["heldout"]
    print(f"wrote {args.out}: train {train['documents']} docs, {train['tokens']:,} tokens in {len(train['shards'])} "
          f"shard(s); held-out {held['documents']} docs, {held['tokens']:,} tokens; {m['dtype'][1:]} tokens of "
          f"{m['tokenizer']['name'] or 'the tokenizer'} (vocab {m['vocab_size']}). Train with --data {args.out}")


def corpus_for(args, tokenizer, runtime, seed: int = 0):
    from .data import build_corpus

    return build_corpus(args.data, tokenizer, args.seq_len or runtime.default_seq_len, heldout=args.heldout,
                        heldout_fraction=args.heldout_fraction, seed=seed, text_field=args.text_field)


def cmd_train(args) -> None:
    from .adapter import load_adapter, read_adapter
    from .loading import load_base_model, load_tokenizer
    from .runtime import choose_runtime
    from .train import Trainer

    tc = from_flags(TrainConfig, args)
    meta, _ = read_adapter(args.adapter)  # fail fast on a bad adapter folder
    runtime = choose_runtime(tc.mixed_precision)
    corpus = corpus_for(args, load_tokenizer(meta["base_model"]), runtime)
    print(corpus.describe())
    model = load_adapter(args.adapter, dtype=runtime.dtype)
    teacher = load_base_model(meta["base_model"], dtype=runtime.dtype) if tc.distill_weight > 0 else None
    summary = Trainer(model, corpus, args.adapter, tc, resume=args.resume, teacher=teacher).run()
    print(json.dumps(summary, indent=2))


def cmd_train_halter(args) -> None:
    from .adapter import load_adapter, read_adapter
    from .halter_training import train_halter
    from .loading import load_tokenizer
    from .runtime import choose_runtime

    hc = from_flags(HalterConfig, args)
    meta, _ = read_adapter(args.adapter)
    OuroborosConfig.from_dict(meta["ouroboros_config"]).check_depth(hc.max_depth, "--max-depth")
    runtime = choose_runtime()
    corpus = corpus_for(args, load_tokenizer(meta["base_model"]), runtime)
    print(corpus.describe())
    model = load_adapter(args.adapter, dtype=runtime.dtype, device=runtime.device)
    with runtime.autocast():
        print(json.dumps(train_halter(model, corpus, args.adapter, hc), indent=2))


def check_exit_rule(cfg: OuroborosConfig, rule: ExitRule, top: int) -> None:
    """Refuse, before loading anything, an exit rule the model cannot follow or a minimum it never reaches."""
    if rule.rule == "halter" and not cfg.halter:
        raise ValueError("--exit-rule halter needs an adapter with a trained halter (run `ouroboros train-halter` first)")
    if rule.min_steps > top:
        raise ValueError(f"--exit-min-steps {rule.min_steps} is more than the {top} steps allowed (--exit-max-depth)")


def cmd_eval(args) -> None:
    from .adapter import load_adapter, read_adapter
    from .evaluate import evaluate
    from .loading import load_base_model, load_tokenizer
    from .runtime import choose_runtime

    meta, _ = read_adapter(args.adapter)
    saved = OuroborosConfig.from_dict(meta["ouroboros_config"])
    if max(args.depths) > saved.max_steps:
        raise ValueError(f"--depths: every depth must be in [1, max_steps={saved.max_steps}]; got {max(args.depths)}")
    if args.exit_thresholds:
        check_exit_rule(saved, ExitRule(args.rule, args.exit_thresholds[0], args.min_steps),
                        saved.check_depth(args.exit_max_depth or max(args.depths), "--exit-max-depth"))
    runtime = choose_runtime()
    corpus = corpus_for(args, load_tokenizer(meta["base_model"]), runtime)
    model = load_adapter(args.adapter, dtype=runtime.dtype, device=runtime.device, step_damping=args.step_damping)
    full = None if args.no_full else load_base_model(meta["base_model"], dtype=runtime.dtype, device=runtime.device)
    splits = corpus.eval_splits(args.blocks, args.eval_seed)
    top = model.config.check_depth(args.exit_max_depth or max(args.depths), "--exit-max-depth")
    rules = [(ExitRule(args.rule, t, args.min_steps), top) for t in args.exit_thresholds]
    report = evaluate(model, splits, depths=args.depths, full_model=full, batch_size=args.batch_size, runtime=runtime,
                      exit_rules=rules,
                      meta={"adapter": str(args.adapter), "base_model": meta["base_model"], "seq_len": corpus.seq_len})
    print(report.table())
    j, m = report.write(args.out or args.adapter)
    from .experiments.report import plot_depth_curve

    curve = plot_depth_curve(report, j.parent / "depth_curve.png")
    print(f"wrote {j}, {m} and {curve}")


def cmd_eval_exits(args) -> None:
    from .adapter import load_adapter, read_adapter
    from .exit_eval import compare_exits
    from .loading import load_tokenizer
    from .runtime import choose_runtime

    cfg = from_flags(ExitEvalConfig, args)
    meta, _ = read_adapter(args.adapter)
    cfg.check_model(OuroborosConfig.from_dict(meta["ouroboros_config"]))  # before loading anything
    runtime = choose_runtime()
    corpus = corpus_for(args, load_tokenizer(meta["base_model"]), runtime)
    model = load_adapter(args.adapter, dtype=runtime.dtype, device=runtime.device)
    blocks = corpus.eval_splits(cfg.blocks, cfg.eval_seed)[cfg.split]
    cmp = compare_exits(model, blocks, cfg, runtime=runtime)
    print(cmp.table())
    print("wrote " + ", ".join(map(str, cmp.write(args.out or args.adapter))))


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


def generate_full(full, tok, ids, args, sample: dict) -> None:
    import torch
    from transformers import TextStreamer

    if args.seed is not None:
        torch.manual_seed(args.seed)
    full.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                  streamer=TextStreamer(tok, skip_prompt=True), **(sample if args.do_sample else {"do_sample": False}))


def prompt_ids(tok, args):
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=not args.chat).input_ids


def cmd_generate(args) -> None:
    from .adapter import load_adapter, read_adapter
    from .loading import load_base_model, load_tokenizer
    from .runtime import choose_runtime

    meta, _ = read_adapter(args.adapter)
    cfg = OuroborosConfig.from_dict(meta["ouroboros_config"])
    rule = from_flags(ExitRule, args) if args.depth == "auto" else None
    depth = args.exit_max_depth if args.depth == "auto" else args.depth if args.depth is not None else cfg.default_depth
    depth = cfg.check_depth(depth, "--exit-max-depth" if args.depth == "auto" else "--depth")
    if rule is not None:
        check_exit_rule(cfg, rule, depth)
    if args.top_p is not None and args.top_p > 1:
        raise ValueError(f"--top-p must be in (0, 1]; got {args.top_p}")
    tok = load_tokenizer(meta["base_model"])
    sample = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    runs = ["full", "baseline", "ouroboros"] if args.compare else ["full" if args.full else "baseline" if args.baseline else "ouroboros"]
    runtime = choose_runtime()
    model = load_adapter(args.adapter, dtype=runtime.dtype, device=runtime.device) if runs != ["full"] else None
    full = load_base_model(meta["base_model"], dtype=runtime.dtype, device=runtime.device) if "full" in runs else None
    ids = prompt_ids(tok, args).to(runtime.device)
    max_pos = getattr(model.base_config if model is not None else full.config, "max_position_embeddings", None)
    if max_pos is not None and ids.shape[1] + args.max_new_tokens > max_pos:  # every path, --full included
        raise ValueError(f"the prompt ({ids.shape[1]} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the "
                         f"base model's max_position_embeddings {max_pos}")
    how = f"adaptive depth, at most {depth}" if rule is not None else f"depth {depth}"
    labels = {"full": "full model", "baseline": "pruned baseline", "ouroboros": f"ouroboros ({how})"}
    for who in runs:
        if args.compare:
            print(f"\n=== {labels[who]} ===")
        print(args.prompt, end="", flush=True)
        if who == "full":
            generate_full(full, tok, ids, args, sample)
            continue
        stats: dict = {}
        model.generate(ids, max_new_tokens=args.max_new_tokens, depth=depth, eos_token_id=tok.eos_token_id,
                       seed=args.seed, baseline=who == "baseline", on_token=streaming_printer(tok),
                       exit_rule=rule if who == "ouroboros" else None, stats=stats, **sample)
        print()
        if stats.get("steps"):
            steps = [int(x[0]) for x in stats["steps"]]
            print(f"[recurrence steps per new token: mean {sum(steps) / len(steps):.2f}, {steps}]")


def cmd_export(args) -> None:
    from .export import export_hf

    out = export_hf(args.adapter, args.out, depth=args.depth, baseline=args.baseline, overwrite=args.overwrite)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) after `import ouroboros_lm` "
          "(elsewhere: trust_remote_code=True, which runs the folder's modeling_ouroboros.py)")


def cmd_harness(args) -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("ouroboros harness needs lm-evaluation-harness: pip install 'ouroboros-lm[hf]' (or lm-eval)")
    from lm_eval.utils import make_table

    from .atomic import write_json
    from .harness import check_harness, run_harness

    tasks = tuple(t for t in args.tasks.split(",") if t)
    check_harness(args.model, args.data, tasks, depth=args.depth, baseline=args.baseline,
                  trust_remote_code=args.trust_remote_code)  # before loading anything
    out = run_harness(args.model, args.data, tasks, depth=args.depth, baseline=args.baseline,
                      batch_size=args.batch_size, limit=args.limit, trust_remote_code=args.trust_remote_code)
    print(make_table(out))
    if args.out:
        write_json(args.out, out["results"])
        print(f"wrote {args.out}")


def cmd_sweep(args) -> None:
    from .experiments.sweep import run_sweep

    run_sweep(args.spec, out=args.out, only=args.only)


def cmd_report(args) -> None:
    from .experiments.report import write_report

    for d in (args.dir, args.against):
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"sweep folder not found: {d}")
    write_report(args.dir, reference=args.reference)
    if args.against:
        from .experiments.report import compare_sweeps

        compare_sweeps(args.dir, args.against)


def cmd_demo(args) -> None:
    from .experiments.demo import run_demo

    run_demo(from_flags(DemoConfig, args))


COMMANDS = {"convert": cmd_convert, "prepare": cmd_prepare, "train": cmd_train, "train-halter": cmd_train_halter, "eval": cmd_eval,
            "eval-exits": cmd_eval_exits,
            "generate": cmd_generate, "export": cmd_export, "harness": cmd_harness, "sweep": cmd_sweep,
            "report": cmd_report, "demo": cmd_demo}


# What an interrupted command leaves (Ctrl-C), per command; the rest write nothing or only whole files.
INTERRUPTED = {
    "prepare": "the complete shards are kept: the same command resumes after them",
    "train": "the last checkpoint is kept (rerun with --resume to continue)",
    "train-halter": "the adapter is as it was before (rerun to train the halter)",
    "sweep": "finished runs are kept; rerun the same command to continue (the interrupted run resumes from "
             "its last checkpoint)",
    "demo": "the partial output is kept (the next demo run to the same --out starts over)",
    "export": "nothing was changed (the temporary folder was removed)",
}


def main(argv: list[str] | None = None) -> int:
    from .train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, OSError) as e:  # bad input, missing/unreadable files, unreachable hub ids, a full disk
        print(f"ouroboros {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"ouroboros {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ouroboros {args.command}: interrupted; {INTERRUPTED.get(args.command, 'nothing was written')}",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
