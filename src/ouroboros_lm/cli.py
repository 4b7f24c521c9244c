"""The `ouroboros` command: convert, train, eval, generate, sweep, report, demo.

Flags use the names of the OuroborosConfig fields (--n-prelude, --recurrent-layer, ...).
Bad input exits with status 2 and one line saying what is wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import POOLINGS, VARIANTS, OuroborosConfig

DEFAULT = OuroborosConfig()


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (status 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def depths_arg(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,8,16; got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"depths must be integers >= 1; got {text!r}")
    return out


def _positive(kind, noun: str, bound: str):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}; got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected {noun} {bound}; got {v}")
        return v

    return parse


positive_int = _positive(int, "an integer", ">= 1")
positive_float = _positive(float, "a number", "> 0")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (OuroborosConfig fields)")
    g.add_argument("--n-prelude", type=int, default=DEFAULT.n_prelude, help="frozen layers kept before the recurrent block")
    g.add_argument("--recurrent-layer", type=int, default=DEFAULT.recurrent_layer, help="index of the layer applied N times")
    g.add_argument("--n-coda", type=int, default=DEFAULT.n_coda, help="frozen layers kept after the recurrent block")
    g.add_argument("--rank", type=int, default=DEFAULT.rank, help="rank r of the SVD LoRA bases")
    g.add_argument("--alpha", type=float, default=DEFAULT.alpha, help="LoRA scale alpha (delta = alpha/r * B diag(d) A x)")
    g.add_argument("--variant", choices=VARIANTS, default=DEFAULT.variant, help="where the modulation comes from")
    g.add_argument("--gate", action=argparse.BooleanOptionalAction, default=DEFAULT.gate, help="gated recurrence (--no-gate: h = h_new)")
    g.add_argument("--gate-bias", type=float, default=DEFAULT.gate_bias, help="initial gate bias b_g")
    g.add_argument("--step-norm", action=argparse.BooleanOptionalAction, default=DEFAULT.step_norm, help="per-step RMSNorm weights")
    g.add_argument("--pooling", choices=POOLINGS, default=DEFAULT.pooling,
                   help="what the Controller reads (sequence_mean leaks future tokens; reproduction only)")
    g.add_argument("--style-dim", type=int, default=DEFAULT.style_dim, help="Controller style/step-embedding width")
    g.add_argument("--controller-hidden", type=int, default=DEFAULT.controller_hidden, help="Controller hidden width")
    g.add_argument("--max-steps", type=int, default=DEFAULT.max_steps, help="largest recurrence depth supported")
    g.add_argument("--depths", type=depths_arg, default=DEFAULT.depths, help="training depths, sampled per step (e.g. 4,8,16)")
    g.add_argument("--checkpoint-from-depth", type=int, default=DEFAULT.checkpoint_from_depth,
                   help="activation checkpointing per step at this depth or deeper (0 = off)")
    g.add_argument("--seed", type=int, default=DEFAULT.seed, help="seed")


def model_config(args) -> OuroborosConfig:
    return OuroborosConfig(
        n_prelude=args.n_prelude, recurrent_layer=args.recurrent_layer, n_coda=args.n_coda, rank=args.rank,
        alpha=args.alpha, variant=args.variant, gate=args.gate, gate_bias=args.gate_bias, step_norm=args.step_norm,
        pooling=args.pooling, style_dim=args.style_dim, controller_hidden=args.controller_hidden,
        max_steps=args.max_steps, depths=args.depths, checkpoint_from_depth=args.checkpoint_from_depth, seed=args.seed,
    )


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, metavar="SRC",
                   help="text files, folders, globs, .jsonl, .parquet, or hf:<dataset id>")
    g.add_argument("--heldout", nargs="+", default=None, metavar="SRC",
                   help="held-out sources (default: a deterministic split of --data by document)")
    g.add_argument("--heldout-fraction", type=float, default=0.1, help="fraction of documents held out without --heldout")
    g.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets")
    g.add_argument("--seq-len", type=positive_int, default=None, help="tokens per block (default 2048 on GPU, 256 on CPU)")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("training (the paper's recipe by default)")
    g.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="blocks per micro-batch per process")
    g.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine")
    g.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip (0 = off)")
    g.add_argument("--log-every", type=positive_int, default=d.log_every, help="steps between metric lines")
    g.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="steps between held-out evaluations")
    g.add_argument("--eval-blocks", type=positive_int, default=d.eval_blocks, help="held-out blocks per evaluation")
    g.add_argument("--save-every", type=positive_int, default=d.save_every, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints, help="checkpoints kept")
    g.add_argument("--train-seed", type=int, default=d.seed, help="seed of the data order")
    g.add_argument("--time-budget", type=positive_float, default=None, help="stop cleanly after this many seconds")
    g.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default=d.mixed_precision,
                   help="auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the adapter folder")


def train_config(args):
    from .train import TrainConfig

    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr,
        beta1=args.beta1, beta2=args.beta2, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip, log_every=args.log_every, eval_every=args.eval_every, eval_blocks=args.eval_blocks,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, seed=args.train_seed,
        time_budget=args.time_budget, mixed_precision=args.mixed_precision,
    )


def runtime():
    """(device, dtype) for evaluation and generation: bf16 on a GPU, fp32 on the CPU."""
    import torch

    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def default_seq_len(args) -> int:
    import torch

    return args.seq_len or (2048 if torch.cuda.is_available() else 256)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="ouroboros", description=__doc__.splitlines()[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("convert", help="convert a base model and write an untrained adapter", formatter_class=fmt)
    p.add_argument("--base", required=True, help="local HF folder, hub id, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--out", required=True, help="adapter folder to write (must not hold an adapter already)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    add_model_flags(p)

    p = sub.add_parser("train", help="train an adapter on text", formatter_class=fmt)
    p.add_argument("--adapter", required=True, help="adapter folder (from `ouroboros convert`); the run lives here")
    add_data_flags(p)
    add_train_flags(p)
    p.add_argument("--depths", type=depths_arg, default=None, help="override the adapter's training depths (e.g. 4,8,16)")

    p = sub.add_parser("eval", help="evaluate full model, pruned baseline and Ouroboros on the same tokens", formatter_class=fmt)
    p.add_argument("--adapter", required=True, help="adapter folder")
    add_data_flags(p)
    p.add_argument("--depths", type=depths_arg, default=(1, 4, 8, 16), help="Ouroboros depths to evaluate")
    p.add_argument("--blocks", type=positive_int, default=32, help="blocks evaluated per split")
    p.add_argument("--batch-size", type=positive_int, default=4, help="blocks per forward pass")
    p.add_argument("--no-full", action="store_true", help="skip the full base model row")
    p.add_argument("--out", default=None, help="folder for eval.json / eval.md (default: the adapter folder)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed choosing the training-distribution blocks")

    p = sub.add_parser("generate", help="generate text through the recursion (streams tokens)", formatter_class=fmt)
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--depth", type=positive_int, default=None, help="recurrence depth (default: the largest training depth)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=positive_float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--baseline", action="store_true", help="generate with the pruned model instead")
    who.add_argument("--full", action="store_true", help="generate with the full base model instead")
    who.add_argument("--compare", action="store_true", help="print full, pruned and Ouroboros continuations")

    p = sub.add_parser("sweep", help="run an experiment grid from a YAML spec (resumable)", formatter_class=fmt)
    p.add_argument("spec", help="sweep spec (YAML); see configs/")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/<spec name>)")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help="run only these runs (by name)")

    p = sub.add_parser("report", help="tables and plots of a sweep folder", formatter_class=fmt)
    p.add_argument("dir", help="sweep folder")

    p = sub.add_parser("demo", help="the main job: SmolLM2-135M on State of the Union addresses", formatter_class=fmt)
    from .demo import DemoConfig

    dd = DemoConfig()
    p.add_argument("--out", default=dd.out, help="run folder (recreated)")
    p.add_argument("--steps", type=positive_int, default=dd.steps, help="training steps")
    p.add_argument("--time-budget", type=positive_float, default=dd.time_budget, help="seconds of training at most")
    p.add_argument("--corpus", default=None, help="folder of SOTU .txt files (default: the cache, `make assets`)")
    return parser


# ---------------------------------------------------------------------- commands
def cmd_convert(args) -> None:
    from .adapter import CONFIG_NAME
    from .loading import load_base_model
    from .model import OuroborosModel

    cfg = model_config(args)  # validates before loading anything
    out = Path(args.out)
    if (out / CONFIG_NAME).exists() and not args.overwrite:
        raise ValueError(f"{out} already holds an adapter; pass --overwrite to replace it (nothing was changed)")
    base = load_base_model(args.base)
    model = OuroborosModel.from_base(base, cfg)
    model.base_name = str(Path(args.base).resolve()) if Path(args.base).exists() else args.base
    model.save_adapter(out)
    parts = model.trainable_parameter_breakdown()
    print(f"wrote untrained adapter to {out} ({len(model.prelude)}+1+{len(model.coda)} layers kept; trainable: "
          + ", ".join(f"{k} {v:,}" for k, v in parts.items()) + ")")


def corpus_for(args, tokenizer, seed: int = 0):
    from .data import build_corpus

    return build_corpus(args.data, tokenizer, default_seq_len(args), heldout=args.heldout,
                        heldout_fraction=args.heldout_fraction, seed=seed, text_field=args.text_field)


def cmd_train(args) -> None:
    import torch

    from .adapter import read_adapter
    from .loading import load_tokenizer
    from .model import OuroborosModel
    from .train import train

    tc = train_config(args)
    tc.validate()
    meta, _ = read_adapter(args.adapter)  # fail fast on a bad adapter folder
    tokenizer = load_tokenizer(meta["base_model"])
    corpus = corpus_for(args, tokenizer)
    print(corpus.describe())
    dtype = torch.bfloat16 if torch.cuda.is_available() and tc.mixed_precision != "no" else torch.float32
    model = OuroborosModel.load_adapter(args.adapter, dtype=dtype, depths=args.depths)
    summary = train(model, corpus, args.adapter, tc, resume=args.resume)
    print(json.dumps(summary, indent=2))


def cmd_eval(args) -> None:
    from .adapter import read_adapter
    from .evaluate import evaluate
    from .loading import load_base_model, load_tokenizer
    from .model import OuroborosModel

    meta, _ = read_adapter(args.adapter)
    max_steps = meta["ouroboros_config"]["max_steps"]
    if max(args.depths) > max_steps:
        raise ValueError(f"--depths: every depth must be in [1, max_steps={max_steps}]; got {max(args.depths)}")
    tokenizer = load_tokenizer(meta["base_model"])
    corpus = corpus_for(args, tokenizer)
    device, dtype = runtime()
    model = OuroborosModel.load_adapter(args.adapter, dtype=dtype, device=device)
    full = None if args.no_full else load_base_model(meta["base_model"], dtype=dtype, device=device)
    splits = corpus.eval_splits(args.blocks, args.eval_seed)
    report = evaluate(model, splits, depths=args.depths, full_model=full, batch_size=args.batch_size,
                      meta={"adapter": str(args.adapter), "base_model": meta["base_model"], "seq_len": corpus.seq_len})
    print(report.table())
    j, m = report.write(args.out or args.adapter)
    print(f"wrote {j} and {m}")


def cmd_generate(args) -> None:
    import torch

    from .adapter import read_adapter
    from .loading import load_base_model, load_tokenizer
    from .model import OuroborosModel

    meta, _ = read_adapter(args.adapter)
    cfg = meta["ouroboros_config"]
    if args.depth is not None and args.depth > cfg["max_steps"]:
        raise ValueError(f"--depth must be in [1, max_steps={cfg['max_steps']}]; got {args.depth}")
    if args.top_p is not None and args.top_p > 1:
        raise ValueError(f"--top-p must be in (0, 1]; got {args.top_p}")
    tok = load_tokenizer(meta["base_model"])
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=not args.chat).input_ids
    sample = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    eos = tok.eos_token_id
    runs = ["full", "baseline", "ouroboros"] if args.compare else ["full" if args.full else "baseline" if args.baseline else "ouroboros"]
    model = full = None
    device, dtype = runtime()
    if any(r != "full" for r in runs):
        model = OuroborosModel.load_adapter(args.adapter, dtype=dtype, device=device)
    if "full" in runs:
        full = load_base_model(meta["base_model"], dtype=dtype, device=device)
    ids = ids.to(device)
    depth = args.depth or max(cfg["depths"])
    for who in runs:
        if args.compare:
            label = {"full": "full model", "baseline": "pruned baseline", "ouroboros": f"ouroboros (depth {depth})"}[who]
            print(f"\n=== {label} ===")
        print(args.prompt, end="", flush=True)
        if who == "full":
            from transformers import TextStreamer

            if args.seed is not None:
                torch.manual_seed(args.seed)
            gen_kw = dict(sample) if args.do_sample else {"do_sample": False}
            full.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                          streamer=TextStreamer(tok, skip_prompt=True), **gen_kw)
            continue
        produced: list[int] = []
        shown = [""]

        def stream(token):
            produced.append(int(token[0]))
            text = tok.decode(produced, skip_special_tokens=True)
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text

        model.generate(ids, max_new_tokens=args.max_new_tokens, depth=depth, eos_token_id=eos, seed=args.seed,
                       baseline=who == "baseline", on_token=stream, **sample)
        print()


def cmd_sweep(args) -> None:
    from .sweep import run_sweep

    run_sweep(args.spec, out=args.out, only=args.only)


def cmd_report(args) -> None:
    from .report import write_report

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"sweep folder not found: {args.dir}")
    write_report(args.dir)


def cmd_demo(args) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, steps=args.steps, time_budget=args.time_budget, corpus=args.corpus))


COMMANDS = {"convert": cmd_convert, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "sweep": cmd_sweep,
            "report": cmd_report, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, OSError) as e:  # bad input, missing/unreadable files, unreachable hub ids
        print(f"ouroboros {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .train import TrainingError

        if not isinstance(e, TrainingError):
            raise
        print(f"ouroboros {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ouroboros {args.command}: interrupted; the last checkpoint is kept (use --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
