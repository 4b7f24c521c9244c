"""`ouroboros prepare SRC... --out DIR`: text sources tokenized once into a prepared folder
(`shards.py` describes it), streamed, never the whole corpus in memory.

Two passes over the sources. The first reads every document (so bad input is refused before any
work), counts them, and decides the held-out ones: explicit `heldout` sources, or `held_out`'s rule (documents ranked
by a seeded hash of their name, the first ceil(fraction * n) held out), from 8 bytes per document. The second tokenizes the documents'
pieces in batches across worker processes (in order, so the shards are the same whatever the
number of workers) and appends them to the shards of their split. A shard is renamed into place
when complete and a state file records it; an interrupted run started again with the same
sources and settings resumes after the last complete shard, one with other settings starts
clean. The manifest is written last.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import re
import time
from array import array
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_write_text, fsync_dir, fsync_file, read_json
from .reading import DataError, expand_sources, iter_documents
from .settings import setting, validate_fields
from .shards import (FORMAT, data_cache, HELDOUT_NAMES, INDEX_DTYPE, MANIFEST, SPLITS, VERSION, read_manifest, token_dtype,
                     tokenizer_identity)

STATE = ".prepare-state.json"
LOCK = ".prepare.lock"
OURS = re.compile(r"^\.?(manifest\.json|prepare-state\.json|prepare\.lock|heldout-documents\.txt"
                  r"|(train|heldout)-\d{5}\.(bin|idx))(\.partial|\.tmp\d+)?$")
TEACHER_SET = re.compile(r"^teacher-[0-9a-f]{16}$")  # stored teacher predictions (targets.py)
BATCH_CHARS = 1 << 20  # text per work unit sent to a tokenizer process
AUTO_WORKER_CHARS = 4 << 20  # with workers=0, one process per this much text (up to the cores)
RULES = ("fraction", "explicit", "none", "all")


@dataclass
class PrepareConfig:
    """How sources become a prepared folder."""

    heldout_fraction: float = setting(0.1, "fraction of documents held out (by document) without --heldout",
                                      above=0, high=0.99)
    seed: int = setting(0, "seed of the by-document held-out split", low=0, high=2**63 - 1)
    text_field: str = setting("text", "field holding the text in .jsonl/.parquet/datasets")
    workers: int = setting(0, "tokenizer processes (0: one per CPU core, fewer for small corpora)", low=0, high=256)
    shard_tokens: int = setting(1 << 26, "tokens per shard (it closes at the first document end past this)",
                                low=1, high=1 << 40)

    def __post_init__(self) -> None:
        validate_fields(self)


# ---------------------------------------------------------------------- what is prepared
def fingerprint(sources: list[str]) -> list:
    """Every file a source names, with its size and modification time (a change re-prepares)."""
    out = []
    for src in sources:
        files = [] if src.startswith("hf:") else expand_sources([src])
        out.append([src, [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]])
    return out


def make_plan(sources: list[str], heldout: list[str] | None, rule: str, pc: PrepareConfig, tokenizer) -> dict:
    """Everything the folder's content depends on: the resume key, and the cache key."""
    if rule == "explicit":
        check_disjoint(sources, heldout)
    split = {"rule": rule}
    if rule == "fraction":  # names: documents named relative to their source (reading.document_name)
        split.update(fraction=pc.heldout_fraction, seed=pc.seed, names="relative")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token_id to put between documents")
    return {"sources": list(sources), "heldout_sources": list(heldout or []), "split": split,
            "text_field": pc.text_field, "shard_tokens": pc.shard_tokens, "tokenizer": tokenizer_identity(tokenizer),
            "vocab_size": len(tokenizer), "eos": tokenizer.eos_token_id,
            "files": fingerprint(list(sources) + list(heldout or []))}


def check_unchanged(plan: dict) -> None:
    """Refuse when a source file changed since the plan recorded it (still being written while we read it)."""
    was = {f[0]: f[1:] for _, files in plan["files"] for f in files}
    now = {f[0]: f[1:] for _, files in fingerprint(plan["sources"] + plan["heldout_sources"]) for f in files}
    changed = sorted(f for f in was.keys() | now.keys() if was.get(f) != now.get(f))
    if changed:
        raise DataError(f"{changed[0]} changed while `ouroboros prepare` read it (still being written?); prepare "
                        "again once it is complete (no manifest was written)")


def check_disjoint(sources: list[str], heldout: list[str]) -> None:
    train_files = {p.resolve() for p in expand_sources(sources)}
    both = sorted(str(p) for p in expand_sources(heldout) if p.resolve() in train_files)
    if both:
        raise DataError(f"{len(both)} file(s) are in both --data and --heldout, e.g. {both[0]}")


def plan_key(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def cache_folder(sources: list[str], rule: str, pc: PrepareConfig, tokenizer) -> Path:
    """Where raw `sources` are prepared for training: a folder of the data cache named by the plan."""
    return data_cache() / plan_key(make_plan(list(sources), None, rule, pc, tokenizer))[:24]


@dataclass
class Survey:
    """The first pass: documents per source, the held-out ones, and how much text there is."""

    documents: list[int]
    held: np.ndarray  # bool per document, in stream order
    chars: int


def document_key(seed: int, name: str) -> int:
    """The rank of a document in the split: the first 8 bytes of sha256(f"{seed}:{name}")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")


def held_out(keys: np.ndarray, fraction: float) -> np.ndarray:
    """The split by document: of n documents (their `document_key`s, in order), the ceil(fraction * n)
    of lowest key are held out (ties: the earlier one). Deterministic, 8 bytes a document."""
    n, n_held = len(keys), math.ceil(fraction * len(keys))
    if n < 2 or n_held >= n:
        raise DataError(f"cannot split {n} document(s) with heldout_fraction={fraction}: one side would be empty; "
                        "give more documents or explicit --heldout sources")
    held = np.zeros(n, dtype=bool)
    held[np.argsort(keys, kind="stable")[:n_held]] = True
    return held


def survey(plan: dict) -> Survey:
    sources = plan["sources"] + plan["heldout_sources"]
    counts, keys, roles, chars = [0] * len(sources), array("Q"), array("b"), 0
    seed = plan["split"].get("seed")
    for i, name, pieces in iter_documents(sources, plan["text_field"]):
        chars += sum(len(p) for p in pieces)
        counts[i] += 1
        roles.append(int(i >= len(plan["sources"])))
        if seed is not None:
            keys.append(document_key(seed, name))
    rule, n = plan["split"]["rule"], len(roles)
    if rule == "fraction":
        held = held_out(np.frombuffer(keys, dtype=np.uint64), plan["split"]["fraction"])
    else:
        held = np.frombuffer(roles, dtype=np.int8).astype(bool) if rule == "explicit" else np.full(n, rule == "all")
    return Survey(counts, held, chars)


# ---------------------------------------------------------------------- tokenizing
TOKENIZER = None  # the worker process's tokenizer


def start_worker(definition: str) -> None:
    global TOKENIZER
    from tokenizers import Tokenizer

    TOKENIZER = Tokenizer.from_str(definition)


def encode_texts(texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, one thread (the processes are the parallelism)."""
    return [np.asarray(TOKENIZER.encode(t, add_special_tokens=False).ids, dtype=np.uint32) for t in texts]


def batches(items: Iterator[tuple]) -> Iterator[list[tuple]]:
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[1])
        if size >= BATCH_CHARS or len(batch) >= 1024:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encoded(items: Iterator[tuple], definition: str, workers: int) -> Iterator[tuple]:
    """(tag, ids) for every (tag, text) of `items`, in order; `workers` processes (at most
    2 x workers batches in flight, so memory stays bounded)."""
    if workers <= 1:
        start_worker(definition)
        for batch in batches(items):
            yield from zip((tag for tag, _ in batch), encode_texts([text for _, text in batch]))
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=start_worker, initargs=(definition,)) as pool:
        pending: deque = deque()
        for batch in batches(items):
            pending.append(([tag for tag, _ in batch], pool.apply_async(encode_texts, ([t for _, t in batch],))))
            if len(pending) >= 2 * workers:
                tags, result = pending.popleft()
                yield from zip(tags, result.get())
        while pending:
            tags, result = pending.popleft()
            yield from zip(tags, result.get())


# ---------------------------------------------------------------------- writing
class SplitWriter:
    """The shards of one split: documents appended piece by piece; a shard closes (fsynced,
    renamed from its partial name, checksums recorded) at the first document end past
    `shard_tokens` tokens. `documents` and `source_tokens` count what closed shards hold."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, done: dict | None = None):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        done = done or {"shards": [], "documents": 0, "source_tokens": {}}
        self.shards, self.documents = list(done["shards"]), done["documents"]
        self.source_tokens = {int(k): v for k, v in done["source_tokens"].items()}
        self.resumed_documents = self.documents  # written by an interrupted run: skipped
        self.files = None

    def snapshot(self) -> dict:
        return {"shards": self.shards, "documents": self.documents,
                "source_tokens": {str(k): v for k, v in sorted(self.source_tokens.items())}}

    def open(self) -> None:
        self.name = f"{self.split}-{len(self.shards):05d}"
        self.files = {ext: open(self.folder / f".{self.name}.{ext}.partial", "wb") for ext in ("bin", "idx")}
        self.hashes = {ext: hashlib.sha256() for ext in self.files}
        self.tokens, self.docs, self.lo, self.hi, self.pending = 0, 0, None, None, {}

    def write(self, ext: str, data: bytes) -> None:
        self.files[ext].write(data)
        self.hashes[ext].update(data)

    def add(self, ids: np.ndarray, source: int) -> None:
        if self.files is None:
            self.open()
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            self.lo, self.hi = min(lo, self.lo if self.lo is not None else lo), max(hi, self.hi or 0)
        self.write("bin", ids.astype(self.dtype).tobytes())
        self.tokens += ids.size
        self.pending[source] = self.pending.get(source, 0) + int(ids.size)

    def end_document(self, eos: int, source: int) -> bool:
        """Close the document (EOS); True when that closed the shard too."""
        self.add(np.array([eos], dtype=np.uint32), source)
        self.write("idx", np.array([self.tokens], dtype=INDEX_DTYPE).tobytes())
        self.docs += 1
        return self.tokens >= self.shard_tokens and self.close()

    def close(self) -> bool:
        if self.files is None:
            return False
        for ext, f in self.files.items():
            fsync_file(f)
            f.close()
            os.replace(self.folder / f".{self.name}.{ext}.partial", self.folder / f"{self.name}.{ext}")
        fsync_dir(self.folder)
        self.shards.append({"name": self.name, "tokens": self.tokens, "documents": self.docs, "min_token": self.lo,
                            "max_token": self.hi, "sha256": {ext: h.hexdigest() for ext, h in self.hashes.items()}})
        self.documents += self.docs
        for source, n in self.pending.items():
            self.source_tokens[source] = self.source_tokens.get(source, 0) + n
        self.files = None
        return True


def documents_to_write(plan: dict, sv: Survey, writers: dict, names) -> Iterator[tuple]:
    """((split, source, last piece?, characters), text) for every piece of every document not
    written yet; the held-out documents' names go to `names` (all of them, written or not)."""
    seen = {split: 0 for split in SPLITS}
    for k, (i, name, pieces) in enumerate(iter_documents(plan["sources"] + plan["heldout_sources"], plan["text_field"])):
        if k >= len(sv.held):  # more documents than the survey counted: a source grew
            check_unchanged(plan)
            raise DataError("the sources hold more documents than when they were first read; prepare again")
        split = "heldout" if sv.held[k] else "train"
        if split == "heldout":
            names.write(name.replace("\n", " ") + "\n")
        seen[split] += 1
        if seen[split] <= writers[split].resumed_documents:
            continue  # in a shard an interrupted run completed
        prev = None
        for piece in pieces:
            if prev is not None:
                yield (split, i, False, len(prev)), prev
            prev = piece
        yield (split, i, True, len(prev)), prev


def write_shards(folder: Path, plan: dict, sv: Survey, writers: dict, definition: str, workers: int,
                 progress: bool) -> None:
    """The second pass: every document not written yet, tokenized, into its split's shards; the
    state file records each completed shard."""
    t0, tokens = time.time(), 0
    bar = tqdm(total=sv.chars, unit="char", unit_scale=True, desc=f"tokenizing ({workers} process"
               f"{'es' if workers > 1 else ''})", disable=None if progress is None else not progress,
               dynamic_ncols=True)
    with bar, open(folder / f".{HELDOUT_NAMES}.partial", "w") as names:
        for (split, source, last, chars), ids in encoded(documents_to_write(plan, sv, writers, names), definition,
                                                         workers):
            w = writers[split]
            w.add(ids, source)
            tokens += ids.size
            if last and w.end_document(plan["eos"], source):
                save_state(folder, plan, writers)
            bar.update(chars)
            bar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s", refresh=False)
        for w in writers.values():
            w.close()
        fsync_file(names)
    os.replace(folder / f".{HELDOUT_NAMES}.partial", folder / HELDOUT_NAMES)


def save_state(folder: Path, plan: dict, writers: dict) -> None:
    atomic_write_text(folder / STATE, json.dumps({"key": plan_key(plan),
                                                  "splits": {s: writers[s].snapshot() for s in SPLITS}}))


# ---------------------------------------------------------------------- the folder
@contextlib.contextmanager
def folder_lock(folder: Path, name: str = LOCK):
    """One preparation of a folder at a time (other ranks or runs wait for it); `name`: the lock file's."""
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_out(out: Path) -> None:
    """--out is a new folder or one of ours: no links, no files we did not write."""
    if out.is_symlink():
        raise DataError(f"--out {out} is a link; give the folder itself (nothing was changed)")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder (nothing was changed)")
    if out.is_dir():
        foreign = sorted(f.name for f in out.iterdir() if f.is_symlink() or not (
            OURS.match(f.name) or TEACHER_SET.match(f.name) and f.is_dir()))
        if foreign:
            raise DataError(f"--out {out} holds files `ouroboros prepare` did not write (e.g. {foreign[0]}); "
                            "choose a new or empty folder (nothing was changed)")
        odd = sorted(f.name for f in out.iterdir() if OURS.match(f.name) and not f.is_symlink() and not f.is_file())
        if odd:  # a FIFO named like our state or lock file would hang the open
            raise DataError(f"--out {out}: {odd[0]} is not a regular file (a FIFO, device or folder); remove it "
                            "(nothing was changed)")


def remove_ours(out: Path, keep: tuple[str, ...] = (LOCK,)) -> None:
    for f in out.iterdir():
        if OURS.match(f.name) and f.name not in keep and not f.is_symlink() and f.is_file():
            f.unlink()


def already_prepared(out: Path, plan: dict, overwrite: bool) -> dict | None:
    """The manifest when `out` is prepared from this plan; None when it is to be (re)written."""
    if not (out / MANIFEST).is_file():
        return None
    m = read_manifest(out)
    if m.get("plan_key") == plan_key(plan):
        return m
    if not overwrite:
        raise DataError(f"{out} already holds a corpus prepared from other sources or settings; pass --overwrite to "
                        "replace it, or choose another --out (nothing was changed)")
    remove_ours(out)
    return None


def resumable_state(out: Path, plan: dict, dtype: np.dtype) -> dict | None:
    """An interrupted run's state when it was preparing this plan and its shards are all there."""
    try:
        state = read_json(out / STATE, "preparation state")
        shards = [s for split in SPLITS for s in state["splits"][split]["shards"]]
        sizes = {ext: [(out / f"{s['name']}.{ext}").stat().st_size for s in shards] for ext in ("bin", "idx")}
        if state["key"] == plan_key(plan) and sizes == {
                "bin": [s["tokens"] * dtype.itemsize for s in shards],
                "idx": [s["documents"] * INDEX_DTYPE.itemsize for s in shards]}:
            return state
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def resume_or_clean(out: Path, plan: dict, dtype: np.dtype, shard_tokens: int) -> dict:
    """Writers that continue after an interrupted run's complete shards (same plan), else start clean."""
    state = resumable_state(out, plan, dtype)
    keep = (LOCK,) if state is None else (LOCK, STATE, *(f"{s['name']}.{ext}" for split in SPLITS
                                                       for s in state["splits"][split]["shards"] for ext in ("bin", "idx")))
    remove_ours(out, keep)
    return {split: SplitWriter(out, split, dtype, shard_tokens, state and state["splits"][split]) for split in SPLITS}


def manifest_of(plan: dict, sv: Survey, writers: dict, dtype: np.dtype) -> dict:
    sources = plan["sources"] + plan["heldout_sources"]
    return {
        "format": FORMAT, "version": VERSION, "plan_key": plan_key(plan), "tokenizer": plan["tokenizer"],
        "vocab_size": plan["vocab_size"], "eos": plan["eos"], "dtype": dtype.str, "text_field": plan["text_field"],
        "heldout": {**plan["split"], **({"sources": plan["heldout_sources"]} if plan["heldout_sources"] else {})},
        "heldout_documents": HELDOUT_NAMES,
        "sources": [{"source": src, "role": "heldout" if i >= len(plan["sources"]) else "data",
                     "documents": sv.documents[i],
                     "tokens": {split: writers[split].source_tokens.get(i, 0) for split in SPLITS}}
                    for i, src in enumerate(sources)],
        "splits": {split: {"documents": w.documents, "tokens": sum(s["tokens"] for s in w.shards), "shards": w.shards}
                   for split, w in writers.items()},
        "files": plan["files"],
    }


def prepare(sources: list[str], out: str | Path, tokenizer, pc: PrepareConfig | None = None,
            heldout: list[str] | None = None, rule: str | None = None, progress: bool | None = True,
            overwrite: bool = False) -> dict:
    """Tokenize `sources` into the prepared folder `out` (or return its manifest when it already
    holds them). rule: fraction (pc.heldout_fraction by document; the default), explicit (the
    `heldout` sources; the default when given), none (everything trains), all (everything held out)."""
    pc = pc or PrepareConfig()
    rule = rule or ("explicit" if heldout else "fraction")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    plan, out = make_plan(list(sources), heldout, rule, pc, tokenizer), Path(out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        done = already_prepared(out, plan, overwrite)
        if done is not None:
            return done
        sv = survey(plan)  # every document read once: bad input is refused before any work
        dtype = token_dtype(plan["vocab_size"])
        writers = resume_or_clean(out, plan, dtype, pc.shard_tokens)
        workers = pc.workers or min(os.cpu_count() or 1, max(1, sv.chars // AUTO_WORKER_CHARS))
        write_shards(out, plan, sv, writers, tokenizer.backend_tokenizer.to_str(), workers, progress)
        check_unchanged(plan)  # the manifest describes the files as they were read
        manifest = manifest_of(plan, sv, writers, dtype)
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        (out / STATE).unlink(missing_ok=True)
    return manifest
