"""Settings declared once, as dataclass fields with metadata, and everything else derived.

    rank: int = setting(32, "rank r of the SVD LoRA bases", low=1, high=4096, structural=True)

From such fields come: validation (type, finite numbers, ranges, choices; a ValueError naming
the field), command-line flags (`add_flags`: `--rank`, help text with the range and default),
values from parsed flags (`from_flags`), the keys a sweep spec may vary, and which fields an
adapter fixes once weights exist (`structural`). Adding a field to `OuroborosConfig` or
`TrainConfig` touches that dataclass and nothing else.

Every flag of every `ouroboros` command comes from such a field: a field without a default
(`setting(REQUIRED, ...)`) is a required flag, or a positional argument (`positional=True`); a
list of strings takes several values (`--data a.txt b.txt`), a list of numbers one comma-separated
value (`--depths 1,4,8`); booleans sharing an `exclusive` name are mutually exclusive switches.
`add_flags(..., prefix="train")` makes override flags (`--train.steps`) that leave a value only
when given, for settings read from a config file first (`overrides`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

MISSING = dataclasses.MISSING
REQUIRED = dataclasses.MISSING  # setting(REQUIRED, ...): no default; a required flag (declare such fields first)


def setting(default: Any, help: str, *, low=None, high=None, above=None, choices=None, structural: bool = False,
            flag: str | None = None, cli: bool = True, sweep: bool = True, positional: bool = False,
            exclusive: str | None = None, words: tuple[str, ...] = (), metavar: str | None = None):
    """A dataclass field with what the rest of the package derives from it.

    low/high: closed bounds; above: an open lower bound (value > above); choices: allowed values;
    structural: fixed by an adapter's weights (cannot be overridden on load);
    flag: the command-line name (default --field-name); cli/sweep: whether it is a flag / a sweep key;
    positional: a positional argument instead of a flag; exclusive: booleans with the same name are
    mutually exclusive switches; words: values accepted besides the type (e.g. ("auto",) for a depth).
    """
    meta = dict(help=help, low=low, high=high, above=above, choices=choices, structural=structural, flag=flag,
                cli=cli, sweep=sweep, positional=positional, exclusive=exclusive, words=tuple(words), metavar=metavar)
    return dataclasses.field(default=default, metadata=meta)


def same_as(cls, name: str):
    """Another dataclass's field as it is declared there (default, help, range): one declaration, two users."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every setting of a dataclass (instance or class)."""
    hints = typing.get_type_hints(cls if isinstance(cls, type) else type(cls))
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _optional(tp) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _number(v) -> str:
    """A bound as written in the source: 2**63 - 1 rather than 9223372036854775807."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 2**20:
        for k in range(20, 128):
            if v in (2**k, 2**k - 1):
                return f"2**{k}" if v == 2**k else f"2**{k} - 1"
    return str(v)


def _range_text(meta: dict) -> str:
    parts = []
    lo, hi = meta.get("low"), meta.get("high")
    if meta.get("above") is not None:
        parts.append(f"> {_number(meta['above'])}")
    if lo is not None and hi is not None:
        return f"in [{_number(lo)}, {_number(hi)}]"
    if lo is not None:
        parts.append(f">= {_number(lo)}")
    if hi is not None:
        parts.append(f"<= {_number(hi)}")
    return " and ".join(parts)


def check_value(name: str, value, tp, meta: dict):
    """The value, validated (tuples normalised); ValueError naming `name` and the allowed range."""
    inner, nullable = _optional(tp)
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{name} must be set; got None")
    if isinstance(value, str) and value in meta.get("words", ()):
        return value
    if typing.get_origin(inner) is tuple:
        elem = typing.get_args(inner)[0]
        items = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) and elem is not str else value
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)) or not items:
            what = {int: "integers", float: "numbers", str: "strings"}.get(elem, "values")
            raise ValueError(f"{name} must be a non-empty list of {what} {_range_text(meta)}; got {value!r}"
                             .replace("  ", " ").replace(" ;", ";"))
        return tuple(check_value(name, v, elem, meta) for v in items)
    if inner is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false; got {value!r}")
        return value
    if inner is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} must be an integer {_range_text(meta)}; got {value!r}".replace("  ", " "))
    if inner is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number {_range_text(meta)}; got {value!r}".replace("  ", " "))
        value = float(value)
    if inner is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string; got {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    lo, hi, above = meta.get("low"), meta.get("high"), meta.get("above")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (above is not None and not value > above):
        raise ValueError(f"{name} must be {_range_text(meta)}; got {value!r}")
    return value


def validate_fields(obj) -> None:
    """Check (and normalise) every field of a settings dataclass against its metadata."""
    for f, tp in fields(obj):
        setattr(obj, f.name, check_value(f.name, getattr(obj, f.name), tp, f.metadata))


def from_dict(cls, d: dict, what: str | None = None):
    """cls(**d), refusing unknown keys with their names (a typo is an error, not a default)."""
    if not isinstance(d, dict):
        raise ValueError(f"{what or cls.__name__} must be a mapping of settings; got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what or cls.__name__} setting(s): {', '.join(map(str, unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**d)


def to_dict(obj) -> dict:
    return {f.name: list(v) if isinstance(v := getattr(obj, f.name), tuple) else v for f in dataclasses.fields(obj)}


def structural_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f, _ in fields(cls) if f.metadata.get("structural"))


def sweep_keys(*classes) -> set[str]:
    return {f.name for cls in classes for f, _ in fields(cls) if f.metadata.get("sweep", True)}


# ---------------------------------------------------------------------- command line
def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def checked_arg(name: str, value, tp, meta: dict):
    """check_value for argparse: a bad value is a usage error naming the field."""
    try:
        return check_value(name, value, tp, meta)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_as(name: str, tp, meta: dict):
    """argparse type of one field: its value type (a list of numbers comma-separated), checked."""
    inner, _ = _optional(tp)
    words = meta.get("words", ())
    if typing.get_origin(inner) is tuple:
        elem = typing.get_args(inner)[0]

        def parse_list(text: str):
            if text.strip() and any(not x.strip() for x in text.split(",")):  # 1,,2 is not 1,2: a value is missing
                raise argparse.ArgumentTypeError(f"an empty value between commas in {text!r}")
            try:
                out = tuple(elem(x) for x in text.split(",") if x.strip())
            except ValueError:
                noun, example = ("integers", "1,4,8") if elem is int else ("numbers", "0.1,0.05")
                raise argparse.ArgumentTypeError(f"expected comma-separated {noun} like {example}; got {text!r}") from None
            return checked_arg(name, out, tp, meta)
        return parse_list

    def parse(text: str):
        if text in words:
            return text
        try:
            value = inner(text)
        except ValueError:
            noun = "an integer" if inner is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}{''.join(f' or {w}' for w in words)}; got {text!r}") from None
        return checked_arg(name, value, tp, meta)
    return parse


def _flag_kwargs(f: dataclasses.Field, tp) -> dict:
    """add_argument's keywords for a field: its type or action, choices, how many values."""
    meta, (inner, _) = f.metadata, _optional(tp)
    if inner is bool:
        return {"action": "store_true" if meta.get("exclusive") else argparse.BooleanOptionalAction}
    kw = {"type": _parse_as(f.name, tp, meta), "metavar": meta.get("metavar")}
    if meta.get("choices") is not None:
        kw.update(choices=meta["choices"], type=str, metavar=None)
    if typing.get_origin(inner) is tuple:
        if typing.get_args(inner)[0] is str:  # several values (paths may hold commas)
            kw.update(nargs="+", type=str, metavar=meta.get("metavar") or "PATH")
        else:
            kw["metavar"] = meta.get("metavar") or "N[,N...]"
    return kw


def parse_bool(text: str) -> bool:
    """argparse type of a boolean given as a value (an override flag: --model.gate false)."""
    if text.lower() in ("true", "yes", "1", "false", "no", "0"):
        return text.lower() in ("true", "yes", "1")
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _override_flag(f: dataclasses.Field, tp, prefix: str, kw: dict, shown) -> tuple:
    """(flag name, keywords) of an override flag: `--PREFIX.field` taking a value (a boolean too), or
    the field's own flag without a prefix (""); no default of its own, the config file's shown."""
    shown = ",".join(map(str, shown)) if isinstance(shown, (tuple, list)) else shown
    said = "(default:" in kw["help"]  # the help says what an unset value means
    kw = {**kw, "default": argparse.SUPPRESS, "help": kw["help"] + ("" if said else f" (default: {shown})")}
    if not prefix:
        return flag_name(f), {**kw, "dest": f.name}
    if _optional(tp)[0] is bool:
        kw.update(action="store", type=parse_bool, metavar="{true,false}")
    kw.setdefault("metavar", None)
    if kw.get("metavar") is None and "choices" not in kw:
        kw["metavar"] = f.name.upper()
    return f"--{prefix}.{f.name.replace('_', '-')}", {**kw, "dest": f"{prefix}.{f.name}"}


def add_flags(parser, cls, title: str | None = None, skip: tuple[str, ...] = (), defaults: dict | None = None,
              prefix: str | None = None):
    """One flag per field of `cls` (minus `skip` and fields with cli=False), help from the metadata.

    prefix: override flags `--PREFIX.field-name` (dest "PREFIX.field_name") for settings read from
    a config file first: a flag not given leaves no value (`overrides`), and the help shows
    `defaults` (the file's values) as the default."""
    group = parser.add_argument_group(title) if title else parser
    exclusive: dict[str, Any] = {}
    for f, tp in fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        rng = _range_text(meta)
        help_text = meta.get("help", "") + (f" ({rng})" if rng and meta.get("choices") is None else "")
        kw = dict(_flag_kwargs(f, tp), help=help_text)
        if prefix is not None:
            flag, kw = _override_flag(f, tp, prefix, kw, (defaults or {}).get(f.name, f.default))
            group.add_argument(flag, **kw)
            continue
        if meta.get("positional"):
            metavar = kw.get("metavar") or (None if "choices" in kw else f.name.upper())
            group.add_argument(f.name, **{**kw, "metavar": metavar})
            continue
        default = (defaults or {}).get(f.name, f.default)
        if default is MISSING:
            kw.update(required=True, default=argparse.SUPPRESS)
        else:
            kw["default"] = default
            if isinstance(default, tuple):  # as it is typed (1,4,8), not as Python prints it
                kw["help"] += f" (default: {','.join(map(str, default))})"
        if meta.get("exclusive") and meta["exclusive"] not in exclusive:
            exclusive[meta["exclusive"]] = group.add_mutually_exclusive_group()
        where = exclusive[meta["exclusive"]] if meta.get("exclusive") else group
        where.add_argument(flag_name(f), dest=f.name, **kw)
    return group


def _normalised(value):
    return tuple(value) if isinstance(value, list) else value


def from_flags(cls, args: argparse.Namespace, base=None, **extra):
    """An instance of `cls` from parsed flags. With `base`, a flag left at None keeps base's value."""
    values = to_dict(base) if base is not None else {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name) and (getattr(args, f.name) is not None or base is None):
            values[f.name] = _normalised(getattr(args, f.name))
    values.update(extra)
    return from_dict(cls, values)


def overrides(cls, args: argparse.Namespace, prefix: str) -> dict:
    """The fields of `cls` given as override flags (`add_flags(..., prefix=...)`), by field name."""
    given = vars(args)
    dest = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    return {f.name: _normalised(given[dest(f.name)]) for f in dataclasses.fields(cls) if dest(f.name) in given}
