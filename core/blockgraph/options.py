"""Option syntaxes (QEMU keyval, JSON, ``json:`` filenames) and typed driver options.

Every syntax ends in one nested dict. Scalars from keyval are strings; the
converters below accept both strings and JSON-typed values, so one attrs
class per driver validates all three syntaxes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from .errors import OptionError

Tree = dict[str, Any]

# ---------------------------------------------------------------- keyval


def split_keyval(text: str) -> list[str]:
    """Split ``a=1,b=x,,y`` at single commas; ``,,`` is a literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ",":
            if i + 1 < n and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()  # a trailing comma is allowed
    return parts


def parse_keyval(text: str, implied_key: str | None = None) -> Tree:
    """Parse QEMU's keyval syntax into a nested dict (util/keyval.c).

    Dotted keys nest; numeric fragments build lists that must count from 0
    without gaps; a later duplicate key wins; the first element may omit its
    key when ``implied_key`` is given (``-blockdev qcow2,...``).
    """
    flat: dict[str, str] = {}
    for i, part in enumerate(split_keyval(text)):
        if part == "" and i == 0 and not text:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            if i == 0 and implied_key:
                key, value = implied_key, part
            else:
                raise OptionError(f"Expected '=' after parameter '{part}'")
        if not key:
            raise OptionError(f"Invalid parameter '' in '{part}'")
        for frag in key.split("."):
            if not frag or len(frag) > 127:
                raise OptionError(f"Invalid parameter '{key}'")
        flat[key] = value
    return unflatten(flat)


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """Turn ``{"file.filename": x}`` into ``{"file": {"filename": x}}``, building lists from numbers."""
    root: Tree = {}
    for key, value in flat.items():
        frags = key.split(".")
        cur = root
        for depth, frag in enumerate(frags[:-1]):
            nxt = cur.setdefault(frag, {})
            if not isinstance(nxt, dict):
                raise OptionError(f"Parameter '{'.'.join(frags[:depth + 1])}' used inconsistently")
            cur = nxt
        last = frags[-1]
        if isinstance(cur.get(last), dict):
            raise OptionError(f"Parameter '{key}' used inconsistently")
        cur[last] = value
    return _lists(root, "")


def _lists(tree: Tree, prefix: str) -> Any:
    for k, v in tree.items():
        if isinstance(v, dict):
            tree[k] = _lists(v, f"{prefix}{k}.")
    keys = list(tree)
    if keys and all(k.isdigit() for k in keys):
        for i in range(len(keys)):
            if str(i) not in tree:
                raise OptionError(f"Parameter '{prefix}{i}' missing")
        return [tree[str(i)] for i in range(len(keys))]
    if any(k.isdigit() for k in keys):
        raise OptionError(f"Parameter '{prefix.rstrip('.')}' used inconsistently")
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`unflatten` (lists become ``name.0``, ``name.1``)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = v
    return out


def merge(base: Tree, extra: Mapping[str, Any]) -> Tree:
    """Merge ``extra`` into a copy of ``base``; keys of ``extra`` win."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_json(text: str, what: str = "JSON") -> Tree:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionError(f"Invalid {what} at column {e.colno}: {e.msg}") from None
    if not isinstance(value, dict):
        raise OptionError(f"{what} must be an object, not {type(value).__name__}")
    # Flattened keys inside JSON ("file.filename") are accepted as QEMU does.
    return unflatten(flatten(value))


def parse_blockdev(text: str) -> Tree:
    """A ``--blockdev`` argument: JSON when it starts with ``{``, keyval otherwise."""
    if text.lstrip().startswith("{"):
        return parse_json(text, "--blockdev JSON")
    return parse_keyval(text, implied_key="driver")


# ---------------------------------------------------------------- scalars

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]?)\s*$")


def parse_size(value: Any, default_suffix: str = "") -> int:
    """QEMU's size syntax: ``4096``, ``64k``, ``1.5G`` (binary units), or a JSON integer."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size, got {value!r}")
    m = _SIZE_RE.match(value)
    suffix = (m.group(2) if m else "").lower() or default_suffix.lower()
    if not m or suffix not in _SUFFIXES:
        raise ValueError(f"invalid size '{value}' (use a number with an optional k, M, G, T, P or E suffix)")
    num = m.group(1)
    mult = _SUFFIXES[suffix]
    if "." in num:
        if mult == 1:
            raise ValueError(f"invalid size '{value}': fractions need a unit suffix")
        result = int(float(num) * mult)
    else:
        result = int(num) * mult
    if result >= 1 << 63:
        raise ValueError(f"size '{value}' is too large")
    return result


_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


def parse_bool(value: Any) -> bool:
    """``on``/``off`` (and QEMU's other spellings) or a JSON boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise ValueError(f"expected 'on' or 'off', got {value!r}")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {value!r}")


def parse_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Converter that lets ``None`` (an unset option) through."""

    def convert_optional(value: Any) -> Any:
        return None if value is None else convert(value)

    return convert_optional


def one_of(*choices: str) -> Callable[[Any], str]:
    """Converter for an enum option; the error lists the valid values."""

    def convert(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")

    convert.__name__ = f"one_of({', '.join(choices)})"
    return convert


# ---------------------------------------------------------------- attrs glue


def opt(default: Any = attrs.NOTHING, *, key: str | None = None, help: str = "",
        converter: Callable[[Any], Any] | None = None, validator: Any = None,
        mutable: bool = False, strong: bool = False) -> Any:
    """Declare one driver option. ``key`` is QEMU's spelling when it differs from the field name."""
    return attrs.field(default=default, converter=converter, validator=validator,
                       metadata={"key": key, "help": help, "mutable": mutable, "strong": strong})


def option_key(field: attrs.Attribute) -> str:
    return field.metadata.get("key") or field.name


def option_fields(cls: type) -> dict[str, attrs.Attribute]:
    """The options of ``cls`` by their user-facing key."""
    return {option_key(f): f for f in attrs.fields(cls)}


def structure(cls: type, values: Mapping[str, Any], *, node: str | None = None,
              driver: str | None = None) -> Any:
    """Build an options object from a (nested) mapping, naming node, driver and key on any error."""
    fields = option_fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in flatten(values).items():
        field = fields.get(key)
        if field is None:
            raise OptionError(f"Invalid parameter '{key}'", node=node, driver=driver, option=key)
        if field.converter is not None:
            try:
                value = field.converter(value)
            except (TypeError, ValueError) as e:
                raise OptionError(str(e), node=node, driver=driver, option=key) from None
        kwargs[field.name] = value
    for key, field in fields.items():
        if field.name not in kwargs and field.default is attrs.NOTHING:
            raise OptionError(f"Parameter '{key}' is required", node=node, driver=driver, option=key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        name = e.args[1].name if len(e.args) > 1 and isinstance(e.args[1], attrs.Attribute) else None
        key = option_key(e.args[1]) if name else None
        raise OptionError(str(e.args[0] if e.args else e), node=node, driver=driver, option=key) from None


def describe(cls: type) -> Iterable[tuple[str, str, Any]]:
    """(key, help, default) for each option, for ``--help`` style listings."""
    for key, f in option_fields(cls).items():
        yield key, f.metadata.get("help", ""), None if f.default is attrs.NOTHING else f.default
