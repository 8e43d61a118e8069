"""TOML values checked against dataclass annotations, and written back: the machinery under fastcifar.recipe.

check_value(value, annotation, key) accepts what a field's type admits (bool, int within 64 bits, finite float,
str, Literal choices, fixed-length and variable-length tuples, unions, nested dataclasses) and raises RecipeError
naming the dotted key otherwise; build(cls, table, prefix) builds a dataclass from a table, refusing unknown keys;
toml_value(v) writes a value back as TOML, escaping what TOML requires, and table_to_toml a two-level table;
apply_overrides applies `--set section.key=value` strings to a raw table (types checked later, by build);
setting / section attach each field's meaning, which key_reference lists with its type and default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from typing import Any, Literal

from fastcifar.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

INT_MAX = 2**63 - 1  # every integer key: torch and numpy take at most 64-bit integers
MEANING = "meaning"  # the field metadata key_reference prints: a key's meaning lives beside its field


def setting(default: Any, meaning: str) -> Any:
    """A key of a recipe section: its default and what it means (key_reference prints both)."""
    return dataclasses.field(default=default, metadata={MEANING: meaning})


def section(cls: type) -> Any:
    """A section ([name] in TOML) of a recipe: its meaning is the class docstring."""
    return dataclasses.field(default_factory=cls, metadata={MEANING: " ".join((cls.__doc__ or "").split())})


def show_key(name: str) -> str:
    """A key as typed if it is a plain name, else quoted (keeps a newline in a key from breaking the line)."""
    return name if re.fullmatch(r"[\w.+\-\[\]]+", name) else repr(name)


def short(value: Any, limit: int = 60) -> str:
    """repr of a value for an error line: a 10 MB string is shown by its start, never whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise RecipeError(f"{key}: {msg}")


def _describe(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    return getattr(tp, "__name__", str(tp))


def type_text(tp: Any) -> str:
    """A field's type as a recipe author writes its values: `"sgd" | "adam"`, `[float, float]`, `list of ...`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(toml_value(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is tuple and args[1:] == (Ellipsis,):
        return f"list of ({type_text(args[0])})"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, key: str) -> Any:
    """Check `value` (parsed TOML) against annotation `tp`; return it in the field's Python type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        check(value in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {short(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return check_value(value, option, key)
            except RecipeError:
                pass
        raise RecipeError(f"{key}: expected {' or '.join(map(_describe, typing.get_args(tp)))}, got {short(value)}")
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # a list of any length
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {short(value)}")
        return tuple(check_value(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        check(isinstance(value, (list, tuple)) and len(value) == len(args), key,
               f"expected a list of {len(args)} numbers, got {short(value)}")
        return tuple(check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {short(value)}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {short(value)}")
        check(-INT_MAX <= value <= INT_MAX, key, f"must fit in 64 bits, got {short(value)}")
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(ok, key, f"expected a number, got {short(value)}")
        check(math.isfinite(value), key, f"must be finite, got {short(value)}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {short(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a table [{key}], got {short(value)}")
        return build(tp, value, key)
    raise RecipeError(f"{key}: unsupported field type {tp}")  # a programming error, but keep it one line


def build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in table.items():
        key = f"{prefix}.{show_key(k)}" if prefix else show_key(k)
        if k not in names:
            near = difflib.get_close_matches(str(k), sorted(names), n=1)
            hint = f"did you mean {prefix + '.' if prefix else ''}{near[0]}? " if near else ""
            raise RecipeError(f"{key}: unknown key ({hint}known keys: {', '.join(sorted(names))})")
        kwargs[k] = check_value(v, hints[k], key)
    return cls(**kwargs)


def _toml_char(c: str) -> str:
    """A character inside a TOML basic string: quote, backslash and control characters escaped (a raw newline
    in a value would make the saved recipe unreadable, and with it the printed resume command)."""
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_toml_char(c) for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def table_to_toml(table: dict[str, Any]) -> str:
    """A two-level table (top-level keys, then [sections]) as TOML, every key explicit."""
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for name, section in ((k, v) for k, v in table.items() if isinstance(v, dict)):
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in section.items())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- --set overrides


def _parse_override_value(text: str) -> Any:
    """`--set optim.lr=0.1` -> 0.1; values are TOML literals, bare words fall back to strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:  # [[[[...]]]] nested thousands deep
        raise RecipeError(f"--set {short(text)}: nested too deeply") from None


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a raw recipe table (a deep copy); types are checked when built."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in table.items()}
    for item in overrides:
        path, sep, text = item.partition("=")
        path = path.strip()
        if not sep or not path:
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        parts = path.split(".")
        if len(parts) == 1:
            out[parts[0]] = _parse_override_value(text.strip())
            continue
        if len(parts) != 2:
            raise RecipeError(f"{show_key(path)}: expected section.key (two levels), got {len(parts)} levels")
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise RecipeError(f"{show_key(parts[0])}: is not a section")
        section[parts[1]] = _parse_override_value(text.strip())
    return out


# ---------------------------------------------------------------------------------------------- the reference


def key_reference(cls: type) -> list[dict[str, str]]:
    """Every key of a two-level recipe class in field order, {"key", "type", "default", "meaning"} (type
    "section" for a [table]): generated from the dataclasses, so `fastcifar recipes keys` cannot go stale."""
    rows: list[dict[str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not dataclasses.is_dataclass(hints[f.name]):
            rows.append(_key_row(f.name, f, hints[f.name]))
            continue
        rows.append({"key": f"[{f.name}]", "type": "section", "default": "", "meaning": f.metadata.get(MEANING, "")})
        inner = typing.get_type_hints(hints[f.name])
        rows += [_key_row(f"{f.name}.{g.name}", g, inner[g.name]) for g in dataclasses.fields(hints[f.name])]
    return rows


def _key_row(key: str, f: dataclasses.Field, tp: Any) -> dict[str, str]:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return {"key": key, "type": type_text(tp), "default": toml_value(default), "meaning": f.metadata.get(MEANING, "")}
