"""Compressed cluster payloads: zlib type is raw deflate (window bits 12 when written), zstd type plain frames."""

from __future__ import annotations

import zlib

from .constants import COMPRESSION_ZSTD


def decompress(ctype: int, data: bytes, cluster_size: int) -> bytes:
    """Exactly ``cluster_size`` bytes of one compressed cluster; ValueError on a bad stream."""
    if ctype == COMPRESSION_ZSTD:
        import zstandard

        try:
            obj = zstandard.ZstdDecompressor().decompressobj()
            out = obj.decompress(data)
        except zstandard.ZstdError as e:
            raise ValueError(f"zstd: {e}") from None
    else:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(data, cluster_size)
        except zlib.error as e:
            raise ValueError(f"zlib: {e}") from None
    if len(out) < cluster_size:
        raise ValueError(f"compressed cluster decompresses to {len(out)} bytes, expected {cluster_size}")
    return out[:cluster_size]


def compress(ctype: int, data: bytes | memoryview) -> bytes:
    """The compressed payload as QEMU writes it (it stores uncompressed when this is not smaller)."""
    if ctype == COMPRESSION_ZSTD:
        import zstandard

        return zstandard.ZstdCompressor(level=3, write_content_size=False, write_checksum=False).compress(data)
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
    return c.compress(data) + c.flush()
