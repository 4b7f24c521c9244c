"""Text sources -> documents -> tokens -> packed blocks, with held-out text kept apart by
document.

Sources: text files, folders and globs of them, `.jsonl` (a text field), `.parquet`, and
`hf:<dataset id>` (through `datasets`, for users who are online). Documents are tokenized
with the base model's tokenizer, joined with EOS between them and cut into blocks of
`seq_len` tokens. The held-out split is either explicit (`heldout` sources) or a
deterministic split *by document*, so no document is on both sides.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".jsonl", ".parquet"}


class DataError(ValueError):
    """Bad training or evaluation data; the message names the file or the setting."""


@dataclass
class Document:
    name: str  # file path, or path:line for jsonl, or dataset:row
    text: str


# ---------------------------------------------------------------------- reading
def expand_sources(sources: list[str]) -> list[Path]:
    """Files named by paths, folders (recursively, known text suffixes) and globs; sorted."""
    files: list[Path] = []
    for src in sources:
        if src.startswith("hf:"):
            continue
        p = Path(src).expanduser()
        if any(ch in src for ch in "*?[") and not p.exists():  # a file named with [ ] * ? is itself
            matched = sorted(Path(m) for m in glob.glob(os.path.expanduser(src), recursive=True) if Path(m).is_file())
            if not matched:
                raise DataError(f"no files match {src!r}")
            files.extend(matched)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"folder {src} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data source not found: {src}")
    return files


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty")
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} looks binary (it contains NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (undecodable byte at offset {e.start})") from None


def read_file(path: Path, text_field: str = "text") -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (`pip install 'ouroboros-lm[data]'`)") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types for a bad file
            raise DataError(f"{path} is not a readable parquet file ({str(e)[:120]})") from None
        if text_field not in table.column_names:
            raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(table.column_names)})")
        import pyarrow as pa

        kind = table.schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {text_field!r} holds {kind}, not text")
        docs = [Document(f"{path}:{i}", t) for i, t in enumerate(table.column(text_field).to_pylist()) if t and t.strip()]
        if not docs:
            raise DataError(f"{path} has no non-empty {text_field!r} values")
        return docs
    text = _read_text(path)
    if suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise DataError(f"{path}:{i} has no string field {text_field!r}")
            if obj[text_field].strip():
                docs.append(Document(f"{path}:{i}", obj[text_field]))
        if not docs:
            raise DataError(f"{path} has no non-empty {text_field!r} values")
        return docs
    return [Document(str(path), text)]


def read_hf_dataset(spec: str, text_field: str = "text") -> list[Document]:
    """`hf:owner/name[:split]` through the `datasets` library (needs network access)."""
    body = spec[3:]
    name, _, split = body.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: Hugging Face datasets need `pip install 'ouroboros-lm[data]'`") from None
    ds = datasets.load_dataset(name, split=split or "train")
    if text_field not in ds.column_names:
        raise DataError(f"{spec} has no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    return [Document(f"{name}:{i}", t) for i, t in enumerate(ds[text_field]) if t and t.strip()]


def load_documents(sources: list[str] | str, text_field: str = "text") -> list[Document]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    if not sources:
        raise DataError("no data sources given")
    docs: list[Document] = []
    for path in expand_sources(list(sources)):
        docs.extend(read_file(path, text_field))
    for src in sources:
        if src.startswith("hf:"):
            docs.extend(read_hf_dataset(src, text_field))
    return docs


# ---------------------------------------------------------------------- split
def split_documents(docs: list[Document], heldout_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: order documents by a seeded hash of their name and
    hold out the first ceil(fraction * n)."""
    if not 0 < heldout_fraction < 1:
        raise DataError(f"heldout_fraction must be in (0, 1); got {heldout_fraction}")
    n_held = math.ceil(heldout_fraction * len(docs))
    if len(docs) < 2 or n_held >= len(docs):
        raise DataError(
            f"cannot split {len(docs)} document(s) with heldout_fraction={heldout_fraction}: one side would be "
            "empty; give more documents or explicit --heldout sources"
        )
    key = lambda d: hashlib.sha256(f"{seed}:{d.name}".encode()).hexdigest()
    ranked = sorted(docs, key=key)
    held = {d.name for d in ranked[:n_held]}
    return [d for d in docs if d.name not in held], [d for d in docs if d.name in held]


# ---------------------------------------------------------------------- tokens
def tokenize_documents(docs: list[Document], tokenizer) -> torch.Tensor:
    """One long stream: doc tokens, EOS, doc tokens, EOS, ..."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id to put between documents")
    ids: list[int] = []
    enc = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    for toks in enc:
        ids.extend(toks)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int, what: str = "data") -> torch.Tensor:
    """[n_blocks, seq_len]; the tail shorter than a block is dropped."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2; got {seq_len}")
    n = stream.numel() // seq_len
    if n == 0:
        raise DataError(f"{what} has {stream.numel()} tokens, less than one block of seq_len={seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


@dataclass
class Corpus:
    """Packed training and held-out blocks, and where they came from."""

    train: torch.Tensor
    heldout: torch.Tensor
    n_train_docs: int
    n_heldout_docs: int
    seq_len: int

    def eval_splits(self, n_blocks: int, seed: int) -> dict[str, torch.Tensor]:
        """The blocks every evaluation row is scored on: `n_blocks` training blocks (a seeded
        sample) and the first `n_blocks` held-out blocks (fewer where a split is smaller)."""
        n_train = min(n_blocks, self.train.shape[0])
        idx = BlockSampler(self.train.shape[0], seed).batch(0, n_train)
        return {"train": self.train[idx], "heldout": self.heldout[:n_blocks]}

    def describe(self) -> str:
        return (
            f"train: {self.n_train_docs} docs, {self.train.shape[0]} blocks x {self.seq_len} tokens; "
            f"held-out: {self.n_heldout_docs} docs, {self.heldout.shape[0]} blocks x {self.seq_len} tokens"
        )


def build_corpus(
    data: list[str],
    tokenizer,
    seq_len: int,
    heldout: list[str] | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    text_field: str = "text",
) -> Corpus:
    train_docs = load_documents(data, text_field)
    if heldout:
        held_docs = load_documents(heldout, text_field)
        overlap = {d.name for d in train_docs} & {d.name for d in held_docs}
        if overlap:
            raise DataError(f"{len(overlap)} document(s) are in both --data and --heldout, e.g. {sorted(overlap)[0]}")
    else:
        train_docs, held_docs = split_documents(train_docs, heldout_fraction, seed)
    train = pack(tokenize_documents(train_docs, tokenizer), seq_len, "the training split")
    held = pack(tokenize_documents(held_docs, tokenizer), seq_len, "the held-out split")
    return Corpus(train, held, len(train_docs), len(held_docs), seq_len)


class BlockSampler:
    """Which blocks the i-th batch holds: a seeded, epoch-wise shuffle, stateless in i, so a
    resumed run sees exactly the batches an uninterrupted one would. With several processes,
    each takes its own slice of every global batch."""

    def __init__(self, n_blocks: int, seed: int):
        self.n_blocks = n_blocks
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_blocks, generator=g)}
        return self._perms[epoch]

    def batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        start = (index * world_size + rank) * batch_size
        return torch.stack([self._perm(p // self.n_blocks)[p % self.n_blocks] for p in range(start, start + batch_size)])


def domain_blocks(sources: list[str], tokenizer, seq_len: int, n_blocks: int, seed: int,
                  text_field: str = "text") -> torch.Tensor:
    """`n_blocks` blocks (a seeded sample, so not only a document's opening) of an evaluation-only
    domain: text that no training run ever reads, e.g. another genre than the training set."""
    blocks = pack(tokenize_documents(load_documents(sources, text_field), tokenizer), seq_len, f"domain {sources}")
    n = min(n_blocks, blocks.shape[0])
    return blocks[BlockSampler(blocks.shape[0], seed).batch(0, n)]
