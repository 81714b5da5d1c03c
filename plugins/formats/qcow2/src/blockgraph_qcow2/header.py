"""The qcow2 header and its extensions: parse, validate, serialise (docs/interop/qcow2.txt "Header").

``Header.parse(first_cluster_bytes)`` validates everything that does not need the image size;
``Header.pack()`` returns the bytes of header + extensions + backing name for cluster 0, preserving
unknown header fields (bytes past the known ones, up to ``header_length``) and unknown extensions.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs
from blockgraph.errors import OpenError

from .constants import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    EXTL2_MIN_CLUSTER,
    FEATURE_NAMES,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    INCOMPAT_KNOWN,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_REFCOUNT_ORDER,
    MIN_CLUSTER_BITS,
    V2_HEADER_LEN,
    V3_HEADER_LEN,
)

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # magic .. snapshots_offset (72 bytes)
_V3 = struct.Struct(">QQQII")  # incompat, compat, autoclear, refcount_order, header_length (32 bytes)


@attrs.define
class Extension:
    """One header extension as stored: ``type`` and raw ``data`` (unknown ones are kept verbatim)."""

    type: int
    data: bytes


@attrs.define
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 112
    compression_type: int = 0
    extra_fields: bytes = b""  # header bytes past byte 112 that we do not know, kept for rewrites
    extensions: list[Extension] = attrs.Factory(list)  # in file order, known ones included
    backing_file: str | None = None

    # ------------------------------------------------------------ derived values

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    def ext(self, type_: int) -> Extension | None:
        for e in self.extensions:
            if e.type == type_:
                return e
        return None

    def set_ext(self, type_: int, data: bytes | None) -> None:
        """Replace (or add, or with None remove) one extension, keeping the others' order."""
        for i, e in enumerate(self.extensions):
            if e.type == type_:
                if data is None:
                    del self.extensions[i]
                else:
                    e.data = data
                return
        if data is not None:
            self.extensions.append(Extension(type_, data))

    @property
    def backing_format(self) -> str | None:
        e = self.ext(EXT_BACKING_FORMAT)
        return e.data.decode("utf-8", "replace") if e else None

    @property
    def data_file(self) -> str | None:
        e = self.ext(EXT_DATA_FILE)
        return e.data.decode("utf-8", "replace") if e else None

    def feature_name(self, kind: int, bit: int) -> str | None:
        """The feature table's name for ``bit`` of ``kind`` (0 incompat, 1 compat, 2 autoclear)."""
        e = self.ext(EXT_FEATURE_TABLE)
        if e is None:
            return None
        for pos in range(0, len(e.data) - 47, 48):
            if e.data[pos] == kind and e.data[pos + 1] == bit:
                return e.data[pos + 2:pos + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
        return None

    # ------------------------------------------------------------ parsing

    @classmethod
    def parse(cls, buf: bytes) -> Header:
        """Parse and validate a header from the start of the image (at least one cluster, or the whole file)."""
        if len(buf) < V2_HEADER_LEN or buf[:4] != MAGIC:
            raise OpenError("Image is not in qcow2 format")
        (_, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
         snap_off) = _V2.unpack_from(buf, 0)
        if version < 2 or version > 3:
            raise OpenError(f"Unsupported qcow2 version {version}")
        h = cls(version=version, backing_file_offset=bfo, backing_file_size=bfs, cluster_bits=cbits, size=size,
                crypt_method=crypt, l1_size=l1_size, l1_table_offset=l1_off, refcount_table_offset=rt_off,
                refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap, snapshots_offset=snap_off)
        if not MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS:
            raise OpenError(f"Unsupported cluster size: 2^{cbits}")
        if version == 2:
            h.incompatible_features = h.compatible_features = h.autoclear_features = 0
            h.refcount_order, h.header_length = 4, V2_HEADER_LEN
        else:
            if len(buf) < V3_HEADER_LEN:
                raise OpenError("qcow2 header exceeds cluster size")
            (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
             h.header_length) = _V3.unpack_from(buf, V2_HEADER_LEN)
            if h.header_length < V3_HEADER_LEN:
                raise OpenError("qcow2 header too short")
            if h.header_length > h.cluster_size:
                raise OpenError("qcow2 header exceeds cluster size")
            if h.header_length > len(buf):
                raise OpenError("qcow2 header exceeds cluster size")
            if h.header_length > V3_HEADER_LEN:
                h.compression_type = buf[V3_HEADER_LEN]
                h.extra_fields = bytes(buf[V3_HEADER_LEN + 8:h.header_length]) if h.header_length > 112 else b""
        if h.refcount_order > MAX_REFCOUNT_ORDER:
            raise OpenError("Reference count entry width too large; may not exceed 64 bits")
        if bfo and bfs > MAX_BACKING_NAME:
            raise OpenError("Backing file name too long")
        h._parse_extensions(buf)
        h._check_features()
        if bfo:
            if bfo + bfs > min(len(buf), h.cluster_size):
                raise OpenError("Invalid backing file offset")
            # QEMU keeps the name as a C string: whatever follows a NUL byte is not part of it.
            h.backing_file = bytes(buf[bfo:bfo + bfs]).split(b"\0", 1)[0].decode("utf-8", "replace")
        return h

    def _parse_extensions(self, buf: bytes) -> None:
        pos = self.header_length if self.version == 3 else V2_HEADER_LEN
        end = self.backing_file_offset if self.backing_file_offset else self.cluster_size
        end = min(end, self.cluster_size, len(buf))
        seen: set[int] = set()
        while pos + 8 <= end:
            typ, length = struct.unpack_from(">II", buf, pos)
            pos += 8
            if typ == EXT_END:
                return
            if length > end - pos:
                raise OpenError("Invalid extension length")
            if typ in seen and typ != 0:
                raise OpenError(f"Duplicate qcow2 header extension 0x{typ:x}")
            seen.add(typ)
            data = bytes(buf[pos:pos + length])
            if typ == EXT_BACKING_FORMAT and length > 1023:
                raise OpenError(f"ERROR: ext_backing_format: len={length} too large (>=1023)")
            if typ == EXT_BITMAPS and length != 24:
                raise OpenError("bitmaps_ext: Invalid extension length")
            self.extensions.append(Extension(typ, data))
            pos += (length + 7) & ~7

    def _check_features(self) -> None:
        unknown = self.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            names = []
            for bit in range(64):
                if unknown >> bit & 1:
                    names.append(self.feature_name(0, bit) or f"Unknown incompatible feature: {1 << bit:x}")
            raise OpenError(f"Unsupported qcow2 feature(s): {', '.join(names)}")
        if self.crypt_method or self.ext(EXT_CRYPTO) is not None:
            raise OpenError("encrypted images are not supported yet (qcow2 encryption is not implemented)")
        if self.compression_type not in COMPRESSION_NAMES:
            raise OpenError(f"Unknown compression type '{self.compression_type}'")
        if self.compression_type and not self.incompatible_features & INCOMPAT_COMPRESSION:
            raise OpenError("Invalid compression type: compression type bit is not set")
        if self.incompatible_features & INCOMPAT_COMPRESSION and not self.compression_type:
            raise OpenError("Invalid compression type: the compression type bit is set for zlib")
        if self.extended_l2 and self.cluster_size < EXTL2_MIN_CLUSTER:
            raise OpenError(f"Extended L2 entries are only supported with cluster sizes of at least "
                            f"{EXTL2_MIN_CLUSTER} bytes")
        if self.data_file_raw and not self.incompatible_features & INCOMPAT_DATA_FILE:
            self.autoclear_features &= ~AUTOCLEAR_DATA_FILE_RAW  # QEMU drops the bit (it is autoclear)

    # ------------------------------------------------------------ serialising

    def pack(self) -> bytes:
        """Header, extensions (end marker included) and backing name, as QEMU lays them out in cluster 0."""
        out = bytearray(_V2.pack(MAGIC, self.version, 0, 0, self.cluster_bits, self.size, self.crypt_method,
                                 self.l1_size, self.l1_table_offset, self.refcount_table_offset,
                                 self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset))
        if self.version >= 3:
            hlen = max(self.header_length, 112)
            out += _V3.pack(self.incompatible_features, self.compatible_features, self.autoclear_features,
                            self.refcount_order, hlen)
            out += bytes([self.compression_type]) + bytes(7) + self.extra_fields
            out += bytes(hlen - len(out))
        known = (EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_CRYPTO, EXT_FEATURE_TABLE, EXT_BITMAPS)
        exts = sorted(self.extensions, key=lambda e: known.index(e.type) if e.type in known else len(known))
        for e in exts:
            out += struct.pack(">II", e.type, len(e.data)) + e.data + bytes(-len(e.data) % 8)
        out += bytes(8)  # end of extensions
        if self.backing_file:
            name = self.backing_file.encode()
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        if len(out) > self.cluster_size:
            raise OpenError("Cannot update qcow2 header: header and extensions exceed the cluster size")
        return bytes(out)


def feature_table() -> bytes:
    """The feature name table extension data QEMU writes."""
    out = bytearray()
    for kind, bit, name in FEATURE_NAMES:
        out += bytes([kind, bit]) + name.encode().ljust(46, b"\0")
    return bytes(out)


def bitmaps_ext(h: Header) -> dict[str, Any] | None:
    """The bitmaps extension decoded, or None."""
    e = h.ext(EXT_BITMAPS)
    if e is None or len(e.data) < 24:
        return None
    nb, _, size, off = struct.unpack_from(">IIQQ", e.data)
    return {"nb_bitmaps": nb, "directory_size": size, "directory_offset": off}
