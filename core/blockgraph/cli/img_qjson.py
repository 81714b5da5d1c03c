"""JSON exactly as qemu-img prints it.

QEMU serialises QDicts, whose iteration order is that of a 512-bucket hash
table (the tdb hash), with entries inserted later coming first within a
bucket. Reproducing that order (rather than copying any field list) makes
``info --output=json`` byte-identical for any set of keys a driver reports.
Writer rules: four-space indent, ``"key": value``, ``{`` / ``[`` on the key's
line, empty containers as ``{\\n}``; the compact form separates items with
``", "`` (used for ``json:`` filenames).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

BUCKETS = 512


def tdb_hash(key: str) -> int:
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(d: Mapping[str, Any]) -> list[str]:
    """The keys of ``d`` (in insertion order) in the order QEMU's QDict iterates them."""
    buckets: dict[int, list[str]] = {}
    for key in d:
        buckets.setdefault(tdb_hash(key) % BUCKETS, []).insert(0, key)
    return [k for b in sorted(buckets) for k in buckets[b]]


def _quote(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _scalar(v: Any) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    return _quote(str(v))


def dumps(obj: Any, pretty: bool = True) -> str:
    """Serialise dicts (QDict order), lists and scalars the way QEMU's JSON writer does."""
    parts: list[str] = []

    def newline(depth: int, space: bool = False) -> None:
        if pretty:
            parts.append("\n" + " " * (depth * 4))
        elif space:
            parts.append(" ")

    def emit(v: Any, depth: int) -> None:
        if isinstance(v, Mapping):
            parts.append("{")
            for i, k in enumerate(qdict_order(v)):
                if i:
                    parts.append(",")
                newline(depth + 1, space=bool(i))
                parts.append(_quote(k) + ": ")
                emit(v[k], depth + 1)
            newline(depth)
            parts.append("}")
        elif isinstance(v, (list, tuple)):
            parts.append("[")
            for i, item in enumerate(v):
                if i:
                    parts.append(",")
                newline(depth + 1, space=bool(i))
                emit(item, depth + 1)
            newline(depth)
            parts.append("]")
        else:
            parts.append(_scalar(v))

    emit(obj, 0)
    return "".join(parts)


def dump_human(d: Mapping[str, Any], indent: int) -> list[str]:
    """QEMU's human rendering of a QDict: dashes become spaces, nested values indent by four."""
    return _human_items(((k.replace("-", " "), d[k]) for k in qdict_order(d)), indent)


def _human_items(items: Iterable[tuple[str, Any]], indent: int) -> list[str]:
    """One ``label: value`` line per item; dicts and lists nest below their label (lists as ``[i]``)."""
    lines: list[str] = []
    pad = " " * (indent * 4)
    for label, v in items:
        if isinstance(v, Mapping):
            lines.append(f"{pad}{label}:")
            lines.extend(dump_human(v, indent + 1))
        elif isinstance(v, (list, tuple)):
            lines.append(f"{pad}{label}:")
            lines.extend(_human_items(((f"[{i}]", x) for i, x in enumerate(v)), indent + 1))
        else:
            lines.append(f"{pad}{label}: {_human_scalar(v)}")
    return lines


def _human_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
