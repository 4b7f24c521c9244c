"""Settings declared once, as dataclass fields with metadata, and everything else derived.

    rank: int = setting(32, "rank r of the SVD LoRA bases", low=1, high=4096, structural=True)

From such fields come: validation (type, finite numbers, ranges, choices; a ValueError naming
the field), command-line flags (`add_flags`: `--rank`, help text with the range and default),
values from parsed flags (`from_flags`), the keys a sweep spec may vary, and which fields an
adapter fixes once weights exist (`structural`). Adding a field to `OuroborosConfig` or
`TrainConfig` touches that dataclass and nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

MISSING = dataclasses.MISSING


def setting(default: Any, help: str, *, low=None, high=None, above=None, choices=None, structural: bool = False,
            flag: str | None = None, cli: bool = True, sweep: bool = True):
    """A dataclass field with what the rest of the package derives from it.

    low/high: closed bounds; above: an open lower bound (value > above); choices: allowed values;
    structural: fixed by an adapter's weights (cannot be overridden on load);
    flag: the command-line name (default --field-name); cli/sweep: whether it is a flag / a sweep key.
    """
    meta = dict(help=help, low=low, high=high, above=above, choices=choices, structural=structural, flag=flag,
                cli=cli, sweep=sweep)
    return dataclasses.field(default=default, metadata=meta)


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


def _range_text(meta: dict) -> str:
    parts = []
    if meta.get("above") is not None:
        parts.append(f"> {meta['above']}")
    if meta.get("low") is not None and meta.get("high") is not None:
        return f"in [{meta['low']}, {meta['high']}]"
    if meta.get("low") is not None:
        parts.append(f">= {meta['low']}")
    if meta.get("high") is not None:
        parts.append(f"<= {meta['high']}")
    return " and ".join(parts)


def check_value(name: str, value, tp, meta: dict):
    """The value, validated (tuples normalised); ValueError naming `name` and the allowed range."""
    inner, nullable = _optional(tp)
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{name} must be set; got None")
    if typing.get_origin(inner) is tuple:
        items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"{name} must be a non-empty list of integers {_range_text(meta)}; got {value!r}")
        return tuple(check_value(name, v, typing.get_args(inner)[0], meta) for v in items)
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
    inner, _ = _optional(tp)
    if typing.get_origin(inner) is tuple:
        elem = typing.get_args(inner)[0]

        def parse_list(text: str):
            try:
                out = tuple(elem(x) for x in text.split(",") if x.strip())
            except ValueError:
                example = "1,4,8" if elem is int else "0.1,0.05"
                raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {example}; got {text!r}") from None
            return checked_arg(name, out, tp, meta)
        return parse_list

    def parse(text: str):
        try:
            value = inner(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if inner is int else 'a number'}; got {text!r}") from None
        return checked_arg(name, value, tp, meta)
    return parse


def add_flags(parser, cls, title: str | None = None, skip: tuple[str, ...] = (), defaults: dict | None = None):
    """One flag per field of `cls` (minus `skip` and fields with cli=False), help from the metadata.
    `defaults` overrides the dataclass defaults shown and used (e.g. None = keep the adapter's value)."""
    group = parser.add_argument_group(title) if title else parser
    for f, tp in fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        default = (defaults or {}).get(f.name, f.default)
        rng = _range_text(meta)
        help_text = meta.get("help", "") + (f" ({rng})" if rng and meta.get("choices") is None else "")
        kw = dict(dest=f.name, default=default, help=help_text)
        inner, _ = _optional(tp)
        if inner is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _parse_as(f.name, tp, meta)
            if meta.get("choices") is not None:
                kw["choices"] = meta["choices"]
                kw["type"] = str
            if typing.get_origin(inner) is tuple:
                kw["metavar"] = "PATH[,PATH...]" if typing.get_args(inner)[0] is str else "N[,N...]"
        group.add_argument(flag_name(f), **kw)
    return group


def from_flags(cls, args: argparse.Namespace, base=None, **extra):
    """An instance of `cls` from parsed flags. With `base`, a flag left at None keeps base's value."""
    values = to_dict(base) if base is not None else {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name) and (getattr(args, f.name) is not None or base is None):
            values[f.name] = getattr(args, f.name)
    values.update(extra)
    return from_dict(cls, values)
