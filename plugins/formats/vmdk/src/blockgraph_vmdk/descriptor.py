"""The VMDK text descriptor: parsing it, rendering it as qemu-img does, and changing its CID."""

from __future__ import annotations

import re

import attrs
from blockgraph.errors import OpenError

# Types QEMU opens from a separate descriptor file; monolithicSparse and streamOptimized are single files.
DESCRIPTOR_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse",
                    "twoGbMaxExtentFlat")
ACCESS = ("RW", "RDONLY", "NOACCESS")
FLAT_TYPES = ("FLAT", "VMFS")
SPARSE_TYPES = ("SPARSE", "VMFSSPARSE")
KNOWN_TYPES = FLAT_TYPES + SPARSE_TYPES + ("SESPARSE", "ZERO")

_EXTENT = re.compile(r'^\s*(\S+)\s+(-?\d+)\s+(\S+)(?:\s+"([^"\r\n]*)")?(?:\s+(-?\d+))?\s*$')
_KEYVAL = re.compile(r'^\s*([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(?:"([^"]*)"|(\S*))\s*$')
_CID_LINE = re.compile(r"^(\s*CID\s*=\s*)([0-9A-Fa-f]+)", re.MULTILINE)

TEMPLATE = (
    "# Disk DescriptorFile\n"
    "version=1\n"
    "CID={cid:x}\n"
    "parentCID={parent_cid:x}\n"
    'createType="{create_type}"\n'
    "{parent_line}"
    "\n"
    "# Extent description\n"
    "{extents}"
    "\n"
    "# The Disk Data Base\n"
    "#DDB\n"
    "\n"
    'ddb.virtualHWVersion = "{hwversion}"\n'
    'ddb.geometry.cylinders = "{cylinders}"\n'
    'ddb.geometry.heads = "{heads}"\n'
    'ddb.geometry.sectors = "63"\n'
    'ddb.adapterType = "{adapter_type}"\n'
    'ddb.toolsVersion = "{toolsversion}"\n'
)


@attrs.frozen
class ExtentLine:
    access: str
    sectors: int
    type: str
    filename: str | None
    offset: int  # sectors into the file (FLAT)
    line: str


@attrs.define
class Descriptor:
    text: str
    fields: dict[str, str]
    extents: list[ExtentLine]

    @property
    def create_type(self) -> str | None:
        return self.fields.get("createType")

    @property
    def parent_hint(self) -> str | None:
        return self.fields.get("parentFileNameHint") or None

    def cid(self, key: str = "CID") -> int:
        """The CID (or parentCID) as QEMU reads it: hexadecimal, required."""
        raw = self.fields.get(key)
        if raw is None:
            raise OpenError(f"invalid VMDK image descriptor: no {key}")
        try:
            value = int(raw, 16)
        except ValueError:
            raise OpenError(f"invalid VMDK image descriptor: {key} '{raw}' is not hexadecimal") from None
        if not 0 <= value <= 0xFFFFFFFF:
            raise OpenError(f"invalid VMDK image descriptor: {key} '{raw}' is out of range")
        return value


def decode(raw: bytes | bytearray) -> str:
    """Descriptor bytes up to the first NUL; bytes that are not UTF-8 survive a round trip (:func:`encode`)."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    return bytes(raw).decode("utf-8", errors="surrogateescape")


def encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def parse(text: str) -> Descriptor:
    """Fields (first occurrence wins) and extent lines; a malformed extent line is refused."""
    fields: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for raw_line in text.split("\n"):
        line = raw_line.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        first = stripped.split(None, 1)[0]
        if first in ACCESS:
            extents.append(_extent(line))
            continue
        m = _KEYVAL.match(line)
        if m:
            fields.setdefault(m.group(1), m.group(2) if m.group(2) is not None else m.group(3))
    return Descriptor(text, fields, extents)


def _extent(line: str) -> ExtentLine:
    m = _EXTENT.match(line)
    if not m:
        raise OpenError(f"Invalid extent line: {line}")
    access, sectors, kind, filename, offset = m.groups()
    if kind == "FLAT":
        if filename is None or offset is None or int(offset) < 0:
            raise OpenError(f"Invalid extent line: {line}")
    elif offset is not None:
        raise OpenError(f"Invalid extent line: {line}")
    if kind != "ZERO" and filename is None:
        raise OpenError(f"Invalid extent line: {line}")
    if int(sectors) <= 0:
        raise OpenError(f"Invalid extent line: {line}")
    return ExtentLine(access, int(sectors), kind, filename, int(offset or 0), line)


def with_cid(text: str, cid: int) -> str:
    """``text`` with the value of its CID line replaced (everything else byte-identical)."""
    new, n = _CID_LINE.subn(lambda m: f"{m.group(1)}{cid:x}", text, count=1)
    if not n:
        raise OpenError("invalid VMDK image descriptor: no CID")
    return new


def render(*, cid: int, parent_cid: int, create_type: str, parent_hint: str | None, extents: list[str],
           hwversion: str, size: int, adapter_type: str, toolsversion: str) -> str:
    """The descriptor qemu-img create writes (geometry from 63 sectors and 16 or 255 heads)."""
    heads = 16 if adapter_type == "ide" else 255
    return TEMPLATE.format(
        cid=cid, parent_cid=parent_cid, create_type=create_type,
        parent_line=f'parentFileNameHint="{parent_hint}"' if parent_hint else "",
        extents="".join(extents), hwversion=hwversion, cylinders=size // (63 * heads * 512), heads=heads,
        adapter_type=adapter_type, toolsversion=toolsversion)
