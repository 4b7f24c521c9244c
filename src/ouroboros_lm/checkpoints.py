"""A run folder's files: checkpoints written atomically, metrics appended without following
links, and fault injection for the crash tests.

  adapter_config.json, adapter_model.safetensors   the latest trained adapter
  checkpoints/step_000100/                          adapter files + optimizer.pt + scheduler.pt + trainer_state.json
  metrics.jsonl                                     one JSON object per logged step / evaluation
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import signal
import stat
from pathlib import Path
from typing import Iterator

import torch

from .adapter import STRUCTURAL, adapter_state_dict, architecture_hash, read_adapter, save_adapter
from .atomic import (check_own_file, clean_temporaries, ensure_dir, open_own_file, read_json, refuse_link,
                     remove_tree, replace_dir, temp_dir, temp_path, write_bytes, write_text, write_with)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-step_"  # temporaries of earlier releases
CHECKPOINT_FILES = {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", STATE}


def fault_point(name: str, step: int) -> None:
    """Fault injection for the crash tests, never set in normal use: OUROBOROS_FAULT=kill:<name>:<step>
    kills this process with SIGKILL at that point, OUROBOROS_FAULT=enospc:<name>:<step> fails
    there as a full disk would."""
    spec = os.environ.get("OUROBOROS_FAULT", "")
    if spec == f"kill:{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec == f"enospc:{name}:{step}":
        raise OSError(errno.ENOSPC, "No space left on device")


def refuse_planted_links(run_dir: Path, *names: str) -> None:
    """Before a run starts: none of the paths it writes below the run folder may be a symbolic link, and the
    files it writes in place (metrics.jsonl, .lock) must be regular files of their own (no FIFO, no hard link)."""
    for name in (CHECKPOINTS, METRICS, LOCK, *names):
        refuse_link(Path(run_dir) / name)
    check_own_file(Path(run_dir) / METRICS, "metrics file")
    check_own_file(Path(run_dir) / LOCK, "run's lock file")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; links (to folders or files) are never taken for one."""
    d = Path(run_dir) / CHECKPOINTS
    if not d.is_dir() or d.is_symlink():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith("step_") and p.is_dir() and not p.is_symlink()
                  and (p / STATE).is_file() and not (p / STATE).is_symlink())


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete temporary folders left by a save that did not finish (a crash, a full disk); the
    caller holds the run's lock, so every temporary there is stale."""
    d = Path(run_dir) / CHECKPOINTS
    if not d.is_dir() or d.is_symlink():
        return []
    gone = [p for p in d.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in gone:
        remove_tree(p, None, force=True)
    return gone + clean_temporaries(d)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, step: int, state: dict, keep: int) -> Path:
    """Write checkpoints/step_N atomically: everything goes into a temporary folder that is
    renamed into place only once complete. On any OSError (a full disk) the temporary folder
    is removed and the error names what failed; earlier checkpoints are untouched."""
    root = ensure_dir(Path(run_dir) / CHECKPOINTS, under=run_dir)
    final = root / f"step_{step:06d}"
    tmp = temp_path(final)
    try:
        tmp = temp_dir(final)
        save_adapter(model, tmp)
        fault_point("save", step)
        for name, obj in (("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", scheduler.state_dict())):
            write_with(tmp / name, lambda f, obj=obj: torch.save(obj, f))  # in memory first: its errors are OSErrors
        write_text(tmp / STATE, json.dumps({"step": step, **state}, indent=2) + "\n")
        replace_dir(tmp, final, "checkpoint", CHECKPOINT_FILES)
    except OSError as e:
        if tmp.exists() or tmp.is_symlink():
            remove_tree(tmp, None, force=True)
        kept = list_checkpoints(run_dir)
        raise OSError(e.errno, f"saving checkpoint step {step} in {root} failed ({e.strerror or e}); "
                               f"the last complete checkpoint is intact: {kept[-1].name if kept else 'none yet'}") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        try:
            remove_tree(old, "checkpoint", CHECKPOINT_FILES)
        except ValueError:
            pass  # something not ours was put there: left alone (and counted as a checkpoint no more)
    return final


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer_state.json, validated like any input: its step is the one the folder
    is named for, and the numbers a resumed run uses have the right types and ranges."""
    path = Path(checkpoint) / STATE
    state = read_json(path, "trainer state")
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or f"step_{step:06d}" != Path(checkpoint).name:
        raise ValueError(f"{path}: 'step' must be the integer its folder is named for ({Path(checkpoint).name}); "
                         f"got {step!r} (the file was edited or is corrupt)")
    elapsed = state.get("elapsed_s", 0.0)
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed < float("inf"):
        raise ValueError(f"{path}: 'elapsed_s' must be a finite number >= 0; got {elapsed!r}")
    seq_len = state.get("seq_len", 1)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"{path}: 'seq_len' must be an integer >= 1; got {seq_len!r}")
    if not isinstance(state.get("train_config", {}), dict):
        raise ValueError(f"{path}: 'train_config' must be a mapping")
    return state


def load_torch_state(path: Path, checkpoint: Path):
    """optimizer.pt / scheduler.pt (tensors and plain values only: weights_only), or a ValueError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, garbage, not a torch file: all mean a damaged checkpoint
        raise ValueError(f"{path} cannot be read ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}): "
                         f"the checkpoint is damaged; remove {checkpoint} to resume from the one before it") from None


def architecture_differences(meta: dict, model) -> list[str]:
    """What of the checkpoint's model (its adapter_config.json `meta`) differs from `model`'s: the structural
    settings, the base, the kept layers' fingerprints."""
    saved = meta["ouroboros_config"]
    now = model.config.to_dict()
    out = [f"{k}: checkpoint {saved.get(k)!r}, adapter {now[k]!r}" for k in STRUCTURAL if saved.get(k) != now[k]]
    if meta.get("base_architecture_hash") != architecture_hash(model.base_config):
        out.append("the base model's architecture")
    elif meta.get("kept_weights_fingerprints") != model.base_fingerprints:
        out.append("the base model's weights")
    return out


def load_resumable(checkpoint: Path, model) -> dict:
    """Everything `--resume` loads from `checkpoint`, read and checked against `model` before any of it is used:
    the same architecture, base and tensor shapes, an optimizer state of the model's trainable parameters'
    shapes, a scheduler state at the checkpoint's step. A ValueError naming the file otherwise."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    meta, tensors = read_adapter(checkpoint)
    try:
        from .config import OuroborosConfig

        meta = {**meta, "ouroboros_config": OuroborosConfig.from_dict(meta["ouroboros_config"]).to_dict()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{checkpoint / 'adapter_config.json'} holds an invalid ouroboros_config: {e}") from None
    diffs = architecture_differences(meta, model)
    expected = adapter_state_dict(model)
    if not diffs and (set(tensors) != set(expected)
                      or any(tuple(tensors[k].shape) != tuple(t.shape) for k, t in expected.items())):
        diffs.append("the saved tensors' names or shapes")
    if diffs:
        raise ValueError(f"--resume: {checkpoint} was saved by a different model than the adapter in "
                         f"{checkpoint.parent.parent} (" + "; ".join(diffs[:4]) + "); the adapter was converted "
                         f"again since? Remove {checkpoint.parent} to start over, or train in a new folder "
                         "(nothing was changed)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = load_torch_state(checkpoint / "optimizer.pt", checkpoint)
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    moments = optimizer.get("state") if isinstance(optimizer, dict) else None
    ids = [i for g in groups or [] if isinstance(g, dict) for i in g.get("params", [])]
    if (not isinstance(groups, list) or not isinstance(moments, dict) or ids != list(range(len(params)))
            or any(not isinstance(v, dict) or k not in ids or any(
                isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(params[k].shape)
                for t in v.values()) for k, v in moments.items())):
        raise ValueError(f"{checkpoint / 'optimizer.pt'} is not the optimizer state of this model's "
                         f"{len(params)} trainable tensors: the checkpoint is damaged; remove {checkpoint} to resume "
                         "from the one before it")
    scheduler = load_torch_state(checkpoint / "scheduler.pt", checkpoint)
    last = scheduler.get("last_epoch") if isinstance(scheduler, dict) else None
    lrs = scheduler.get("base_lrs") if isinstance(scheduler, dict) else None
    if (last != state["step"] or isinstance(last, bool) or not isinstance(lrs, list)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in lrs)):
        raise ValueError(f"{checkpoint / 'scheduler.pt'} is not a learning-rate schedule at step {state['step']}: "
                         f"the checkpoint is damaged; remove {checkpoint} to resume from the one before it")
    return {"state": state, "tensors": tensors, "optimizer": optimizer, "scheduler": scheduler}


def append_metrics(run_dir: Path, record: dict) -> None:
    fd = open_own_file(Path(run_dir) / METRICS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "metrics file")
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(record) + "\n")


def set_aside_metrics(run_dir: Path) -> Path | None:
    """A fresh run starts a new metrics.jsonl: the one an earlier run left (killed before its first checkpoint)
    is renamed metrics.jsonl.<n>.old, the first n free, never appended to or deleted. The caller holds the lock."""
    path = Path(run_dir) / METRICS
    if not path.is_file() or path.is_symlink() or path.stat().st_size == 0:
        return None
    n = 1
    while os.path.lexists(Path(run_dir) / f"{METRICS}.{n}.old"):
        n += 1
    old = Path(run_dir) / f"{METRICS}.{n}.old"
    os.rename(path, old)
    return old


MAX_METRIC_LINE = 1 << 20  # one line per logged step: a few hundred bytes


def iter_metrics(run_dir: Path) -> Iterator[dict]:
    """The run's metric records, streamed one line at a time (a regular file only: never a FIFO or through a link),
    so a metrics file of any length costs one line's memory. A torn last line (a killed process) ends them; a line
    that is not a JSON object, too long or absurdly nested is refused with the file and line named."""
    path = Path(run_dir) / METRICS
    if not path.is_file() or path.is_symlink():
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file; refusing to read it")
        for n, line in enumerate(iter(lambda: f.readline(MAX_METRIC_LINE + 1), b""), 1):
            if len(line) > MAX_METRIC_LINE:
                raise ValueError(f"{path}: line {n} is longer than {MAX_METRIC_LINE:,} bytes: the file is not ours "
                                 "or is corrupt")
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if not line.endswith(b"\n"):
                    return  # a torn last line from a killed process
                raise ValueError(f"{path}: line {n} is not valid JSON: the file is corrupt") from None
            except RecursionError:
                raise ValueError(f"{path}: line {n} is nested too deeply: the file is corrupt") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {n} is not a JSON object: the file is corrupt")
            yield record


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of `iter_metrics`, in a list (for a run's own tests and small runs; commands stream them)."""
    return list(iter_metrics(run_dir))


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines written after `step` (a resumed run writes them again); streamed, record by record."""
    path = Path(run_dir) / METRICS
    if path.is_file() or path.is_symlink():
        records = (json.dumps(r) + "\n" for r in iter_metrics(run_dir) if r.get("step", 0) <= step)
        write_bytes(path, (line.encode() for line in records))


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock on a run folder for the whole run. The kernel releases it when the
    process exits, however it exits, so a dead run never leaves a stale lock behind."""
    ensure_dir(run_dir)
    fd = open_own_file(Path(run_dir) / LOCK, os.O_RDWR | os.O_CREAT, "run's lock file")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ValueError(f"{run_dir} is in use by another ouroboros run (pid {holder}); "
                             "wait for it to finish or use another folder (nothing was changed)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
