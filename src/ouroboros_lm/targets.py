"""The teacher's top-K next-token predictions, computed once and stored beside a prepared folder's
token shards, so that distillation costs what plain training costs (`train --distill-weight`).

    DIR/teacher-<key>/targets.json        teacher (name, fingerprints of every part), K, seq_len, vocab,
                                          the token shards they were computed on (sha256), every chunk
    DIR/teacher-<key>/chunk-00000.blocks  int64: which blocks of the folder's training split (at seq_len)
    DIR/teacher-<key>/chunk-00000.ids     [blocks x seq_len, K] the teacher's top-K token ids (the token dtype)
    DIR/teacher-<key>/chunk-00000.lp      [blocks x seq_len, K + 1] float16: their log-probabilities and,
                                          last, the log of the teacher's remaining mass

Row t of a block is the teacher's prediction after its token t, seeing only the tokens of that block:
the context training gives the student. key = sha256 of the teacher's fingerprints, seq_len and K.

A set covers the blocks asked of it: all of them (`ouroboros prepare --teacher`), or the blocks a run
will draw (`train`, a sweep, the demo: the samplers are stateless, so they are known before step 1 and
every arm and rerun with the same seed reuses them). Each chunk is written under a temporary name and
listed in targets.json only when complete: a pass that is stopped keeps its finished chunks and the next
one computes the rest. Reading checks every chunk's size and checksum (stamped, as token shards are) and
the token shards' checksums, so targets are never paired with other tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_bytes, atomic_write_text, ensure_dir, open_regular, read_json
from .families import final_logits
from .loss import StoredTeacher, default_chunk
from .ops import tail_log_mass
from .prepare import folder_lock
from .reading import DataError, printable
from .shards import Blocks, Prepared, verify_file
from .surgery import part_fingerprints

FORMAT = "ouroboros-targets"
VERSION = 1
MANIFEST = "targets.json"
LOGP_DTYPE = np.dtype("<f2")
BLOCK_DTYPE = np.dtype("<i8")
SET_NAME = re.compile(r"^teacher-[0-9a-f]{16}$")
CHUNK_NAME = re.compile(r"^chunk-\d{5}$")
OURS = re.compile(r"^(targets\.json|\.lock|chunk-\d{5}\.(blocks|ids|lp)|\.(chunk-\d{5}\.(blocks|ids|lp)|targets\.json)\.tmp\d+)$")
CHUNK_TOKENS = 1 << 18  # tokens per chunk written (a stopped pass loses at most one)


def teacher_fingerprints(teacher) -> dict[str, str]:
    """Fingerprints of every part of a Hugging Face causal LM (`surgery.part_fingerprints`, all layers):
    a student whose kept weights carry the same fingerprints was cut from this teacher."""
    return part_fingerprints(teacher, range(len(teacher.model.layers)))


def set_key(fingerprints: dict, seq_len: int, top_k: int) -> str:
    return hashlib.sha256(json.dumps([fingerprints, seq_len, top_k], sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def teacher_predictions(teacher, ids: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K next-token ids [B, T, K] and float32 log-probabilities [B, T, K + 1] (the
    last: log of the remaining mass) for blocks `ids` [B, T], a chunk of tokens at a time."""
    device = teacher.lm_head.weight.device
    hidden = teacher.model(ids.to(device), use_cache=False).last_hidden_state.flatten(0, 1)
    chunk = default_chunk(teacher.lm_head.weight.shape[0])
    out_ids, out_lp = [], []
    for i in range(0, hidden.shape[0], chunk):
        logits = final_logits(teacher.lm_head(hidden[i: i + chunk]), teacher.config).float()
        lse = torch.logsumexp(logits, dim=-1)
        top = logits.topk(top_k, dim=-1)
        out_ids.append(top.indices)
        out_lp.append(torch.cat([top.values - lse.unsqueeze(-1),
                                 tail_log_mass(logits, lse, top.indices).unsqueeze(-1)], dim=-1))
    shape = ids.shape
    return (torch.cat(out_ids).view(*shape, top_k).cpu(), torch.cat(out_lp).view(*shape, top_k + 1).cpu())


# ---------------------------------------------------------------------- one folder's set
def token_shards(prep: Prepared) -> list[list[str]]:
    return [[s["name"], s["sha256"]["bin"]] for s in prep.manifest["splits"]["train"]["shards"]]


def chunk_ok(c) -> bool:
    return (isinstance(c, dict) and isinstance(c.get("name"), str) and CHUNK_NAME.match(c["name"]) is not None
            and isinstance(c.get("blocks"), int) and not isinstance(c["blocks"], bool) and c["blocks"] > 0
            and isinstance(c.get("sha256"), dict)
            and all(isinstance(c["sha256"].get(e), str) for e in ("blocks", "ids", "lp")))


def read_set_manifest(path: Path) -> dict:
    m = read_json(path, "teacher targets manifest")
    try:
        count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731 - true is no number
        ok = (m["format"] == FORMAT and m["version"] == VERSION and count(m["seq_len"])
              and count(m["top_k"]) and count(m["vocab_size"])
              and m["ids_dtype"] in ("<u2", "<u4") and isinstance(m["fingerprints"], dict)
              and isinstance(m["token_shards"], list) and all(chunk_ok(c) for c in m["chunks"]))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{path} is not a manifest of stored teacher targets ({FORMAT} v{VERSION}); delete its "
                        "folder and run the teacher pass again")
    return m


class TargetSet:
    """One teacher's stored predictions for (some blocks of) one prepared folder at one seq_len and K."""

    def __init__(self, folder: Path, prep: Prepared, manifest: dict):
        self.folder, self.prep, self.manifest = folder, prep, manifest
        self.seq_len, self.top_k = manifest["seq_len"], manifest["top_k"]
        self.n_blocks = len(Blocks(prep.arrays["train"], self.seq_len, (0, 0), f"{prep.folder}"))
        self.ids_dtype = np.dtype(manifest["ids_dtype"])
        self.chunks: list[Path] = []  # each chunk's files, without their suffix
        self.chunk_of = np.full(self.n_blocks, -1, dtype=np.int32)
        self.row_of = np.zeros(self.n_blocks, dtype=np.int64)
        if manifest["token_shards"] != token_shards(prep):
            raise DataError(f"{folder / MANIFEST}: computed on other token shards than {prep.folder}'s (the folder was "
                            "prepared again); delete it and run the teacher pass again")
        for c in manifest["chunks"]:
            self.open_chunk(c)

    def open_chunk(self, c: dict) -> None:
        base, n, rows = self.folder / c["name"], c["blocks"], c["blocks"] * self.seq_len
        verify_file(base.with_suffix(".blocks"), n * BLOCK_DTYPE.itemsize, c["sha256"]["blocks"])
        verify_file(base.with_suffix(".ids"), rows * self.top_k * self.ids_dtype.itemsize, c["sha256"]["ids"])
        verify_file(base.with_suffix(".lp"), rows * (self.top_k + 1) * LOGP_DTYPE.itemsize, c["sha256"]["lp"])
        blocks = np.fromfile(base.with_suffix(".blocks"), dtype=BLOCK_DTYPE)
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.n_blocks):
            raise DataError(f"{base.with_suffix('.blocks')} names blocks outside the folder's {self.n_blocks}")
        self.chunk_of[blocks] = len(self.chunks)
        self.row_of[blocks] = np.arange(blocks.size)
        # the chunk's files are named, not held open: a set of thousands of chunks is read a chunk at a time
        self.chunks.append(base)

    def missing(self, blocks: np.ndarray) -> np.ndarray:
        """The blocks of `blocks` (local numbers) this set has no predictions for, sorted, once each."""
        blocks = np.unique(np.asarray(blocks, dtype=np.int64))
        return blocks[self.chunk_of[blocks] < 0]

    def read(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.empty((len(blocks), self.seq_len, self.top_k), dtype=np.int64)
        lp = np.empty((len(blocks), self.seq_len, self.top_k + 1), dtype=np.float32)
        blocks = np.asarray(blocks, dtype=np.int64)
        chunk = self.chunk_of[blocks]
        if (chunk < 0).any():
            raise DataError(f"{self.folder}: no stored teacher predictions for block {int(blocks[chunk < 0][0])} (run "
                            "the teacher pass for the blocks this run draws)")
        for c in np.unique(chunk).tolist():  # each chunk's files opened once, and closed again
            where = np.nonzero(chunk == c)[0]
            rows, base = self.row_of[blocks[where]], self.chunks[c]
            ids[where] = read_rows(base.with_suffix(".ids"), self.ids_dtype, (self.seq_len, self.top_k), rows)
            lp[where] = read_rows(base.with_suffix(".lp"), LOGP_DTYPE, (self.seq_len, self.top_k + 1), rows)
            check_log_probs(lp[where], base.with_suffix(".lp"), blocks[where])
        if ids.size and ids.max() >= self.manifest["vocab_size"]:
            raise DataError(f"{self.folder}: a stored token id ({ids.max()}) is past the vocabulary "
                            f"({self.manifest['vocab_size']}); delete the folder and run the teacher pass again")
        return ids, lp


def read_rows(path: Path, dtype: np.dtype, shape: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (each of `shape`) of the array file `path` (a regular file, checked when its set was opened)."""
    size = int(np.prod(shape)) * dtype.itemsize
    out = np.empty((len(rows), *shape), dtype=dtype)
    try:
        f = open_regular(path, "stored teacher predictions")
    except ValueError as e:
        raise DataError(str(e)) from None
    with f:
        for j, r in enumerate(rows.tolist()):
            data = os.pread(f.fileno(), size, r * size)
            if len(data) != size:
                raise DataError(f"{path}: shorter than its manifest says (changed since it was checked?); delete its "
                                "folder and run the teacher pass again")
            out[j] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return out


def check_log_probs(lp: np.ndarray, path: Path, blocks: np.ndarray) -> None:
    """Refuse stored log-probabilities that are not a distribution: NaN, positive (a probability above 1), or K + 1
    buckets whose probabilities do not sum to 1 (to float16's rounding); the file and block named."""
    bad = np.isnan(lp).any(axis=(1, 2)) | (lp > 1e-2).any(axis=(1, 2))
    total = np.exp(lp.astype(np.float64)).sum(axis=-1)
    bad |= (np.abs(total - 1) > 0.05).any(axis=1)
    if bad.any():
        raise DataError(f"{path}: the stored log-probabilities of block {int(blocks[np.argmax(bad)])} are not a "
                        "distribution (NaN, positive, or not summing to 1): the file is corrupt; delete its folder and "
                        "run the teacher pass again")


def find_sets(prep: Prepared, seq_len: int, top_k: int, fingerprints: dict, vocab_size: int) -> TargetSet | None:
    """The stored set of `prep` for this seq_len and K whose teacher has these fingerprints (a student's
    kept weights: every one must agree), or None."""
    for d in sorted(prep.folder.glob("teacher-*")):
        if not (SET_NAME.match(d.name) and d.is_dir() and not d.is_symlink() and (d / MANIFEST).is_file()):
            continue
        m = read_set_manifest(d / MANIFEST)
        if (m["seq_len"] == seq_len and m["top_k"] == top_k and m["vocab_size"] == vocab_size
                and all(m["fingerprints"].get(k) == v for k, v in fingerprints.items())):
            return TargetSet(d, prep, m)
    return None


def clean_set(folder: Path, keep: set[str]) -> None:
    """Remove the files of chunks not listed (a pass stopped while writing them); never anything not ours."""
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink() and OURS.match(f.name) and f.name not in keep | {".lock", MANIFEST}:
            f.unlink()


def write_chunk(folder: Path, name: str, blocks: np.ndarray, ids: np.ndarray, lp: np.ndarray) -> dict:
    sha = {}
    for ext, arr in (("blocks", blocks.astype(BLOCK_DTYPE)), ("ids", ids), ("lp", lp)):
        data = np.ascontiguousarray(arr).tobytes()
        atomic_write_bytes(folder / f"{name}.{ext}", data, under=folder)
        sha[ext] = hashlib.sha256(data).hexdigest()
    return {"name": name, "blocks": int(blocks.size), "sha256": sha}


def pass_bytes(top_k: int, vocab: int, seq_len: int, batch_blocks: int | None = None) -> tuple[int, int]:
    """(memory a teacher pass holds at most, beside the teacher; bytes it stores a token) at this K: a chunk's
    ids and log-probabilities, and a batch's top-K in int64 and float32, twice (gathered, then joined)."""
    per_token = top_k * (2 if vocab <= 1 << 16 else 4) + (top_k + 1) * LOGP_DTYPE.itemsize
    chunk_tokens = max(1, CHUNK_TOKENS // seq_len) * seq_len
    batch_tokens = (batch_blocks or max(1, 4096 // seq_len)) * seq_len
    return chunk_tokens * per_token + 2 * batch_tokens * (top_k * 8 + (top_k + 1) * 4), per_token


def check_pass_fits(top_k: int, vocab: int, seq_len: int, flag: str = "--teacher-top-k", tokens: int | None = None,
                    folder: Path | None = None, batch_blocks: int | None = None) -> None:
    """Refuse, before the teacher runs, a K whose pass would not fit the available memory (half of it) or, for
    `tokens` stored under `folder`, its free disk space; the flag named."""
    import shutil

    from .memory import free_bytes

    ram, per_token = pass_bytes(top_k, vocab, seq_len, batch_blocks)
    free = free_bytes(torch.device("cpu"))
    gib = lambda n: f"{n / (1 << 30):.1f} GiB"  # noqa: E731
    if free is not None and ram > free // 2:
        raise DataError(f"{flag} {top_k}: the teacher pass would hold about {gib(ram)} of predictions in memory, more "
                        f"than half the {gib(free)} available; lower {flag}")
    if tokens is not None and folder is not None:
        disk, room = tokens * per_token, shutil.disk_usage(folder).free
        if disk > room:
            raise DataError(f"{flag} {top_k}: the teacher's predictions for {tokens:,} tokens would take about "
                            f"{gib(disk)} ({per_token} bytes a token), more than the {gib(room)} free under {folder}; "
                            f"lower {flag}")


def teacher_pass(prep: Prepared, teacher, teacher_name: str, seq_len: int, top_k: int,
                 blocks: np.ndarray | None = None, batch_blocks: int | None = None, progress: bool | None = True,
                 fingerprints: dict | None = None, flag: str = "--teacher-top-k") -> TargetSet:
    """The set of `prep` for this teacher, seq_len and K, holding at least `blocks` (local block numbers of
    the training split; None: all): the ones it lacks are computed (the teacher, in eval mode, on its
    device) and appended a chunk at a time. Returns the set, opened and checked."""
    vocab = int(teacher.lm_head.weight.shape[0])
    if not 1 <= top_k < vocab:
        raise DataError(f"--teacher-top-k must be in [1, {vocab - 1}] for a vocabulary of {vocab}; got {top_k}")
    if prep.manifest["vocab_size"] > vocab:
        raise DataError(f"{prep.folder}: tokenized with a vocabulary of {prep.manifest['vocab_size']}, larger than "
                        f"the teacher's {vocab}")
    fps = fingerprints or teacher_fingerprints(teacher)
    folder = ensure_dir(prep.folder / f"teacher-{set_key(fps, seq_len, top_k)}", under=prep.folder)
    with folder_lock(folder, ".lock"):  # one pass into a set at a time; others wait, then find its chunks
        if (folder / MANIFEST).is_file():
            manifest = read_set_manifest(folder / MANIFEST)
            if manifest["token_shards"] != token_shards(prep):  # the folder was prepared again: start over
                manifest = None
        else:
            manifest = None
        manifest = manifest or {"format": FORMAT, "version": VERSION, "teacher": teacher_name, "fingerprints": fps,
                                "seq_len": seq_len, "top_k": top_k, "vocab_size": vocab,
                                "ids_dtype": "<u2" if vocab <= 1 << 16 else "<u4", "token_shards": token_shards(prep),
                                "chunks": []}
        clean_set(folder, {f"{c['name']}.{e}" for c in manifest["chunks"] for e in ("blocks", "ids", "lp")})
        tset = TargetSet(folder, prep, manifest)
        todo = tset.missing(np.arange(tset.n_blocks) if blocks is None else blocks)
        if todo.size == 0:
            return tset
        check_pass_fits(top_k, vocab, seq_len, flag, int(todo.size) * seq_len, folder, batch_blocks)
        source = Blocks(prep.arrays["train"], seq_len, (0, 0), str(prep.folder))
        per_chunk = max(1, CHUNK_TOKENS // seq_len)
        batch = batch_blocks or max(1, 4096 // seq_len)
        teacher.eval()
        t0 = time.time()
        bar = tqdm(total=int(todo.size), unit="block", desc=f"teacher pass ({printable(teacher_name or 'teacher')}, top-{top_k})",
                   disable=None if progress is None else not progress, dynamic_ncols=True)
        with bar:
            for start in range(0, todo.size, per_chunk):
                part = todo[start: start + per_chunk]
                ids = np.empty((part.size, seq_len, top_k), dtype=tset.ids_dtype)
                lp = np.empty((part.size, seq_len, top_k + 1), dtype=LOGP_DTYPE)
                for b in range(0, part.size, batch):
                    got_ids, got_lp = teacher_predictions(teacher, source[part[b: b + batch]], top_k)
                    ids[b: b + batch], lp[b: b + batch] = got_ids.numpy(), got_lp.numpy()
                    bar.update(min(batch, part.size - b))
                name = f"chunk-{len(manifest['chunks']):05d}"
                manifest["chunks"].append(write_chunk(folder, name, part, ids, lp))
                atomic_write_text(folder / MANIFEST, json.dumps(manifest) + "\n")
                tset.open_chunk(manifest["chunks"][-1])
                bar.set_postfix_str(f"{(start + part.size) * seq_len / max(time.time() - t0, 1e-9):,.0f} tok/s",
                                    refresh=False)
        return tset


# ---------------------------------------------------------------------- a corpus's targets
@dataclass
class CorpusTargets:
    """Stored predictions for the training blocks of a corpus: one set per prepared folder, in the order
    the corpus joins the folders' blocks (`data.build_corpus`)."""

    sets: list[TargetSet]
    offsets: np.ndarray  # first corpus block of each folder

    def locate(self, blocks) -> tuple[np.ndarray, np.ndarray]:
        blocks = np.asarray(blocks, dtype=np.int64).reshape(-1)
        which = np.searchsorted(self.offsets, blocks, side="right") - 1
        return which, blocks - self.offsets[which]

    def missing(self, blocks) -> list[np.ndarray]:
        which, local = self.locate(blocks)
        return [s.missing(local[which == i]) for i, s in enumerate(self.sets)]

    def teacher(self, blocks, weight: float, ce_weight: float) -> StoredTeacher:
        """The stored targets of corpus blocks `blocks` (as `corpus.train[blocks]` reads them)."""
        which, local = self.locate(blocks)
        ids = np.empty((local.size, self.sets[0].seq_len, self.sets[0].top_k), dtype=np.int64)
        lp = np.empty((local.size, self.sets[0].seq_len, self.sets[0].top_k + 1), dtype=np.float32)
        for i, s in enumerate(self.sets):
            rows = np.nonzero(which == i)[0]
            if rows.size:
                ids[rows], lp[rows] = s.read(local[rows])
        return StoredTeacher(torch.from_numpy(ids), torch.from_numpy(lp), weight, ce_weight)

    def describe(self) -> str:
        s = self.sets[0]
        have = sum(int((t.chunk_of >= 0).sum()) for t in self.sets)
        return (f"stored teacher targets: top-{s.top_k} of {printable(s.manifest.get('teacher') or 'the teacher')} at "
                f"seq_len {s.seq_len}, {have} blocks in {', '.join(str(t.folder) for t in self.sets)}")


def corpus_targets(corpus, seq_len: int, top_k: int, fingerprints: dict, vocab_size: int, blocks,
                   load_teacher, teacher_name: str, progress: bool | None = True) -> CorpusTargets:
    """The stored targets of `corpus` for the teacher whose fingerprints include `fingerprints`, holding
    (at least) the corpus blocks `blocks`: what is missing is computed with `load_teacher()` (called at
    most once, only then)."""
    sets = [find_sets(f, seq_len, top_k, fingerprints, vocab_size) for f in corpus.train_folders]
    offsets = np.cumsum([0] + [len(Blocks(f.arrays["train"], seq_len, (0, 0), str(f.folder)))
                               for f in corpus.train_folders])[:-1]
    if all(s is not None for s in sets):
        ct = CorpusTargets(sets, offsets)
        if not any(m.size for m in ct.missing(blocks)):
            return ct
    teacher = load_teacher()
    got = teacher_fingerprints(teacher)
    wrong = sorted(k for k, v in fingerprints.items() if got.get(k) != v)
    if wrong:
        raise DataError(f"the teacher {printable(teacher_name)} is not the model the student was cut from ({wrong[0]} differs)")
    which, local = CorpusTargets([], offsets).locate(blocks)
    sets = [teacher_pass(f, teacher, teacher_name, seq_len, top_k, blocks=local[which == i], progress=progress,
                         fingerprints=got, flag="--distill-top-k")
            for i, f in enumerate(corpus.train_folders)]
    return CorpusTargets(sets, offsets)
