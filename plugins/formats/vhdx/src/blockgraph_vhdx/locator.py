"""The parent locator of a differencing VHDX: key/value pairs naming the parent image (§2.6.2.6 of the spec)."""

from __future__ import annotations

import struct
import uuid

from blockgraph.errors import ImageCorrupt, NotSupported

from .structs import PARENT_TYPE_VHDX_GUID

_HEADER = struct.Struct("<16sHH")
_ENTRY = struct.Struct("<IIHH")
# Where to look for the parent, in the order the spec recommends trying them.
PATH_KEYS = ("relative_path", "volume_path", "absolute_win32_path")


def parse_locator(raw: bytes, filename: str) -> dict[str, str]:
    def corrupt(what: str) -> ImageCorrupt:
        return ImageCorrupt(f"VHDX image '{filename}': parent locator: {what}")

    if len(raw) < _HEADER.size:
        raise corrupt("too short")
    kind, _, count = _HEADER.unpack_from(raw)
    if uuid.UUID(bytes_le=kind) != PARENT_TYPE_VHDX_GUID:
        raise NotSupported(f"VHDX image '{filename}': parent locator of unknown type {uuid.UUID(bytes_le=kind)}")
    if _HEADER.size + count * _ENTRY.size > len(raw):
        raise corrupt(f"{count} entries do not fit")
    out: dict[str, str] = {}
    for i in range(count):
        koff, voff, klen, vlen = _ENTRY.unpack_from(raw, _HEADER.size + i * _ENTRY.size)
        if koff + klen > len(raw) or voff + vlen > len(raw) or klen % 2 or vlen % 2:
            raise corrupt(f"entry {i} points outside the locator")
        try:
            key = raw[koff:koff + klen].decode("utf-16-le")
            out[key] = raw[voff:voff + vlen].decode("utf-16-le")
        except UnicodeDecodeError:
            raise corrupt(f"entry {i} is not UTF-16") from None
    if "parent_linkage" not in out:
        raise corrupt("no parent_linkage")
    return out


def parent_path(locator: dict[str, str]) -> str | None:
    """The parent's file name as this host sees it: the relative path, with Windows separators turned around."""
    for key in PATH_KEYS:
        value = locator.get(key)
        if not value:
            continue
        if key == "relative_path":
            path = value.replace("\\", "/")
            return path[2:] if path.startswith("./") else path
        if key == "absolute_win32_path" and len(value) > 2 and value[1] == ":":
            continue  # a drive letter means nothing on this host
        return value.replace("\\", "/")
    return None


def pack_locator(entries: dict[str, str]) -> bytes:
    keys = [(k.encode("utf-16-le"), v.encode("utf-16-le")) for k, v in entries.items()]
    pos = _HEADER.size + len(keys) * _ENTRY.size
    table, blob = bytearray(), bytearray()
    for k, v in keys:
        table += _ENTRY.pack(pos + len(blob), pos + len(blob) + len(k), len(k), len(v))
        blob += k + v
    return _HEADER.pack(PARENT_TYPE_VHDX_GUID.bytes_le, 0, len(keys)) + bytes(table) + bytes(blob)
