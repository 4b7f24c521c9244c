"""The corpus a run trains and evaluates on: blocks of `seq_len` tokens from prepared folders,
with held-out text kept apart by document.

Sources (`reading.py`): text files, folders and globs of them, `.jsonl` (a text field),
`.parquet`, `hf:<dataset id>`, and folders from `ouroboros prepare`; `NAME=SRC[:WEIGHT]` names
sources and mixes them by weight. Raw sources are prepared (`prepare.py`: tokenized once, EOS
after every document) into the data cache; blocks are read from the shards by memory map
(`shards.py`) and drawn by a stateless sampler (`sampling.py`). The held-out split is either
explicit (`heldout` sources) or a deterministic split *by document* (`prepare.held_out`), so no
document is on both sides. `DataConfig` says which (the `--data` flags, a sweep spec's `data:`).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .prepare import PrepareConfig, cache_folder, check_disjoint, prepare
from .settings import REQUIRED, same_as, setting, validate_fields
from .reading import TEXT_SUFFIXES, DataError, expand_sources, iter_documents  # noqa: F401 - the data API
from .sampling import BlockSampler, MixtureSampler, quotas
from .shards import Blocks, Prepared, is_prepared


@dataclass
class Document:
    name: str  # file path, or path:line for jsonl, or dataset:row
    text: str


def load_documents(sources: list[str] | str, text_field: str = "text") -> list[Document]:
    """Every document of `sources`, whole, in memory (for small inputs and tests; training and
    `prepare` stream them instead)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    return [Document(name, "".join(pieces)) for _, name, pieces in iter_documents(list(sources), text_field)]


# ---------------------------------------------------------------------- sources by name and weight
ITEM = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$", re.S)


def parse_item(text: str) -> tuple[str | None, str, float | None]:
    """`NAME=SRC[:WEIGHT]` -> (NAME, SRC, WEIGHT); a plain SRC (or a path that exists) -> (None, SRC, None)."""
    m = ITEM.match(text)
    if m is None or Path(text).exists():
        return None, text, None
    name, rest = m.groups()
    head, sep, tail = rest.rpartition(":")
    if not (sep and head):
        return name, rest, None
    try:
        weight = float(tail)
    except ValueError:
        return name, rest, None  # hf:owner/name:split
    if not (math.isfinite(weight) and weight > 0):
        raise DataError(f"--data {text}: the weight must be a finite number > 0")
    return name, head, weight


def map_source(text: str, fn) -> str:
    """`text` (an item as parse_item reads it) with fn applied to its source part."""
    name, src, _ = parse_item(text)
    if name is None:
        return fn(text)
    return f"{name}={fn(src)}{text[len(name) + 1 + len(src):]}"


@dataclass
class Group:
    """The sources given one name (unnamed sources: `data`) and the weight given to it."""

    name: str
    sources: list[str]
    weight: float | None


def group_items(items: list[str]) -> list[Group]:
    if not items:
        raise DataError("no data sources given")
    groups: dict[str, Group] = {}
    for text in items:
        name, src, weight = parse_item(text)
        g = groups.setdefault(name or "data", Group(name or "data", [], weight))
        if weight is not None and g.weight not in (None, weight):
            raise DataError(f"--data: source {g.name} is given two weights ({g.weight:g} and {weight:g})")
        g.weight = weight if weight is not None else g.weight
        g.sources.append(src)
    unweighted = [g.name for g in groups.values() if g.weight is None]
    if len(unweighted) not in (0, len(groups)):
        raise DataError(f"--data: give every source a weight (NAME=SRC:WEIGHT) or none (mixed by size); "
                        f"{unweighted[0]} has none")
    if not unweighted and not math.isfinite(sum(g.weight for g in groups.values())):
        raise DataError("--data: the weights add up to more than a float can hold ("
                        + " + ".join(f"{g.weight:g}" for g in groups.values()) + "); give them on a smaller scale")
    return list(groups.values())


@dataclass
class Part:
    """One named training source of a corpus: its blocks (consecutive in `Corpus.train`) and weight."""

    name: str
    blocks: int
    weight: float


@dataclass
class Corpus:
    """Training and held-out blocks ([n, seq_len]: tensors, or `shards.Blocks` read from a prepared
    folder by memory map) and where they came from."""

    train: torch.Tensor | Blocks
    heldout: torch.Tensor | Blocks
    n_train_docs: int
    n_heldout_docs: int
    seq_len: int
    parts: tuple[Part, ...] = ()
    train_folders: tuple[Prepared, ...] = ()  # the prepared folders `train` joins, in order
    targets: object | None = None  # `targets.CorpusTargets`: the teacher's stored predictions (distillation)

    def sampler(self, seed: int) -> BlockSampler | MixtureSampler:
        """The stateless sampler of training blocks: a shuffle of them all, or a mixture by weight."""
        if len(self.parts) <= 1:
            return BlockSampler(self.train.shape[0], seed)
        return MixtureSampler([p.blocks for p in self.parts], [p.weight for p in self.parts], seed)

    def blocks_drawn(self, seed: int, batches: range, batch_size: int, processes: int = 1) -> np.ndarray:
        """Every training block the batches numbered `batches` draw (all processes), sorted, once each."""
        sampler = self.sampler(seed)
        drawn = [sampler.batch(i, batch_size, rank, processes).numpy() for i in batches for rank in range(processes)]
        return np.unique(np.concatenate(drawn)) if drawn else np.zeros(0, dtype=np.int64)

    def sampling_key(self) -> dict:
        """What the batches drawn depend on besides the seed (a resumed run must match it)."""
        return {"train_blocks": int(self.train.shape[0]),
                "sources": [[p.name, p.blocks, p.weight] for p in self.parts] if len(self.parts) > 1 else []}

    def tokens_seen(self, positions: int, seed: int) -> dict[str, int]:
        """Tokens of each named source among the first `positions` blocks drawn (a mixture only)."""
        if len(self.parts) <= 1:
            return {}
        counts = self.sampler(seed).counts(positions)
        return {f"tokens_seen/{p.name}": c * self.seq_len for p, c in zip(self.parts, counts)}

    def eval_splits(self, n_blocks: int, seed: int) -> dict[str, torch.Tensor]:
        """The blocks every evaluation row is scored on: `n_blocks` training blocks (a seeded
        sample) and the first `n_blocks` held-out blocks (fewer where a split is smaller)."""
        n_train = min(n_blocks, self.train.shape[0])
        idx = BlockSampler(self.train.shape[0], seed).batch(0, n_train)
        return {"train": self.train[idx], "heldout": self.heldout[:n_blocks]}

    def describe(self) -> str:
        total = sum(p.weight for p in self.parts)
        mix = (" (" + ", ".join(f"{p.name} {100 * p.weight / total:.0f}%" for p in self.parts) + " of blocks drawn)"
               if len(self.parts) > 1 else "")
        return (
            f"train: {self.n_train_docs} docs, {self.train.shape[0]} blocks x {self.seq_len} tokens{mix}; "
            f"held-out: {self.n_heldout_docs} docs, {self.heldout.shape[0]} blocks x {self.seq_len} tokens"
        )


def open_sources(sources: list[str], tokenizer, pc: PrepareConfig, rule: str) -> Prepared:
    """A prepared folder given as the only source, or raw `sources` prepared into the data cache
    (keyed by the sources, their files' sizes and times, the split and the tokenizer) once."""
    folders = [s for s in sources if is_prepared(s)]
    if folders:
        if len(sources) > 1:
            raise DataError(f"{folders[0]} is a prepared folder: give it as a source of its own (NAME={folders[0]})")
        return Prepared(folders[0], tokenizer)
    folder = cache_folder(sources, rule, pc, tokenizer)
    if not is_prepared(folder):
        print(f"preparing {', '.join(sources)[:160]} into {folder} (once: later runs read it from there)")
    prepare(sources, folder, tokenizer, pc, rule=rule, progress=None)
    return Prepared(folder, tokenizer)


def joined(folders: list[Prepared], split: str, seq_len: int, what: str) -> Blocks:
    ranges = [f.token_range(split) for f in folders if f.manifest["splits"][split]["tokens"]] or [(0, 0)]
    return Blocks([a for f in folders for a in f.arrays[split]], seq_len,
                  (min(r[0] for r in ranges), max(r[1] for r in ranges)), what)


def build_corpus(
    data: list[str],
    tokenizer,
    seq_len: int,
    heldout: list[str] | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    text_field: str = "text",
) -> Corpus:
    """Blocks of `data` (sources, `NAME=SRC[:WEIGHT]` items, prepared folders) and of the held-out
    text: `heldout` sources, else each source's documents held out by `prepare.held_out`'s rule."""
    groups = group_items(list(data))
    pc = PrepareConfig(heldout_fraction=heldout_fraction, seed=seed, text_field=text_field)
    if heldout:
        check_disjoint([s for g in groups for s in g.sources if not is_prepared(s)],
                       [s for s in heldout if not is_prepared(s)])
    folders = [open_sources(g.sources, tokenizer, pc, "none" if heldout else "fraction") for g in groups]
    held = [open_sources(list(heldout), tokenizer, pc, "all")] if heldout else folders
    parts = []
    for g, f in zip(groups, folders):
        n = len(joined([f], "train", seq_len, f"source {g.name}" if len(groups) > 1 else "the training split"))
        parts.append(Part(g.name, n, g.weight if g.weight is not None else float(n)))
    if len(parts) > 1 and 0 in quotas([p.weight for p in parts]):
        low = parts[quotas([p.weight for p in parts]).index(0)].name
        raise DataError(f"--data: source {low}'s weight is below 1/1024 of the total; raise it or leave the source out")
    return Corpus(joined(folders, "train", seq_len, "the training split"),
                  joined(held, "heldout", seq_len, "the held-out split"),
                  sum(f.documents("train") for f in folders), sum(f.documents("heldout") for f in held), seq_len,
                  tuple(parts), tuple(folders))


def domain_blocks(sources: list[str], tokenizer, seq_len: int, n_blocks: int, seed: int,
                  text_field: str = "text") -> torch.Tensor:
    """`n_blocks` blocks (a seeded sample, so not only a document's opening) of an evaluation-only
    domain: text that no training run ever reads, e.g. another genre than the training set."""
    f = open_sources(list(sources), tokenizer, PrepareConfig(text_field=text_field), "none")
    blocks = joined([f], "train", seq_len, f"domain {sources}")
    n = min(n_blocks, len(blocks))
    return blocks[BlockSampler(len(blocks), seed).batch(0, n)]


@dataclass
class DataConfig:
    """Where a run's tokens come from: the data flags of train, train-halter and eval, a sweep spec's
    `data:` section (there `train:`), the demo's `data:` section."""

    train: tuple[str, ...] = setting(REQUIRED, "text files, folders, globs, .jsonl, .parquet, hf:<dataset id>, or a "
                                     "folder from `ouroboros prepare`; NAME=SRC[:WEIGHT] names sources and mixes them "
                                     "by weight (by size without weights)", flag="--data", metavar="SRC")
    heldout: tuple[str, ...] | None = setting(None, "held-out sources (default: a deterministic split of --data by "
                                              "document)", metavar="SRC")
    heldout_fraction: float = same_as(PrepareConfig, "heldout_fraction")
    text_field: str = same_as(PrepareConfig, "text_field")
    seq_len: int | None = setting(None, "tokens per block (default: 2048 on GPU, 256 on CPU)", low=1, high=1 << 20)

    def __post_init__(self) -> None:
        validate_fields(self)

    def corpus(self, tokenizer, default_seq_len: int, seed: int = 0) -> Corpus:
        """The corpus these sources make, in blocks of seq_len tokens (default_seq_len when unset)."""
        return build_corpus(list(self.train), tokenizer, self.seq_len or default_seq_len,
                            heldout=list(self.heldout) if self.heldout else None,
                            heldout_fraction=self.heldout_fraction, seed=seed, text_field=self.text_field)
