"""Text sources -> a stream of documents, each a stream of text pieces: no file, line or corpus
is ever held whole beyond what one read returns (a .jsonl line, a parquet batch, 1 MB of a text
file), so memory stays bounded by what is read.

Sources: text files, folders and globs of them, `.jsonl` (a text field), `.parquet`, and
`hf:<dataset id>[:split]` (through `datasets` streaming, for users who are online). A long text
is cut into pieces of about PIECE_CHARS characters before a space that sits between two
non-space characters: byte-level BPE (GPT-2, Llama 3, SmolLM) and SentencePiece pre-tokenizers
all start a token there, so the pieces tokenize exactly as the whole text does. A run of more
than HARD_CHARS characters without such a space is cut where it stands.
"""
from __future__ import annotations

import codecs
import glob
import itertools
import json
import os
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".jsonl", ".parquet"}
READ_BYTES = 1 << 20
PIECE_CHARS = 1 << 16
HARD_CHARS = 1 << 20


class DataError(ValueError):
    """Bad training or evaluation data; the message names the file or the setting."""


def printable(text) -> str:
    """`text` safe to print to a terminal: control characters (ANSI escapes, carriage returns) escaped as Python
    writes them (\\x1b), so a name read from a file or a flag can neither recolour nor rewrite what is shown."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def expand_sources(sources: list[str]) -> list[Path]:
    """Files named by paths, folders (recursively, known text suffixes) and globs; sorted."""
    files: list[Path] = []
    for src in sources:
        if src.startswith("hf:"):
            continue
        p = Path(src).expanduser()
        if p.is_file():  # a name that exists is that file, even with [ ] * ? in it
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"folder {src} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            files.extend(found)
        elif any(ch in src for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(os.path.expanduser(src), recursive=True) if Path(m).is_file())
            if not matched:
                raise DataError(f"no files match {src!r}")
            files.extend(matched)
        else:
            raise DataError(f"data source not found: {src}")
    return files


# ---------------------------------------------------------------------- pieces
def cut_point(text: str, lo: int, hi: int) -> int | None:
    """The last index in (lo, hi - 1) of a space between two non-space characters, else None."""
    i = text.rfind(" ", lo + 1, hi - 1)
    while i > lo and (text[i - 1].isspace() or text[i + 1].isspace()):
        i = text.rfind(" ", lo + 1, i)
    return i if i > lo else None


def cuts(text: str) -> Iterator[int]:
    """Where to cut `text` into pieces of about PIECE_CHARS characters (the last one, up to
    PIECE_CHARS long or holding no safe cut within HARD_CHARS, is left uncut)."""
    pos = 0
    while len(text) - pos > PIECE_CHARS:
        cut = cut_point(text, pos, pos + PIECE_CHARS) or cut_point(text, pos, min(len(text), pos + HARD_CHARS))
        if cut is None:
            if len(text) - pos <= HARD_CHARS:
                return
            cut = pos + HARD_CHARS
        yield cut
        pos = cut


def pieces_of(text: str) -> Iterator[str]:
    """`text` in pieces of about PIECE_CHARS characters, cut where tokenization is unchanged."""
    pos = 0
    for cut in cuts(text):
        yield text[pos:cut]
        pos = cut
    yield text[pos:]


def check_head(path: Path, head: bytes) -> None:
    if b"\x00" in head[:8192]:
        raise DataError(f"{path} looks binary (it contains NUL bytes), not text")


def text_file_pieces(path: Path) -> Iterator[str]:
    """A UTF-8 text file read 1 MB at a time, in pieces; errors name the file (and the offset)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buf, offset, seen_text = "", 0, False
    with open(path, "rb") as f:
        while True:
            raw = f.read(READ_BYTES)
            if offset == 0:
                check_head(path, raw)
            pending = len(decoder.getstate()[0])
            try:
                buf += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not valid UTF-8 (undecodable byte at offset {offset - pending + e.start})") from None
            offset += len(raw)
            if not raw:
                break
            pos = 0
            for cut in cuts(buf):
                seen_text = seen_text or not buf[pos:cut].isspace()
                yield buf[pos:cut]
                pos = cut
            buf = buf[pos:]
    if not (seen_text or buf.strip()):
        raise DataError(f"{path} is empty")
    yield from pieces_of(buf)


# ---------------------------------------------------------------------- documents
def jsonl_documents(path: Path, text_field: str, name: str | None = None) -> Iterator[tuple[str, Iterator[str]]]:
    """One document per line with a non-empty string `text_field` (a line at a time)."""
    offset, found, blank = 0, False, True
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if offset == 0:
                check_head(path, raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not valid UTF-8 (undecodable byte at offset {offset + e.start})") from None
            offset += len(raw)
            if not line.strip():
                continue
            blank = False
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i} is not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{i} is nested too deeply to be a document") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise DataError(f"{path}:{i} has no string field {text_field!r}")
            if obj[text_field].strip():
                found = True
                yield f"{name or path}:{i}", pieces_of(obj[text_field])
    if not found:
        raise DataError(f"{path} is empty" if blank else f"{path} has no non-empty {text_field!r} values")


def parquet_documents(path: Path, text_field: str, name: str | None = None) -> Iterator[tuple[str, Iterator[str]]]:
    """One document per row with a non-empty `text_field`, read in batches of rows."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (`pip install 'ouroboros-lm[data]'`)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types for a bad file
        raise DataError(f"{path} is not a readable parquet file ({str(e)[:120]})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not text")
    row, found = 0, False
    for batch in pf.iter_batches(batch_size=256, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text and text.strip():
                found = True
                yield f"{name or path}:{row}", pieces_of(text)
            row += 1
    if not found:
        raise DataError(f"{path} has no non-empty {text_field!r} values")


def hf_documents(spec: str, text_field: str) -> Iterator[tuple[str, Iterator[str]]]:
    """`hf:owner/name[:split]` streamed through the `datasets` library (needs network access)."""
    name, _, split = spec[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: Hugging Face datasets need `pip install 'ouroboros-lm[data]'`") from None
    for i, row in enumerate(datasets.load_dataset(name, split=split or "train", streaming=True)):
        if text_field not in row:
            raise DataError(f"{spec} has no column {text_field!r} (columns: {', '.join(row)})")
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            yield f"{name}:{i}", pieces_of(text)


def file_documents(path: Path, text_field: str, name: str | None = None) -> Iterator[tuple[str, Iterator[str]]]:
    """(document name, its pieces) of one file: the file itself, or each line / row of a .jsonl / .parquet.
    `name` names the file in documents' names (default: its path)."""
    suffix = path.suffix.lower()
    name = name or str(path)
    if suffix == ".parquet":
        yield from parquet_documents(path, text_field, name)
    elif suffix == ".jsonl":
        yield from jsonl_documents(path, text_field, name)
    else:
        yield name, text_file_pieces(path)


def document_name(path: Path, source: str) -> str:
    """A file's name as a document, relative to the source that named it (a file: its own name; a folder: its
    path inside it; a glob: its path below the glob's first wildcard-free folders), so that the same corpus
    copied elsewhere, or named by a relative instead of an absolute path, holds out the same documents."""
    src = Path(source).expanduser()
    if src.is_file():
        return path.name
    if src.is_dir():
        return path.relative_to(src).as_posix()
    root = Path(*[part for part in itertools.takewhile(lambda p: not any(c in p for c in "*?["), src.parts)])
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def iter_documents(sources: list[str], text_field: str = "text") -> Iterator[tuple[int, str, Iterator[str]]]:
    """(index of the source in `sources`, document name, its pieces) for every document, files in
    the order `expand_sources` gives, then `hf:` datasets. Consume a document's pieces (or not)
    before asking for the next one."""
    if not sources:
        raise DataError("no data sources given")
    for i, src in enumerate(sources):
        if src.startswith("hf:"):
            continue
        for path in expand_sources([src]):
            for name, pieces in file_documents(path, text_field, document_name(path, src)):
                yield i, name, pieces
    for i, src in enumerate(sources):
        if src.startswith("hf:"):
            for name, pieces in hf_documents(src, text_field):
                yield i, name, pieces
