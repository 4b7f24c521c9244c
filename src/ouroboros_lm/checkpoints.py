"""A run folder's files: checkpoints written atomically, metrics appended without following
links, and fault injection for the crash tests.

  adapter_config.json, adapter_model.safetensors   the latest trained adapter
  checkpoints/step_000100/                          adapter files + optimizer.pt + scheduler.pt + trainer_state.json
  metrics.jsonl                                     one JSON object per logged step / evaluation
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import torch

from .adapter import save_adapter
from .atomic import atomic_write_text, fsync_dir, fsync_file

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"
TMP_PREFIX = ".tmp-step_"


def fault_point(name: str, step: int) -> None:
    """Fault injection for the crash tests, never set in normal use: OUROBOROS_FAULT=kill:<name>:<step>
    kills this process with SIGKILL at that point, OUROBOROS_FAULT=enospc:<name>:<step> fails
    there as a full disk would."""
    spec = os.environ.get("OUROBOROS_FAULT", "")
    if spec == f"kill:{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec == f"enospc:{name}:{step}":
        raise OSError(errno.ENOSPC, "No space left on device")


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE).is_file())


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete temporary folders left by a save that did not finish (a crash, a full disk)."""
    d = Path(run_dir) / CHECKPOINTS
    gone = [p for p in d.iterdir() if p.name.startswith(TMP_PREFIX)] if d.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, step: int, state: dict, keep: int) -> Path:
    """Write checkpoints/step_N atomically: everything goes into a temporary folder that is
    renamed into place only once complete. On any OSError (a full disk) the temporary folder
    is removed and the error names what failed; earlier checkpoints are untouched."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"{TMP_PREFIX}{step:06d}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_adapter(model, tmp)
        fault_point("save", step)
        for name, obj in (("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", scheduler.state_dict())):
            with open(tmp / name, "wb") as f:
                torch.save(obj, f)
                fsync_file(f)
        atomic_write_text(tmp / STATE, json.dumps({"step": step, **state}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(run_dir)
        raise OSError(e.errno, f"saving checkpoint step {step} in {root} failed ({e.strerror or e}); "
                               f"the last complete checkpoint is intact: {kept[-1].name if kept else 'none yet'}") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE).read_text())


def open_no_follow(path: Path, flags: int):
    """os.open that refuses a symbolic link where a file is expected (an adapter folder from
    someone else must never make us write outside it)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise OSError(e.errno, f"{path} is a symbolic link; refusing to write through it") from None
        raise


def append_metrics(run_dir: Path, record: dict) -> None:
    fd = open_no_follow(Path(run_dir) / METRICS, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a killed process
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines written after `step` (a resumed run writes them again)."""
    path = Path(run_dir) / METRICS
    if path.is_file() or path.is_symlink():
        keep = [json.dumps(r) for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        atomic_write_text(path, "\n".join(keep) + "\n" if keep else "")
