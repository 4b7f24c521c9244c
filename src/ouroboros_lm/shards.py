"""A prepared folder: token shards, their document index and a manifest, and the blocks read
from them by memory map.

    DIR/manifest.json          tokenizer (name, sha256), vocab size, EOS, dtype, sources and their
                               token counts, the held-out rule, every shard with its checksums
    DIR/train-00000.bin        tokens (uint16 when the vocabulary fits, else uint32), EOS after
                               every document; DIR/train-00000.idx: int64 end of every document
    DIR/heldout-00000.bin/.idx the held-out documents, likewise
    DIR/heldout-documents.txt  the held-out documents' names, one a line

The manifest is written last, once every shard it names is complete, so it never points at a
partial shard. A block is `seq_len` consecutive tokens of one shard (a shard's tail shorter than
a block is not used); blocks are int64 only when a batch is read. Opening a folder checks the
tokenizer against the model's, every shard's size, its checksums and token range: in full the first time,
then again whenever the file's size, times or inode change (stamps under the data cache).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write_text, read_json
from .loading import cache_dir
from .reading import DataError

FORMAT = "ouroboros-prepared"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
HELDOUT_NAMES = "heldout-documents.txt"
INDEX_DTYPE = np.dtype("<i8")


def data_cache() -> Path:
    """Where raw sources are prepared (and shard checks stamped): $OUROBOROS_DATA_CACHE, else
    the cache's prepared/ folder."""
    return Path(os.environ.get("OUROBOROS_DATA_CACHE") or cache_dir() / "prepared")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokenizer_identity(tokenizer) -> dict:
    """Name and sha256 of a fast tokenizer's full definition (vocabulary, merges, normalizer...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"preparing data needs a fast (Rust) tokenizer; {type(tokenizer).__name__} is not one")
    digest = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return {"name": str(getattr(tokenizer, "name_or_path", "") or ""), "sha256": digest}


# ---------------------------------------------------------------------- checks
def shard_ok(s) -> bool:
    ints = lambda *vals: all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals)
    return (isinstance(s, dict) and isinstance(s.get("name"), str) and "/" not in s["name"]
            and not s["name"].startswith(".") and ints(s.get("tokens"), s.get("documents"))
            and (s["tokens"] == 0 or ints(s.get("min_token"), s.get("max_token")))
            and isinstance(s.get("sha256"), dict) and all(isinstance(s["sha256"].get(k), str) for k in ("bin", "idx")))


MANIFEST_BYTES = 256 << 20  # shards and held-out document names of a corpus of many millions of documents
# what its parse may cost: a source file is ~4 values (its path, size and time), a shard ~15; a manifest padded with
# empty objects or strings ("pad": [{}, {}, ...]) would cost ~30x its size in memory, and is refused unparsed
MANIFEST_VALUES = 1 << 23

def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} is not a prepared folder (no {MANIFEST}; make one with `ouroboros prepare`)")
    try:  # a manifest lists shards and held-out documents: larger than a settings file, still bounded
        m = read_json(path, "manifest", limit=MANIFEST_BYTES, max_values=MANIFEST_VALUES)
    except ValueError as e:
        raise DataError(f"{e}; prepare the folder again") from None
    try:
        ok = (m["format"] == FORMAT and m["version"] == VERSION and not isinstance(m["version"], bool) and m["dtype"] in ("<u2", "<u4")
              and isinstance(m["tokenizer"]["sha256"], str) and isinstance(m["eos"], int)
              and all(shard_ok(s) for split in SPLITS for s in m["splits"][split]["shards"])
              and all(isinstance(m["splits"][split]["documents"], int) for split in SPLITS))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{path} is not a manifest of `ouroboros prepare` (format {FORMAT} v{VERSION}); "
                        "prepare the folder again")
    problem = manifest_inconsistency(m)
    if problem:
        raise DataError(f"{path}: {problem} (edited or corrupt); prepare the folder again")
    return m


def manifest_inconsistency(m: dict) -> str | None:
    """What in a well-typed manifest does not add up: a split's totals against its shards, a shard under the
    other split's name or listed twice, an inverted token range, a bool where a number belongs."""
    names = [s["name"] for split in SPLITS for s in m["splits"][split]["shards"]]
    if len(set(names)) != len(names):
        return "a shard is listed twice"
    if isinstance(m["eos"], bool) or m["eos"] < 0:
        return f"eos must be a token id; got {m['eos']!r}"
    for split in SPLITS:
        info, shards = m["splits"][split], m["splits"][split]["shards"]
        for s in shards:
            if not re.fullmatch(rf"{split}-\d{{5}}", s["name"]):
                return f"shard {s['name']} is listed under {split}"
            if s["tokens"] and s["min_token"] > s["max_token"]:
                return f"shard {s['name']} has min_token {s['min_token']} > max_token {s['max_token']}"
        for key in ("documents", "tokens"):
            total = info.get(key, sum(s[key] for s in shards))
            if isinstance(total, bool) or not isinstance(total, int) or total != sum(s[key] for s in shards):
                return f"{split} {key} {total!r} is not the sum of its shards' ({sum(s[key] for s in shards)})"
    return None


def check_tokenizer(manifest: dict, folder: Path, tokenizer) -> None:
    ours, theirs = manifest["tokenizer"], tokenizer_identity(tokenizer)
    if ours["sha256"] != theirs["sha256"]:
        raise DataError(f"{folder / MANIFEST}: prepared with tokenizer {ours['name'] or '?'} "
                        f"(sha256 {ours['sha256'][:12]}), but the model's is {theirs['name'] or '?'} "
                        f"(sha256 {theirs['sha256'][:12]}); prepare it again with this model's tokenizer")


def stamp_path(path: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    return data_cache() / "verified" / hashlib.sha256(key.encode()).hexdigest()[:32]


def content_of(path: Path, dtype: np.dtype) -> str:
    """sha256 of the file, and for token shards (dtype given) the smallest and largest id."""
    h, lo, hi = hashlib.sha256(), None, None
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if dtype is not None and chunk:
                ids = np.frombuffer(chunk, dtype=dtype)
                lo, hi = min(int(ids.min()), lo if lo is not None else 1 << 40), max(int(ids.max()), hi or 0)
    return h.hexdigest() if dtype is None else f"{h.hexdigest()} {lo} {hi}"


def verify_file(path: Path, size: int, claimed: str, dtype: np.dtype | None = None) -> None:
    """`path` holds `size` bytes whose content (`content_of`) is `claimed`; else a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path} is missing (the manifest beside it names it); prepare the folder again")
    actual = path.stat().st_size
    if actual != size:
        raise DataError(f"{path} holds {actual} bytes, the manifest says {size} (truncated or replaced); "
                        "prepare the folder again")
    stamp = stamp_path(path)
    if stamp.is_file() and stamp.read_text() == claimed:
        return
    if content_of(path, dtype) != claimed:
        raise DataError(f"{path} does not match its checksum and token range in the manifest (edited or "
                        "corrupted); prepare the folder again")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, claimed)
    except OSError:
        pass  # a read-only cache only means checking again next time


def open_shard(folder: Path, shard: dict, dtype: np.dtype) -> np.ndarray:
    """The tokens of one shard, memory-mapped, after its size, checksums and token range are checked."""
    base = folder / shard["name"]
    claimed = f"{shard['sha256']['bin']} {shard.get('min_token')} {shard.get('max_token')}"
    if shard["tokens"] == 0:
        claimed = f"{shard['sha256']['bin']} None None"
    verify_file(base.with_suffix(".bin"), shard["tokens"] * dtype.itemsize, claimed, dtype)
    verify_file(base.with_suffix(".idx"), shard["documents"] * INDEX_DTYPE.itemsize, shard["sha256"]["idx"])
    if shard["tokens"] == 0:
        return np.zeros(0, dtype)
    return np.memmap(base.with_suffix(".bin"), dtype=dtype, mode="r")


class Prepared:
    """A prepared folder, checked: its manifest and memory maps of its shards."""

    def __init__(self, folder: str | Path, tokenizer=None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if tokenizer is not None:
            check_tokenizer(self.manifest, self.folder, tokenizer)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.arrays = {split: [open_shard(self.folder, s, self.dtype) for s in self.manifest["splits"][split]["shards"]]
                       for split in SPLITS}

    def documents(self, split: str) -> int:
        return self.manifest["splits"][split]["documents"]

    def token_range(self, split: str) -> tuple[int, int]:
        shards = [s for s in self.manifest["splits"][split]["shards"] if s["tokens"]]
        return min((s["min_token"] for s in shards), default=0), max((s["max_token"] for s in shards), default=0)


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class Blocks:
    """[n_blocks, seq_len] over token shards: block i is a slice of one shard; indexing (a slice,
    a list or tensor of block numbers, an int, and a second index over positions) returns int64."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, token_range: tuple[int, int], what: str = "data"):
        if seq_len < 2:
            raise DataError(f"seq_len must be >= 2; got {seq_len}")
        self.arrays, self.seq_len, self.token_range = arrays, seq_len, token_range
        self.starts = np.cumsum([0] + [len(a) // seq_len for a in arrays])
        if self.starts[-1] == 0:
            raise DataError(f"{what} has {sum(len(a) for a in arrays)} tokens, less than one block of seq_len={seq_len}")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.starts[-1]), self.seq_len)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def numel(self) -> int:
        return len(self) * self.seq_len

    def min(self) -> int:
        return self.token_range[0]

    def max(self) -> int:
        return self.token_range[1]

    def digest(self) -> str:
        """sha256 of the shape and the int64 bytes of all blocks, row by row: what hashing
        `self[:]` gives, read a chunk of blocks at a time."""
        h = hashlib.sha256(f"{self.shape}".encode())
        for start in range(0, len(self), 4096):
            h.update(self[start: start + 4096].numpy().tobytes())
        return h.hexdigest()

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):
            return self[key[0]][(slice(None),) + key[1:]]
        if isinstance(key, slice):
            rows = np.arange(*key.indices(len(self)))
        else:
            rows = np.asarray(key, dtype=np.int64)
            if rows.ndim == 0:
                return self[rows.reshape(1)][0]
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"block index out of range for {len(self)} blocks")
        rows = rows % max(len(self), 1)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((rows.size, self.seq_len), dtype=np.int64)
        for j, (s, r) in enumerate(zip(shard.tolist(), rows.tolist())):
            at = (r - int(self.starts[s])) * self.seq_len
            out[j] = self.arrays[s][at: at + self.seq_len]
        return torch.from_numpy(out)
