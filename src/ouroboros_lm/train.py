"""Training: AdamW over the trainable parts only, warmup + cosine, gradient clipping and
accumulation, a depth sampled per step, held-out evaluation and atomic checkpoints that
`--resume` continues exactly. Built on accelerate: CPU, bf16 on GPU, several processes.

Run folder layout (the adapter folder itself):
  adapter_config.json, adapter_model.safetensors   the latest trained adapter
  checkpoints/step_000100/                          adapter files + optimizer.pt + trainer_state.json
  metrics.jsonl                                     one JSON object per logged step / evaluation
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import atomic_write_bytes, copy_into, fsync_dir, read_adapter, save_adapter
from .data import BlockSampler, Corpus
from .evaluate import mean_loss

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss or gradient); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4  # blocks per micro-batch, per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 1e-6
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_blocks: int = 16
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    time_budget: float | None = None  # seconds; stop cleanly (checkpoint + adapter) when spent
    stop_after: int | None = None  # stop after this step as if interrupted (schedule still for `steps`)
    mixed_precision: str = "auto"  # auto = bf16 on GPU, none on CPU
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "save_every", "keep_checkpoints", "eval_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}]; got {self.min_lr!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping); got {self.grad_clip!r}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be a positive number of seconds; got {self.time_budget!r}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in [1, steps={self.steps}]; got {self.stop_after!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be one of auto, no, bf16, fp16; got {self.mixed_precision!r}")


def lr_lambda(tc: TrainConfig):
    """Linear warmup to lr, then cosine down to min_lr at `steps`."""

    def f(step: int) -> float:
        if tc.warmup_steps and step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        span = max(1, tc.steps - tc.warmup_steps)
        progress = min(1.0, (step - tc.warmup_steps) / span)
        floor = tc.min_lr / tc.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def out_of_memory_message(tc: TrainConfig, seq_len: int, depth: int, device, err) -> str:
    return (
        f"out of memory on {device} for a micro-batch of {tc.batch_size} x {seq_len} tokens at depth {depth} "
        f"({str(err).splitlines()[0][:120]}). Lower --batch-size (raise --grad-accum to keep the effective batch), "
        "lower --seq-len, or turn on activation checkpointing with --checkpoint-from-depth at convert time"
    )


def fault_point(name: str, step: int) -> None:
    """Fault injection for the crash tests: OUROBOROS_FAULT=<name>:<step> kills this process
    with SIGKILL at that point. Never set in normal use."""
    spec = os.environ.get("OUROBOROS_FAULT")
    if spec and spec == f"{name}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def step_depth(depths: tuple[int, ...], seed: int, step: int) -> int:
    """The depth trained at `step`: uniform over `depths`, stateless in step (exact resume)."""
    return random.Random(seed * 7_919 + step).choice(depths)


# ---------------------------------------------------------------------- checkpoints
def list_checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE).is_file())


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, step: int, extra: dict, keep: int) -> Path:
    """Write checkpoints/step_N atomically: everything goes into a temporary folder that is
    renamed into place only once complete."""
    ckpt_root = run_dir / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp-step_{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_adapter(model, tmp)
    fault_point("kill_during_save", step)
    for name, obj in (("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", scheduler.state_dict())):
        with open(tmp / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    atomic_write_bytes(tmp / STATE, (json.dumps({"step": step, **extra}, indent=2) + "\n").encode())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines written after `step` (a resumed run writes them again)."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a killed process
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


# ---------------------------------------------------------------------- the loop
def release_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one precision per process; a second run in the same process (a notebook,
    a sweep, a test) with another precision would be refused. Forget the earlier precision; the
    process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and str(previous) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def train(model, corpus: Corpus, run_dir: str | Path, tc: TrainConfig, resume: bool = False, accelerator=None,
          on_batch=None) -> dict:
    """Train `model` (an OuroborosModel, e.g. from load_adapter) on `corpus`; checkpoints and
    metrics go under `run_dir`, and the final adapter is written to `run_dir`.

    on_batch(step, micro, block_indices), if given, is called for every micro-batch.
    Returns a summary: steps done, final losses, wall time, whether it stopped early."""
    from accelerate import Accelerator

    tc.validate()
    run_dir = Path(run_dir)
    existing = list_checkpoints(run_dir)
    if resume and not existing:
        raise ValueError(f"--resume: {run_dir / CHECKPOINTS} holds no complete checkpoint to resume from")
    if not resume and existing:
        raise ValueError(
            f"{run_dir} already has checkpoints (latest {existing[-1].name}); pass --resume to continue that run, "
            "or convert into a new folder to start over (nothing was changed)"
        )
    from .model import check_token_range

    for what, blocks in (("training tokens", corpus.train), ("held-out tokens", corpus.heldout)):
        check_token_range(blocks, model.vocab_size, what)  # once, here, not in every forward
    if accelerator is None:
        mp = tc.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        release_accelerator_state(mp)
        # cpu=True on a machine without CUDA: under `accelerate launch`/torchrun that is what makes
        # several CPU processes form a gloo process group instead of each running alone.
        accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    device = accelerator.device
    model.to(device)
    cfg = model.config
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    start, prior_elapsed = 0, 0.0
    if resume:
        ckpt = existing[-1]
        copy_into(model, read_adapter(ckpt)[1], trainable_only=True)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        state = json.loads((ckpt / STATE).read_text())
        start, prior_elapsed = state["step"], state.get("elapsed_s", 0.0)
        if accelerator.is_main_process:
            truncate_metrics(run_dir, start)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    model = accelerator.unwrap_model(ddp_model)
    model.train()

    sampler = BlockSampler(corpus.train.shape[0], tc.seed)
    heldout = corpus.heldout[: tc.eval_blocks]
    eval_depth = max(cfg.depths)
    rank, world = accelerator.process_index, accelerator.num_processes
    tokens_per_step = tc.batch_size * tc.grad_accum * world * corpus.seq_len
    heldout_baseline = None
    t0 = time.time()
    window: list[tuple[float, float | None]] = []
    last = {"loss": None, "baseline_loss": None, "heldout_loss": None}
    stopped_early = None
    end = tc.stop_after or tc.steps
    bar = tqdm(total=tc.steps, initial=start, desc="training", disable=not (tc.progress and accelerator.is_main_process),
               unit="step", dynamic_ncols=True)
    step = start
    while step < end:
        depth = step_depth(cfg.depths, tc.seed, step)
        log_now = (step + 1) % tc.log_every == 0 or step + 1 == end
        step_loss = torch.zeros((), device=device)
        baseline = None
        for micro in range(tc.grad_accum):
            idx = sampler.batch(step * tc.grad_accum + micro, tc.batch_size, rank, world)
            if on_batch is not None:
                on_batch(step, micro, idx)
            ids = corpus.train[idx].to(device)
            sync = micro == tc.grad_accum - 1
            ctx = accelerator.no_sync(ddp_model) if not sync and world > 1 else contextlib.nullcontext()
            try:
                with ctx, accelerator.autocast():
                    loss = ddp_model(ids, labels=ids, depth=depth).loss
                    accelerator.backward(loss / tc.grad_accum)
            except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
                if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "memory" not in str(e).lower():
                    raise
                raise TrainingError(out_of_memory_message(tc, corpus.seq_len, depth, device, e)) from None
            step_loss += loss.detach() / tc.grad_accum
            if log_now and micro == 0:
                with torch.no_grad(), accelerator.autocast():
                    baseline = model.forward_baseline(ids, labels=ids).loss.detach()
        grad_norm = accelerator.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        mean_loss_all = accelerator.reduce(step_loss, "mean").item()
        gnorm = float(grad_norm)
        if not (math.isfinite(mean_loss_all) and math.isfinite(gnorm)):
            optimizer.zero_grad(set_to_none=True)
            bar.close()
            last_good = list_checkpoints(run_dir)
            raise TrainingError(
                f"non-finite {'loss' if not math.isfinite(mean_loss_all) else 'gradient norm'} at step {step + 1} "
                f"(loss {mean_loss_all}, grad norm {gnorm}); stopped without saving. The last good checkpoint is "
                f"{last_good[-1] if last_good else 'none (no checkpoint was written yet)'}; lower --lr or check the data"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if baseline is not None:
            baseline = accelerator.reduce(baseline, "mean").item()
        window.append((mean_loss_all, baseline))
        last["loss"] = mean_loss_all
        elapsed = time.time() - t0
        if log_now and accelerator.is_main_process:
            losses = [l for l, _ in window]
            bases = [b for _, b in window if b is not None]
            rec = {"step": step, "loss": sum(losses) / len(losses), "baseline_loss": bases[-1] if bases else None,
                   "depth": depth, "lr": scheduler.get_last_lr()[0], "grad_norm": gnorm,
                   "tokens_per_s": (step - start) * tokens_per_step / max(elapsed, 1e-9), "elapsed_s": elapsed}
            append_metrics(run_dir, rec)
            last["baseline_loss"] = rec["baseline_loss"]
            bar.set_postfix(loss=f"{rec['loss']:.3f}", base=f"{rec['baseline_loss']:.3f}" if bases else "-",
                            d=depth, tok_s=f"{rec['tokens_per_s']:.0f}")
            window.clear()
        bar.update(1)
        if step % tc.eval_every == 0 or step == end:
            if accelerator.is_main_process:
                if heldout_baseline is None:
                    heldout_baseline = mean_loss(lambda x: model.forward_baseline(x).logits, heldout, tc.batch_size, device)
                model.eval()
                with accelerator.autocast():
                    held = mean_loss(lambda x: model(x, depth=eval_depth).logits, heldout, tc.batch_size, device)
                model.train()
                last["heldout_loss"] = held
                append_metrics(run_dir, {"step": step, "heldout_loss": held, "heldout_baseline_loss": heldout_baseline,
                                         "eval_depth": eval_depth, "heldout_tokens": int(heldout[:, 1:].numel())})
                bar.write(f"step {step}: held-out loss {held:.4f} at depth {eval_depth} (pruned baseline {heldout_baseline:.4f})")
            accelerator.wait_for_everyone()
        out_of_time = tc.time_budget is not None and time.time() - t0 >= tc.time_budget
        if step % tc.save_every == 0 or step == end or out_of_time:
            if accelerator.is_main_process:
                save_checkpoint(run_dir, model, optimizer, scheduler, step,
                                {"train_config": dataclasses.asdict(tc), "depth": depth,
                                 "elapsed_s": prior_elapsed + time.time() - t0}, tc.keep_checkpoints)
            accelerator.wait_for_everyone()
        if out_of_time and step < end:
            stopped_early = f"time budget of {tc.time_budget:.0f}s spent after step {step}"
            bar.write(f"stopping: {stopped_early}; checkpoint saved, --resume continues")
            break
    bar.close()
    if accelerator.is_main_process:
        save_adapter(model, run_dir)
    accelerator.wait_for_everyone()
    return {"steps_done": step, "steps": tc.steps, "final_loss": last["loss"], "final_baseline_loss": last["baseline_loss"],
            "heldout_loss": last["heldout_loss"], "wall_s": prior_elapsed + time.time() - t0, "stopped_early": stopped_early}

