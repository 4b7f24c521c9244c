"""Training as a small recipe: AdamW over the trainable parts only, warmup + cosine, gradient
clipping and accumulation, a depth drawn per step, held-out evaluation and atomic checkpoints
that `resume` continues exactly. Built on accelerate: CPU, bf16 on GPU, several processes.

`Trainer(model, corpus, run_dir, TrainConfig(...)).run()`; each part (setup, resume, one step,
evaluation, checkpoint) is its own method. The run folder's files are in `checkpoints.py`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import copy_into, save_adapter
from .atomic import ensure_dir
from .checkpoints import (CHECKPOINTS, append_metrics, iter_metrics, list_checkpoints, load_resumable,
                          refuse_planted_links, remove_partial_checkpoints, run_lock, save_checkpoint,
                          set_aside_metrics, truncate_metrics)
from .config import MAX_DEPTH
from .data import Corpus
from .evaluate import mean_loss, model_loss
from .loss import step_objective
from .model import check_token_range
from .recurrence import CHECKPOINTING, StepTraining
from .runtime import PRECISIONS, choose_runtime, release_accelerator_state
from .schedules import DEPTH_SCHEDULES, lr_lambda, readout_steps, step_depth
from .settings import setting, structural_fields, to_dict, validate_fields
from .teacher import check_teacher, teacher_targets
from .tuning import tuned_parameters

BIG = 10**9
TRACKERS = ("none", "tensorboard", "wandb")
DISTILL_SOURCES = ("stored", "online")
TRACKING_DIR = "tracking"  # trackers' local files (TensorBoard events) under the run folder


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss or gradient, out of memory); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """How a run trains. `structural` settings define the run: `resume` refuses to change them."""

    steps: int = setting(1000, "optimizer steps", low=1, high=BIG, structural=True)
    batch_size: int = setting(4, "blocks per micro-batch, per process", low=1, high=65536, structural=True)
    grad_accum: int = setting(1, "micro-batches per optimizer step", low=1, high=65536, structural=True)
    lr: float = setting(3e-4, "peak learning rate (AdamW)", above=0, high=10.0, structural=True)
    tune_lr: float = setting(1e-3, "peak learning rate of the layers a heal model trains in full (tune_layers), the "
                             "same warmup and decay (configs/half-layers-lr.yaml, 46 steps: 1e-3 and 3e-3 within 0.03 "
                             "nats on training text, 1e-4 0.25 behind)", above=0, high=10.0, structural=True)
    min_lr: float = setting(1e-6, "learning rate at the end of the cosine", low=0, high=10.0, structural=True)
    beta1: float = setting(0.9, "AdamW beta1", low=0, high=0.999999, structural=True)
    beta2: float = setting(0.95, "AdamW beta2", low=0, high=0.999999, structural=True)
    weight_decay: float = setting(0.01, "AdamW weight decay", low=0, high=10.0, structural=True)
    warmup_steps: int = setting(100, "linear warmup steps", low=0, high=BIG, structural=True)
    grad_clip: float = setting(1.0, "gradient norm clip (0 = off)", low=0, high=1e9, structural=True)
    depths: tuple[int, ...] = setting((4, 8, 16), "recurrence depths: uniform draws from this list; "
                                      "lognormal_poisson draws within [min, max] of it", low=1, high=MAX_DEPTH, structural=True)
    depth_schedule: str = setting("uniform", "how each step's depth is drawn: uniform over depths; lognormal_poisson "
                                  "(Huginn: Poisson with a log-normal rate of mean depth_mean, clipped to the depths' "
                                  "range)", choices=DEPTH_SCHEDULES, structural=True)
    depth_mean: float = setting(6.0, "mean depth of the lognormal_poisson schedule", above=1.0, high=MAX_DEPTH,
                                structural=True)
    param_steps: int = setting(0, "distinct per-step parameter sets (norms, step embedding) to train: deeper steps "
                               "reuse the last one (0: the largest training depth)", low=0, high=MAX_DEPTH,
                               structural=True)
    backprop_steps: int = setting(0, "backpropagate through only the last k recurrence steps (earlier ones run "
                                  "without gradients, so deep draws cost what k steps cost; 0 = all)", low=0,
                                  high=MAX_DEPTH, structural=True)
    step_loss_weight: float = setting(0.0, "per-step supervision: weight of the next-token loss read out (through the "
                                      "coda and head) after step_loss_samples intermediate steps, drawn among the "
                                      "steps with gradients, averaged over them and added to the final loss (0: off)",
                                      low=0.0, high=1e3, structural=True)
    step_loss_samples: int = setting(1, "intermediate steps read out per optimizer step under step_loss_weight or "
                                     "monotonic_weight", low=1, high=MAX_DEPTH, structural=True)
    monotonic_weight: float = setting(0.0, "weight of the monotonicity term: the sum of relu(later loss - earlier "
                                      "loss) over the read-out steps and the final one, so no step may make the "
                                      "prediction worse (LoopUS; 0: off)", low=0.0, high=1e3, structural=True)
    distill_weight: float = setting(0.0, "weight of KL(full model || ours) on the next-token distributions in the "
                                    "loss: distillation from the full base model (0: off)", low=0.0, high=1e3,
                                    structural=True)
    distill_source: str = setting("stored", "where the teacher's predictions come from: stored (its top-K, computed "
                                  "once for the blocks the run draws and kept beside the prepared tokens, reused by "
                                  "every later run; no teacher in memory while training) or online (the full model "
                                  "runs beside ours at every step; the exact KL)", choices=DISTILL_SOURCES,
                                  structural=True)
    distill_top_k: int = setting(32, "stored teacher predictions per token (the rest of its mass is one bucket)",
                                 low=1, high=1 << 20, structural=True)
    ce_weight: float = setting(1.0, "weight of the next-token cross-entropy in the loss (0 with distill_weight: "
                               "the teacher's distribution alone)", low=0.0, high=1e3, structural=True)
    seed: int = setting(0, "seed of the data order and the depth draws", low=0, high=2**63 - 1, structural=True)
    mixed_precision: str = setting("auto", "auto = bf16 on GPU, fp32 on CPU", choices=PRECISIONS, structural=True)
    checkpoint: str = setting("auto", "activation checkpointing per recurrence step: auto (when the step's "
                              "activations would not fit half the free memory), always, never", choices=CHECKPOINTING)
    log_every: int = setting(10, "steps between metric lines", low=1, high=BIG)
    eval_every: int = setting(100, "steps between held-out evaluations", low=1, high=BIG)
    eval_blocks: int = setting(16, "held-out blocks per evaluation", low=1, high=BIG)
    save_every: int = setting(100, "steps between checkpoints", low=1, high=BIG)
    keep_checkpoints: int = setting(2, "checkpoints kept", low=1, high=10000)
    time_budget: float | None = setting(None, "stop cleanly (checkpoint + adapter) after this many seconds", above=0,
                                        high=1e9)
    stop_after: int | None = setting(None, "stop after this step as if interrupted (the schedule still runs to "
                                     "`steps`)", low=1, high=BIG, cli=False, sweep=False)
    progress: bool = setting(True, "show a progress bar", cli=False, sweep=False)
    report_to: str = setting("none", "also log metrics and the run's settings to an experiment tracker through "
                             "accelerate (tensorboard: RUN/tracking/; wandb: set WANDB_MODE=offline to stay offline); "
                             "metrics.jsonl is always written", choices=TRACKERS, sweep=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        validate_fields(self)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}]; got {self.min_lr!r}")
        if self.stop_after is not None and self.stop_after > self.steps:
            raise ValueError(f"stop_after must be in [1, steps={self.steps}]; got {self.stop_after!r}")
        if self.ce_weight == 0 and self.distill_weight == 0:
            raise ValueError("ce_weight and distill_weight are both 0: the loss would be empty")
        if self.monotonic_weight and self.distill_weight:
            raise ValueError("monotonic_weight compares next-token losses; it cannot be combined with distill_weight")


def out_of_memory_message(tc: TrainConfig, seq_len: int, depth: int, device, err) -> str:
    return (
        f"out of memory on {device} for a micro-batch of {tc.batch_size} x {seq_len} tokens at depth {depth} "
        f"({str(err).splitlines()[0][:120]}). Lower --batch-size (raise --grad-accum to keep the effective batch), "
        "lower --seq-len, or pass --checkpoint always"
    )


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")  # CUDA's, then the CPU allocator's


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or any(m in str(e).lower() for m in OUT_OF_MEMORY)


def is_loader(teacher) -> bool:
    """A teacher given as a function that loads it (a model is callable too, but is not one)."""
    return callable(teacher) and not isinstance(teacher, torch.nn.Module)


def resume_conflicts(saved: dict, tc: TrainConfig, seq_len: int, data: dict | None = None) -> list[str]:
    """The settings that define the run and differ from the checkpoint's, as 'name: saved X, asked Y'
    (`data`: what the batches are drawn from, `Corpus.sampling_key`)."""
    now = {**to_dict(tc), "seq_len": seq_len, "data": data}
    was = {**saved.get("train_config", {}), "seq_len": saved.get("seq_len", seq_len), "data": saved.get("data", data)}
    return [f"{k}: saved {was[k]!r}, asked {now[k]!r}" for k in (*structural_fields(TrainConfig), "seq_len", "data")
            if k in was and was[k] != now[k]]


class Trainer:
    """One training run of `model` on `corpus`; checkpoints and metrics go under `run_dir`, and
    the final adapter is written to `run_dir`.

    on_batch(step, micro, block_indices), if given, is called for every micro-batch.
    teacher: the full base model (a Hugging Face causal LM), or a function loading it (called only when
    needed), for `tc.distill_weight` > 0: online, or to compute the stored targets the data lacks."""

    def __init__(self, model, corpus: Corpus, run_dir: str | Path, tc: TrainConfig, resume: bool = False,
                 accelerator=None, on_batch=None, teacher=None):
        tc.validate()
        self.model, self.corpus, self.run_dir, self.tc = model, corpus, Path(run_dir), tc
        self.teacher = teacher if tc.distill_weight > 0 else None
        self.targets = None  # `targets.CorpusTargets` under distill_source "stored"
        self.resuming, self.accelerator, self.on_batch = resume, accelerator, on_batch
        self.start, self.prior_elapsed, self.heldout_baseline = 0, 0.0, None
        self.last = {"loss": None, "baseline_loss": None, "heldout_loss": None}

    # ------------------------------------------------------------------ set-up
    def check(self) -> None:
        """Everything that can be refused before any work starts."""
        tc, cfg = self.tc, self.model.config
        for d in tc.depths:
            cfg.check_depth(d, "depths")
        refuse_planted_links(self.run_dir, TRACKING_DIR)
        existing = list_checkpoints(self.run_dir)
        if self.resuming and not existing:
            raise ValueError(f"--resume: {self.run_dir / CHECKPOINTS} holds no complete checkpoint to resume from")
        if not self.resuming and existing:
            raise ValueError(f"{self.run_dir} already has checkpoints (latest {existing[-1].name}); pass --resume to "
                             "continue that run, or convert into a new folder to start over (nothing was changed)")
        if self.resuming:
            self.resumed = load_resumable(existing[-1], self.model)  # all of it checked before any work
            for _ in iter_metrics(self.run_dir):  # a damaged metrics file is named now, not after the model is set up
                pass  # (streamed: a file of any length costs one line's memory)
            conflicts = resume_conflicts(self.resumed["state"], tc, self.corpus.seq_len, self.corpus.sampling_key())
            if conflicts:
                raise ValueError("--resume with settings that differ from the run's: " + "; ".join(conflicts)
                                 + " (pass the original values; nothing was changed)")
        if tc.distill_weight > 0 and tc.distill_source == "online":
            if self.teacher is None:
                raise ValueError("distill_weight > 0 needs the full model as the teacher (Trainer(..., teacher=base))")
            if not is_loader(self.teacher):
                check_teacher(self.teacher, self.model.vocab_size)
        if tc.distill_weight > 0 and tc.distill_source == "stored":
            if tc.distill_top_k >= self.model.vocab_size:
                raise ValueError(f"distill_top_k must be below the vocabulary ({self.model.vocab_size}); "
                                 f"got {tc.distill_top_k}")
            if not self.corpus.train_folders:
                raise ValueError("distill_source stored needs a corpus built from prepared folders or text sources "
                                 "(data.build_corpus); pass --distill-source online for blocks given as tensors")
        for what, blocks in (("training tokens", self.corpus.train), ("held-out tokens", self.corpus.heldout)):
            check_token_range(blocks, self.model.vocab_size, what)  # once, here, not in every forward

    def make_accelerator(self) -> None:
        from accelerate import Accelerator

        if self.accelerator is None:
            runtime = choose_runtime(self.tc.mixed_precision)
            release_accelerator_state(runtime.mixed_precision)
            # cpu=True on a machine without CUDA: under `accelerate launch`/torchrun that is what makes
            # several CPU processes form a gloo process group instead of each running alone.
            self.accelerator = Accelerator(mixed_precision=runtime.mixed_precision, cpu=not torch.cuda.is_available(),
                                           log_with=None if self.tc.report_to == "none" else self.tc.report_to,
                                           project_dir=str(self.run_dir / TRACKING_DIR))

    def setup(self) -> None:
        tc, acc = self.tc, self.accelerator
        self.device = acc.device
        self.model.to(self.device)
        if self.teacher is not None and tc.distill_source == "online":
            self.teacher = self.load_teacher()
        self.step_training = StepTraining(tc.checkpoint, tc.backprop_steps)
        # the policy training sets: steps past the deepest trained one reuse its parameters (never
        # ones that saw no gradient)
        policy = self.model.policy
        self.model.policy = policy.replace(trained_depth=tc.param_steps or max(policy.trained_depth, max(tc.depths)))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        tuned = {id(p) for p in tuned_parameters(self.model).values()}
        groups = [{"params": [p for p in self.params if id(p) not in tuned], "lr": tc.lr},
                  {"params": [p for p in self.params if id(p) in tuned], "lr": tc.tune_lr}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                           weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc))
        if acc.is_main_process:
            remove_partial_checkpoints(self.run_dir)
            if not self.resuming and (old := set_aside_metrics(self.run_dir)) is not None:
                print(f"{self.run_dir / 'metrics.jsonl'} of an earlier run that saved no checkpoint was moved to {old}")
        if self.resuming:
            self.resume()
        self.start_tracking()
        self.ddp_model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.model = acc.unwrap_model(self.ddp_model)
        self.model.train()
        self.sampler = self.corpus.sampler(tc.seed)
        self.tokens_per_step = tc.batch_size * tc.grad_accum * acc.num_processes * self.corpus.seq_len
        if tc.distill_weight > 0 and tc.distill_source == "stored":
            self.stored_targets()

    def load_teacher(self):
        """The teacher on this device, frozen (loaded now when given as a function)."""
        if self.teacher is None:
            raise ValueError("distill_weight > 0 needs the full model as the teacher: the stored teacher targets lack "
                             "blocks this run draws (Trainer(..., teacher=base))")
        teacher = self.teacher() if is_loader(self.teacher) else self.teacher
        check_teacher(teacher, self.model.vocab_size)
        return teacher.to(self.device).eval().requires_grad_(False)

    def stored_targets(self) -> None:
        """The teacher's top-K predictions for every block this run will draw, from beside the prepared
        tokens; the ones missing are computed first (the teacher loaded for that only, then let go)."""
        from .targets import corpus_targets

        tc, acc = self.tc, self.accelerator
        end = (tc.stop_after or tc.steps) * tc.grad_accum
        blocks = self.corpus.blocks_drawn(tc.seed, range(self.start * tc.grad_accum, end), tc.batch_size,
                                          acc.num_processes)
        self.targets = corpus_targets(self.corpus, self.corpus.seq_len, tc.distill_top_k, self.model.base_fingerprints,
                                      self.model.vocab_size, blocks, self.load_teacher, self.model.base_name or "",
                                      progress=tc.progress and acc.is_main_process)
        self.teacher = None  # not held while training
        if acc.is_main_process and tc.progress:
            print(self.targets.describe())

    def resume(self) -> None:
        """Weights, optimizer, scheduler and the step count from the latest complete checkpoint."""
        saved = self.resumed  # read and checked against the model by `check`
        copy_into(self.model, saved["tensors"], trainable_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])  # moved to the parameters' device
        self.scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        self.start, self.prior_elapsed = state["step"], state.get("elapsed_s", 0.0)
        if self.accelerator.is_main_process:
            truncate_metrics(self.run_dir, self.start)

    def start_tracking(self) -> None:
        """Experiment trackers (`report_to`), with the run's settings (training, model, data) as their
        configuration. A resumed run tells TensorBoard to drop events after the checkpoint's step."""
        if self.tc.report_to == "none":
            return
        import importlib.util

        if importlib.util.find_spec(self.tc.report_to) is None:
            raise ValueError(f"--report-to {self.tc.report_to} needs the {self.tc.report_to} package: "
                             f"pip install {self.tc.report_to}")
        config = {**{f"train/{k}": v for k, v in to_dict(self.tc).items()},
                  **{f"model/{k}": v for k, v in self.model.config.to_dict().items()},
                  "data/seq_len": self.corpus.seq_len, "base_model": self.model.base_name}
        config = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}
        init_kwargs = {"tensorboard": {"purge_step": self.start + 1}} if self.resuming else {}
        ensure_dir(self.run_dir / TRACKING_DIR / "ouroboros-lm", under=self.run_dir)  # never a planted link
        self.accelerator.init_trackers("ouroboros-lm", config=config, init_kwargs=init_kwargs)

    def track(self, rec: dict) -> None:
        """Send a metrics record to the trackers (numbers only, at its step)."""
        self.accelerator.log({k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))},
                             step=rec["step"])

    def stop_tracking(self) -> None:
        """Close the trackers (not `end_training`, which would also end the process group that a
        sweep or notebook may still use)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()

    # ------------------------------------------------------------------ one step
    def forward_backward(self, ids: torch.Tensor, step: int, depth: int, sync: bool, idx=None) -> torch.Tensor:
        acc, tc = self.accelerator, self.tc
        ctx = acc.no_sync(self.ddp_model) if not sync and acc.num_processes > 1 else contextlib.nullcontext()
        try:
            with ctx, acc.autocast():
                teacher = (self.targets.teacher(idx, tc.distill_weight, tc.ce_weight) if self.targets is not None
                           else teacher_targets(self.teacher, ids, tc.distill_weight, tc.ce_weight)
                           if self.teacher is not None else None)
                readout = readout_steps(self.tc, step, depth)
                out = self.ddp_model(ids, labels=ids, depth=depth, teacher=teacher, training=self.step_training,
                                     readout_steps=readout or None)
                objective = out.loss + step_objective(self.tc, out.loss, out.step_losses if readout else None, ids)
                acc.backward(objective / self.tc.grad_accum)
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            raise TrainingError(out_of_memory_message(self.tc, self.corpus.seq_len, depth, self.device, e)) from None
        if out.kl_loss is None:
            return out.loss.detach()
        self.kl_sum += out.kl_loss / self.tc.grad_accum
        return out.ce_loss  # the next-token loss, comparable across runs (the KL is logged beside it)

    def train_step(self, step: int, log: bool) -> dict:
        """One optimizer step (all micro-batches); the pruned baseline's loss on the first
        micro-batch when `log`. Raises TrainingError on a non-finite loss or gradient."""
        tc, acc = self.tc, self.accelerator
        depth = step_depth(tc, step)
        step_loss, baseline = torch.zeros((), device=self.device), None
        self.kl_sum = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            idx = self.sampler.batch(step * tc.grad_accum + micro, tc.batch_size, acc.process_index, acc.num_processes)
            if self.on_batch is not None:
                self.on_batch(step, micro, idx)
            ids = self.corpus.train[idx].to(self.device)
            step_loss += self.forward_backward(ids, step, depth, sync=micro == tc.grad_accum - 1, idx=idx) / tc.grad_accum
            if log and micro == 0:
                with torch.no_grad(), acc.autocast():
                    baseline = self.model(ids, labels=ids, baseline=True).loss.detach()
        grad_norm = acc.clip_grad_norm_(self.params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        loss, gnorm = acc.reduce(step_loss, "mean").item(), float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            self.optimizer.zero_grad(set_to_none=True)
            last_good = list_checkpoints(self.run_dir)
            raise TrainingError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step + 1} "
                f"(loss {loss}, grad norm {gnorm}); stopped without saving. The last good checkpoint is "
                f"{last_good[-1] if last_good else 'none (no checkpoint was written yet)'}; lower --lr or check the data"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        base = acc.reduce(baseline, "mean").item() if baseline is not None else None
        rec = {"loss": loss, "baseline_loss": base, "depth": depth, "grad_norm": gnorm}
        if tc.distill_weight > 0:  # loss is the objective; its KL term on its own
            rec["kl"] = acc.reduce(self.kl_sum, "mean").item()
        return rec

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self, step: int) -> dict:
        """Held-out loss at the model's default depth and the pruned baseline's, both under the
        run's autocast, on the first `eval_blocks` held-out blocks."""
        heldout, depth = self.corpus.heldout[: self.tc.eval_blocks], self.model.policy.default_depth
        self.model.eval()
        with self.accelerator.autocast():
            if self.heldout_baseline is None:
                self.heldout_baseline = mean_loss(model_loss(self.model, baseline=True), heldout,
                                                  self.tc.batch_size, self.device)
            held = mean_loss(model_loss(self.model, depth=depth), heldout, self.tc.batch_size, self.device)
        self.model.train()
        self.last["heldout_loss"] = held
        return {"step": step, "heldout_loss": held, "heldout_baseline_loss": self.heldout_baseline,
                "eval_depth": depth, "heldout_tokens": int(heldout[:, 1:].numel())}

    def checkpoint(self, step: int, depth: int, elapsed: float) -> None:
        state = {"train_config": to_dict(self.tc), "seq_len": self.corpus.seq_len, "data": self.corpus.sampling_key(),
                 "depth": depth,
                 "elapsed_s": self.prior_elapsed + elapsed}
        save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, step, state, self.tc.keep_checkpoints)

    def on_main(self, fn, *args):
        """Run fn on the main process only; every process waits for it."""
        if self.accelerator.is_main_process:
            fn(*args)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the loop
    def log(self, step: int, window: list[dict], t0: float, bar) -> None:
        losses = [r["loss"] for r in window]
        bases = [r["baseline_loss"] for r in window if r["baseline_loss"] is not None]
        elapsed = time.time() - t0
        rec = {"step": step, "loss": sum(losses) / len(losses), "baseline_loss": bases[-1] if bases else None,
               "depth": window[-1]["depth"], "lr": self.scheduler.get_last_lr()[0], "grad_norm": window[-1]["grad_norm"],
               "tokens_per_s": (step - self.start) * self.tokens_per_step / max(elapsed, 1e-9), "elapsed_s": elapsed,
               **self.corpus.tokens_seen(step * self.tokens_per_step // self.corpus.seq_len, self.tc.seed)}
        if "kl" in window[-1]:
            rec["kl"] = sum(r["kl"] for r in window) / len(window)
        append_metrics(self.run_dir, rec)
        self.track(rec)
        self.last["baseline_loss"] = rec["baseline_loss"]
        bar.set_postfix(loss=f"{rec['loss']:.3f}", base=f"{rec['baseline_loss']:.3f}" if bases else "-",
                        d=rec["depth"], tok_s=f"{rec['tokens_per_s']:.0f}")

    def write_eval(self, step: int, bar) -> None:
        rec = self.evaluate(step)
        append_metrics(self.run_dir, rec)
        self.track(rec)
        where = "" if self.model.config.heal_layers else f" at depth {rec['eval_depth']}"  # a heal model has none
        bar.write(f"step {step}: held-out loss {rec['heldout_loss']:.4f}{where} "
                  f"(pruned baseline {rec['heldout_baseline_loss']:.4f})")

    def run(self) -> dict:
        """Train to `steps` (or `stop_after`, or the time budget); returns a summary: steps done,
        final losses, wall time, whether it stopped early."""
        self.check()
        self.make_accelerator()
        # one lock per run: the main process holds it for all of them
        with run_lock(self.run_dir) if self.accelerator.is_main_process else contextlib.nullcontext():
            self.setup()
            try:
                return self.loop()
            finally:
                self.stop_tracking()

    def loop(self) -> dict:
        tc, main = self.tc, self.accelerator.is_main_process
        end, step, t0, window, stopped_early = tc.stop_after or tc.steps, self.start, time.time(), [], None
        bar = tqdm(total=tc.steps, initial=step, desc="training", disable=not (tc.progress and main), unit="step",
                   dynamic_ncols=True)
        with bar:
            while step < end:
                log = (step + 1) % tc.log_every == 0 or step + 1 == end
                rec = self.train_step(step, log)
                window.append(rec)
                step += 1
                self.last["loss"] = rec["loss"]
                if log and main:
                    self.log(step, window, t0, bar)
                    window.clear()
                bar.update(1)
                if step % tc.eval_every == 0 or step == end:
                    self.on_main(self.write_eval, step, bar)
                out_of_time = tc.time_budget is not None and time.time() - t0 >= tc.time_budget
                if step % tc.save_every == 0 or step == end or out_of_time:
                    self.on_main(self.checkpoint, step, rec["depth"], time.time() - t0)
                if out_of_time and step < end:
                    stopped_early = f"time budget of {tc.time_budget:.0f}s spent after step {step}"
                    bar.write(f"stopping: {stopped_early}; checkpoint saved, --resume continues")
                    break
        self.on_main(save_adapter, self.model, self.run_dir)
        return {"steps_done": step, "steps": tc.steps, "final_loss": self.last["loss"],
                "final_baseline_loss": self.last["baseline_loss"], "heldout_loss": self.last["heldout_loss"],
                "wall_s": self.prior_elapsed + time.time() - t0, "stopped_early": stopped_early}


def train(model, corpus: Corpus, run_dir: str | Path, tc: TrainConfig, resume: bool = False, accelerator=None,
          on_batch=None, teacher=None) -> dict:
    """Train `model` (an OuroborosModel, e.g. from load_adapter) on `corpus`: `Trainer(...).run()`."""
    return Trainer(model, corpus, run_dir, tc, resume=resume, accelerator=accelerator, on_batch=on_batch,
                   teacher=teacher).run()
