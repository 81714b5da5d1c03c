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
    key when ``implied_key`` is given (``-blockdev qcow2,...``), in which case
    its value cannot contain ``,`` or ``=``. Error texts are QEMU's.
    """
    root: Tree = {}
    pos, n = 0, len(text)
    while pos < n:
        stop = pos
        while stop < n and text[stop] not in "=,":
            stop += 1
        if implied_key and stop > pos and (stop == n or text[stop] == ","):
            frags, value = [implied_key], text[pos:stop]
            pos = stop + 1
        else:
            key = text[pos:stop]
            frags = _key_fragments(key)
            if stop == n or text[stop] != "=":
                raise OptionError(f"Expected '=' after parameter '{key}'")
            pos, value = _keyval_value(text, stop + 1)
        _put(root, frags, value)
        implied_key = None
    return _listify(root, "")


_NAME_FRAG = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_INDEX_FRAG = re.compile(r"[0-9]+")


def _key_fragments(key: str) -> list[str]:
    """Split a keyval key into fragments: a QAPI name first, then names or decimal indexes."""
    frags = key.split(".")
    for i, frag in enumerate(frags):
        if not (_NAME_FRAG.fullmatch(frag) or (i and _INDEX_FRAG.fullmatch(frag))):
            raise OptionError(f"Invalid parameter '{key}'")
        if len(frag) > 127:
            what = "Parameter fragment" if len(frags) > 1 else "Parameter"
            raise OptionError(f"{what} '{frag}' is too long")
    return frags


def _keyval_value(text: str, pos: int) -> tuple[int, str]:
    """The value starting at ``pos`` up to a single comma (``,,`` is a literal comma)."""
    out: list[str] = []
    n = len(text)
    while pos < n:
        comma = text.find(",", pos)
        if comma < 0:
            out.append(text[pos:])
            return n, "".join(out)
        out.append(text[pos:comma])
        if comma + 1 < n and text[comma + 1] == ",":
            out.append(",")
            pos = comma + 2
            continue
        return comma + 1, "".join(out)
    return n, "".join(out)


def _put(root: Tree, frags: list[str], value: Any) -> None:
    """Store ``value`` at ``frags``; a later value wins, a scalar and an object at one path conflict."""
    cur = root
    for depth, frag in enumerate(frags[:-1]):
        nxt = cur.get(frag)
        if nxt is None:
            nxt = cur[frag] = {}
        elif not isinstance(nxt, dict):
            raise OptionError(f"Parameters '{'.'.join(frags[:depth + 1])}.*' used inconsistently")
        cur = nxt
    if isinstance(cur.get(frags[-1]), dict):
        raise OptionError(f"Parameters '{'.'.join(frags)}.*' used inconsistently")
    cur[frags[-1]] = value


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """Turn ``{"file.filename": x}`` into ``{"file": {"filename": x}}``, building lists from numbers."""
    root: Tree = {}
    for key, value in flat.items():
        _put(root, key.split("."), value)
    return _listify(root, "")


def _is_index(key: str) -> bool:
    return key.isascii() and key.isdigit()


def _listify(tree: Tree, prefix: str) -> Any:
    """Objects whose keys are all indexes become lists (QEMU's keyval_listify)."""
    has_index = has_member = False
    for k, v in tree.items():
        if _is_index(k):
            has_index = True
        else:
            has_member = True
        if isinstance(v, dict):
            tree[k] = _listify(v, f"{prefix}{k}.")
    if has_index and has_member:
        raise OptionError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return tree
    items = {int(k): v for k, v in tree.items()}
    for i in range(len(items)):
        if i not in items:
            raise OptionError(f"Parameter '{prefix}{i}' missing")
    return [items[i] for i in range(len(items))]


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
_SIZE_RE = re.compile(r"\s*\+?(?:0[xX]([0-9a-fA-F]+)|([0-9]+)(?:\.([0-9]*))?)([bBkKmMgGtTpPeE]?)\Z")
_SIZE_LIMIT = 1 << 63


def parse_size(value: Any, default_suffix: str = "") -> int:
    """QEMU's size syntax (qemu_strtosz): ``4096``, ``64k``, ``1.5G`` (binary units), ``0x1000``, or a JSON integer.

    A fraction needs a unit (``1.5`` is refused, ``1.0`` and ``5.`` are not) and is rounded to
    the nearest byte as QEMU does; hexadecimal takes no fraction. Sizes must stay below 2^63.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        if value >= _SIZE_LIMIT:
            raise ValueError(f"size {value} is too large")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size, got {value!r}")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"invalid size '{value}' (use a number with an optional k, M, G, T, P or E suffix)")
    hex_digits, digits, frac, suffix = m.groups()
    mult = _SUFFIXES[suffix.lower() or default_suffix.lower()]
    if hex_digits is not None:
        val, valf = int(hex_digits, 16), 0
    else:
        val = int(digits)
        # A 64-bit fixed-point fraction, as QEMU extracts it (an overflowing cast gives 0 there too).
        valf = int(float("0." + frac) * 2.0 ** 64) if frac else 0
        valf = 0 if valf >= 1 << 64 else valf
    if mult == 1:
        if valf:
            raise ValueError(f"invalid size '{value}': fractions need a unit suffix")
        result = val
    else:
        part = valf * mult
        result = val * mult + (part >> 64) + ((part >> 63) & 1)
    if result >= _SIZE_LIMIT:
        raise ValueError(f"size '{value}' is too large")
    return result


_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


def parse_bool(value: Any) -> bool:
    """``on``/``off`` (and QEMU's other spellings) or a JSON boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _TRUE:  # case-sensitive, as QEMU's qapi_bool_parse
            return True
        if value in _FALSE:
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

    convert_optional.inner = convert  # type: ignore[attr-defined]  # for qemu_value_error
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


def qemu_value_error(convert: Any, key: str, value: Any) -> str | None:
    """QemuOpts' text for a string value it refuses (sizes, booleans, numbers); None for other converters."""
    if not isinstance(value, str):
        return None
    convert = getattr(convert, "inner", convert)
    if convert is parse_size:
        if _SIZE_RE.match(value):
            return f"Value '{value}' is out of range for parameter '{key}'"
        return (f"Parameter '{key}' expects a non-negative number below 2^64\n"
                "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                "and exabytes, respectively.")
    if convert is parse_bool:
        return f"Parameter '{key}' expects 'on' or 'off'"
    if convert is parse_int:
        return f"Parameter '{key}' expects a number"
    return None


def structure(cls: type, values: Mapping[str, Any], *, node: str | None = None,
              driver: str | None = None, kind: str | None = None) -> Any:
    """Build an options object from a (nested) mapping, naming node, driver and key on any error.

    ``kind`` ("format", "protocol", "filter", "common"): ``cls`` holds node options, so an unknown key and a
    malformed size, boolean or number get QEMU's own texts (which name the option) instead.
    """
    fields = option_fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in flatten(values).items():
        field = fields.get(key)
        if field is None:
            parts = key.split(".")
            for i in range(len(parts) - 1, 0, -1):
                prefix = ".".join(parts[:i])
                if prefix in fields:  # an object or list given for a scalar option
                    raise OptionError(f"Invalid parameter type for '{prefix}', expected: scalar",
                                      node=node, driver=driver, option=prefix)
            if kind is not None and driver:  # bdrv_open_common's texts (sic: "doesn't" for protocols)
                text = (f"Block protocol '{driver}' doesn't support the option '{key}'" if kind == "protocol"
                        else f"Block format '{driver}' does not support the option '{key}'")
                raise OptionError(text, node=node, driver=driver, option=key, bare=True)
            raise OptionError(f"Invalid parameter '{key}'", node=node, driver=driver, option=key)
        if field.converter is not None:
            try:
                value = field.converter(value)
            except (TypeError, ValueError) as e:
                text = qemu_value_error(field.converter, key, value) if kind is not None else None
                raise OptionError(text or str(e), node=node, driver=driver, option=key,
                                  bare=text is not None) from None
        kwargs[field.name] = value
    for key, field in fields.items():
        if field.name not in kwargs and field.default is attrs.NOTHING:
            raise OptionError(f"Parameter '{key}' is required", node=node, driver=driver, option=key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        reason = str(e.args[0] if e.args else e)
        for key, field in fields.items():  # which option's validator refused it
            if field.validator is None or field.name not in kwargs:
                continue
            try:
                field.validator(None, field, kwargs[field.name])
            except (TypeError, ValueError):
                raise OptionError(reason.replace(f"'{field.name}'", f"'{key}'"), node=node, driver=driver,
                                  option=key) from None
        raise OptionError(reason, node=node, driver=driver) from None


def describe(cls: type) -> Iterable[tuple[str, str, Any]]:
    """(key, help, default) for each option, for ``--help`` style listings."""
    for key, f in option_fields(cls).items():
        yield key, f.metadata.get("help", ""), None if f.default is attrs.NOTHING else f.default
