"""Every file and folder we write, by one rule:

- never through a link: a folder we write into (and every folder between it and the folder the
  user named) must not be a symbolic link; a file is written to a temporary name beside it
  (opened with O_NOFOLLOW | O_EXCL), fsynced and renamed over the target, so a link planted at
  the target is replaced, never written through, and a crash leaves the old file or the new one;
- folders are built under a temporary name and renamed into place whole (`temp_dir`,
  `replace_dir`); temporaries a dead process left behind are ours to remove (`clean_temporaries`);
- we delete only folders we made: no link, nothing in them but the files we list (an exported
  folder lists its own in `MARKER`), never the working folder or one of its ancestors.

A write that fails (a full disk) raises OSError naming the file, after removing its temporary.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

MARKER = ".ouroboros-lm.json"  # {"kind": ..., "files": [...]}: a folder we wrote, and every file in it
TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")  # .<name>.tmp<pid>


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def refuse_link(path: Path) -> None:
    if os.path.islink(path):
        raise OSError(40, f"{path} is a symbolic link; refusing to write through it (nothing was written there)")


def refuse_shared(path: Path, st: os.stat_result, what: str) -> None:
    """Refuse `path` (whose stat is `st`) as a file we write in place unless it is a regular file of its own."""
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a FIFO, device or folder); refusing to use it as the {what} "
                         "(remove it; nothing was written there)")
    if st.st_nlink > 1:
        raise ValueError(f"{path} has {st.st_nlink} hard links (another name shares its contents); refusing to write "
                         f"into it as the {what} (remove it or replace it with a copy; nothing was written there)")


def check_own_file(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse, before a file is appended to or locked in place (metrics.jsonl, a lock file), anything at `path`
    but a regular file of its own: a link, a FIFO (opening it would hang), a device, a folder, or a file hard-linked
    elsewhere (writing into it would change that other name's contents). Nothing there: fine (it is created)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        refuse_link(path)
    refuse_shared(path, st, what)


def open_own_file(path: str | os.PathLike, flags: int, what: str = "file") -> int:
    """os.open of a file we write in place, by `check_own_file`'s rule, checked again on the open file (opened
    O_NONBLOCK, so a FIFO swapped in between cannot make the open hang; blocking again once checked)."""
    path = Path(path)
    check_own_file(path, what)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise OSError(e.errno, f"{path} is a symbolic link; refusing to write through it") from None
        raise OSError(e.errno, f"{path}: cannot open the {what} ({e.strerror or e})") from None
    try:
        refuse_shared(path, os.fstat(fd), what)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_dir(path: str | os.PathLike, under: str | os.PathLike | None = None) -> Path:
    """Create folder `path` (and its parents) and return it, refusing if it, or any folder between
    `under` (default: `path` itself) and it, is a symbolic link or not a folder."""
    path = Path(path)
    top = Path(under) if under is not None else path
    try:
        rel = path.relative_to(top).parts
    except ValueError:
        raise ValueError(f"{path} is not inside {top}") from None
    current = top
    for part in ("",) + rel:
        current = current / part if part else current
        refuse_link(current)
        if current.exists() and not current.is_dir():
            raise OSError(20, f"{current} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    refuse_link(path)  # created by someone else in between
    return path


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_bytes(path: str | os.PathLike, data, under: str | os.PathLike | None = None) -> Path:
    """Write `data` (bytes, or an iterable of bytes written as it yields them: a file too large to hold) to `path`
    whole or not at all (see the module's rule); `under`: the folder the user named, below which no folder may be
    a link (default: the file's own folder)."""
    path = Path(path)
    ensure_dir(path.parent, under if under is not None else path.parent)
    tmp = temp_path(path)
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            for chunk in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(chunk)
            fsync_file(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"writing {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path, text: str, under=None) -> Path:
    return write_bytes(path, text.encode(), under)


def write_json(path, obj, under=None) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n", under)


def write_with(path, writer, under=None) -> Path:
    """`writer(file)` writes into memory, then the bytes go to `path` as `write_bytes` does (for
    torch.save, matplotlib's savefig, csv: their own errors on a full disk are not OSErrors)."""
    buf = io.BytesIO()
    writer(buf)
    return write_bytes(path, buf.getvalue(), under)


# kept for the modules that import the older names
atomic_write_bytes = write_bytes
atomic_write_text = write_text


MAX_JSON_BYTES = 8 << 20  # a settings or state file of ours is kilobytes; parsing costs ~30x its size in memory


def open_regular(path: Path, what: str = "file"):
    """`path` opened for reading in binary, only if it is a regular file (never a FIFO, which would block, a
    device, or through a link); a ValueError naming the file otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ValueError(f"{path}: cannot read this {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # checked on the descriptor: a folder cannot be opened as a file
        os.close(fd)
        raise ValueError(f"{path}: this {what} is not a regular file; refusing to read it")
    return os.fdopen(fd, "rb")


def read_bounded(path: str | os.PathLike, what: str = "file", limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of `path`, a regular file (never a FIFO, a device or through a link) of at most `limit`
    bytes; a ValueError naming the file and the limit otherwise, before anything large is read. The one way a
    file found in a folder is read before it is parsed: a folder cannot ask for more memory than it should."""
    path = Path(path)
    with open_regular(path, what) as f:
        st = os.fstat(f.fileno())
        if st.st_size > limit:
            raise ValueError(f"{path}: this {what} is {st.st_size:,} bytes, more than the {limit:,} it can be; "
                             "refusing to parse it (edited or corrupt?)")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while we read it
        raise ValueError(f"{path}: this {what} is more than the {limit:,} bytes it can be; refusing to parse it")
    return data


def parse_json(data: bytes | str, where: str, what: str = "file"):
    """JSON from bytes read off a file, or a ValueError naming it (torn, not UTF-8, absurdly nested)."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{where}: this {what} is not valid JSON ({str(e)[:120]})") from None


def json_values(data: bytes) -> int:
    """About how many values parsing `data` makes (each object, list and string, and each element after a comma):
    what its parse costs in memory beyond its size (tens of bytes a value), counted before it is parsed."""
    return data.count(b"{") + data.count(b"[") + data.count(b",") + data.count(b'"') // 2


def read_json(path: str | os.PathLike, what: str = "file", limit: int = MAX_JSON_BYTES, max_values: int | None = None):
    """JSON from `path` (`read_bounded`: a regular file of at most `limit` bytes; with `max_values`, of at most about
    that many values: `json_values`), or a ValueError naming the file."""
    data = read_bounded(path, what, limit)
    if max_values is not None and (n := json_values(data)) > max_values:
        raise ValueError(f"{path}: this {what} holds about {n:,} values, more than the {max_values:,} it can; "
                         "refusing to parse it (edited or corrupt?)")
    return parse_json(data, str(path), what)


# ---------------------------------------------------------------------- folders
def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def made_by_us(path: Path) -> bool:
    """Whether `path` can be a temporary of ours: owned by this user and either a regular file of its own or a
    folder of plain files and folders (we never make links, FIFOs or devices there, nor hard-link files)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if st.st_uid != os.getuid():
        return False
    if stat.S_ISREG(st.st_mode):
        return st.st_nlink == 1
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        files_in(path)  # refuses a link or anything but files and folders inside
    except (ValueError, OSError):
        return False
    return True


def clean_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries (`.<name>.tmp<pid>`, files or folders) a process that is no longer
    running left in `folder` (only those of `name`, if given), and only those that can be ours
    (`made_by_us`): a name and a dead pid alone are not enough."""
    folder = Path(folder)
    gone = []
    for p in folder.iterdir() if folder.is_dir() and not folder.is_symlink() else []:
        m = TEMP.match(p.name)
        if m and (name is None or m["name"] in (name, name + ".old")) and (int(m["pid"]) == os.getpid() or not alive(int(m["pid"]))) \
                and made_by_us(p):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def temp_dir(final: Path) -> Path:
    """A fresh temporary folder beside `final` (its parent created: the caller vouches for that one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    if tmp.exists() or tmp.is_symlink():
        remove_tree(tmp, None, force=True)
    tmp.mkdir()
    return tmp


def files_in(folder: Path) -> set[str]:
    """Every entry below `folder` as a relative path; a link or anything but files and folders is refused."""
    out = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for n in dirs + files:
            p = Path(root) / n
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise ValueError(f"{folder} holds {p}, which is not a plain file or folder: not ours to delete")
            if p.is_file():
                out.add(p.relative_to(folder).as_posix())
    return out


def write_marker(folder: Path, kind: str) -> None:
    """Record that `folder` is ours, of `kind`, with exactly the files it holds now."""
    write_json(folder / MARKER, {"kind": kind, "files": sorted(files_in(folder) - {MARKER})})


def refuse_working_folder(folder: Path) -> None:
    here = Path.cwd().resolve()
    if folder.resolve() == here or folder.resolve() in here.parents:
        raise ValueError(f"{folder} is the working folder or one of its parents; refusing to replace it")


def check_removable(folder: Path, kind: str, expected: set[str] | None = None, patterns: tuple[str, ...] = ()) -> None:
    """Raise ValueError unless deleting `folder` loses only what we wrote there: not a link, not the
    working folder or an ancestor of it, and holding only `expected` files (default: those its
    MARKER of `kind` lists, and those whose relative path `patterns` match whole: regular expressions, for a
    folder whose files are not known in advance, such as a demo's; write them exactly, `[^/]` not `.`, so that
    a user's file beside ours, or in a folder of ours, never matches)."""
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symbolic link; refusing to replace it (nothing was changed)")
    refuse_working_folder(folder)
    if expected is None:
        marker = folder / MARKER
        meta = None
        if marker.is_file() and not marker.is_symlink():
            try:
                meta = read_json(marker, "marker")
            except ValueError:
                meta = None
        if not isinstance(meta, dict) or meta.get("kind") != kind or not isinstance(meta.get("files"), list):
            raise ValueError(f"{folder} was not written by `ouroboros {kind}` (no {MARKER} of ours); "
                             "refusing to delete it: choose another folder (nothing was changed)")
        expected = {str(f) for f in meta["files"]} | {MARKER}
    foreign = sorted(f for f in files_in(folder) - expected if not any(re.fullmatch(p, f) for p in patterns))
    if foreign:
        raise ValueError(f"{folder} holds files we did not write ({', '.join(foreign[:3])}"
                         f"{' ...' if len(foreign) > 3 else ''}); refusing to delete it (nothing was changed)")


def remove_tree(folder: Path, kind: str | None, expected: set[str] | None = None, force: bool = False,
                patterns: tuple[str, ...] = ()) -> None:
    """Delete a folder of ours (see `check_removable`; `force` only for our own temporaries)."""
    if folder.is_symlink():
        if not force:
            raise ValueError(f"{folder} is a symbolic link; refusing to delete through it")
        folder.unlink()
        return
    if not force:
        check_removable(folder, kind, expected, patterns)
    shutil.rmtree(folder)


def replace_file(tmp: Path, final: Path) -> Path:
    """Rename the complete file `tmp` (a `temp_path` another program wrote, e.g. llama.cpp's converter) to `final`,
    never through a link; the folder is synced so the rename survives a crash."""
    refuse_link(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def replace_dir(tmp: Path, final: Path, kind: str | None, expected: set[str] | None = None) -> Path:
    """Rename the complete folder `tmp` to `final`. An existing `final` is moved aside first and
    deleted only after the rename, and only if it is ours (`check_removable`)."""
    refuse_link(final)
    old = None
    if final.exists():
        if any(final.iterdir()):
            check_removable(final, kind, expected)
            old = final.with_name(f".{final.name}.old.tmp{os.getpid()}")
            os.replace(final, old)
        else:
            final.rmdir()
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
