"""The VHDX metadata log: finding the active sequence, replaying it, and writing one entry per metadata update.

Every BAT change goes through the log, as the spec asks and QEMU does: the new sectors are written to the log
and flushed before they are written in place, so a crash at any point leaves either the old or the new
metadata once the log is replayed on the next open.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

import attrs
from blockgraph.errors import ImageCorrupt

from .structs import (
    LOG_DATA_HEAD,
    LOG_DESCRIPTOR,
    LOG_ENTRY_HEADER,
    LOG_SECTOR,
    LogEntryHeader,
    MiB,
    checksum_with_hole,
    descriptor_sectors,
    round_up,
)

DATA_BYTES = LOG_SECTOR - 12  # a data sector keeps 4084 bytes; the other 12 travel in its descriptor


@attrs.frozen
class Descriptor:
    zero: bool
    file_offset: int
    length: int        # bytes to zero (zero descriptors); 4096 for data descriptors
    leading: bytes     # first 8 bytes of a data sector
    trailing: bytes    # last 4 bytes of a data sector


@attrs.frozen
class Entry:
    position: int
    header: LogEntryHeader
    descriptors: list[Descriptor]
    data: list[bytes]  # the 4084-byte middles of the data sectors, in descriptor order


class Log:
    """The circular log at ``[offset, offset+length)`` of the image file."""

    def __init__(self, file: Any, offset: int, length: int, filename: str) -> None:
        self.file, self.offset, self.length, self.filename = file, offset, length, filename
        self.sequence = 1

    async def _read(self, pos: int, sectors: int) -> bytes:
        """``sectors`` log sectors from ``pos``, wrapping around the end of the buffer."""
        out = bytearray(sectors * LOG_SECTOR)
        done = 0
        while done < len(out):
            n = min(len(out) - done, self.length - pos)
            await self.file.preadv(self.offset + pos, memoryview(out)[done:done + n])
            done += n
            pos = (pos + n) % self.length
        return bytes(out)

    async def _entry_at(self, pos: int, log_guid: uuid.UUID) -> Entry | None:
        """The valid entry starting at ``pos``, or None."""
        hdr = LogEntryHeader.parse(await self._read(pos, 1))
        if (hdr is None or hdr.log_guid != log_guid or hdr.sequence_number == 0 or hdr.entry_length == 0
                or hdr.entry_length % LOG_SECTOR or hdr.entry_length > self.length
                or descriptor_sectors(hdr.descriptor_count) * LOG_SECTOR > hdr.entry_length):
            return None
        raw = await self._read(pos, hdr.entry_length // LOG_SECTOR)
        if checksum_with_hole(raw) != hdr.checksum:
            return None
        descs: list[Descriptor] = []
        data: list[bytes] = []
        data_pos = descriptor_sectors(hdr.descriptor_count) * LOG_SECTOR
        for i in range(hdr.descriptor_count):
            sig, word, big, off, seq = LOG_DESCRIPTOR.unpack_from(raw, LOG_ENTRY_HEADER.size + i * LOG_DESCRIPTOR.size)
            if seq != hdr.sequence_number or off % LOG_SECTOR:
                return None
            if sig == b"zero":
                if big % LOG_SECTOR:
                    return None
                descs.append(Descriptor(True, off, big, b"", b""))
            elif sig == b"desc":
                if data_pos + LOG_SECTOR > len(raw):
                    return None
                dsig, high = LOG_DATA_HEAD.unpack_from(raw, data_pos)
                (low,) = struct.unpack_from("<I", raw, data_pos + LOG_SECTOR - 4)
                if dsig != b"data" or (high << 32 | low) != seq:
                    return None
                data.append(raw[data_pos + 8:data_pos + 8 + DATA_BYTES])
                data_pos += LOG_SECTOR
                descs.append(Descriptor(False, off, LOG_SECTOR, struct.pack("<Q", big), struct.pack("<I", word)))
            else:
                return None
        return Entry(pos, hdr, descs, data)

    async def find_active(self, log_guid: uuid.UUID) -> list[Entry]:
        """The active sequence: the longest run of consecutive entries ending at the highest sequence number."""
        entries: dict[int, Entry] = {}
        for pos in range(0, self.length, LOG_SECTOR):
            e = await self._entry_at(pos, log_guid)
            if e is not None:
                entries[pos] = e
        best: list[Entry] = []
        for start in entries.values():
            chain, seen = [start], {start.position}
            while True:
                nxt = entries.get((chain[-1].position + chain[-1].header.entry_length) % self.length)
                if nxt is None or nxt.position in seen or \
                        nxt.header.sequence_number != chain[-1].header.sequence_number + 1:
                    break
                chain.append(nxt)
                seen.add(nxt.position)
            key = (chain[-1].header.sequence_number, len(chain))
            if not best or key > (best[-1].header.sequence_number, len(best)):
                best = chain
        if best:
            self.sequence = best[-1].header.sequence_number + 1
        return best

    async def replay(self, entries: list[Entry]) -> None:
        """Write every entry's sectors in place, in order, growing the file where an entry says it was longer."""
        for e in entries:
            if e.header.flushed_file_offset > self.file.getlength():
                raise ImageCorrupt(f"VHDX image '{self.filename}': the log entry {e.header.sequence_number} "
                                   "says the file was longer than it is (truncated image?)")
            data = iter(e.data)
            for d in e.descriptors:
                if d.zero:
                    await self.file.pwrite_zeroes(d.file_offset, d.length)
                else:
                    sector = d.leading + next(data) + d.trailing
                    await self.file.pwritev(d.file_offset, memoryview(sector))
            if self.file.getlength() < e.header.last_file_offset:
                await self.file.truncate(round_up(e.header.last_file_offset, MiB))
        await self.file.flush()

    def build_entry(self, log_guid: uuid.UUID, sectors: list[tuple[int, bytes]], file_length: int) -> bytearray:
        """One log entry carrying whole 4 KiB ``sectors`` given as (file offset, contents)."""
        seq = self.sequence
        self.sequence += 1
        ndesc = descriptor_sectors(len(sectors))
        buf = bytearray((ndesc + len(sectors)) * LOG_SECTOR)
        LOG_ENTRY_HEADER.pack_into(buf, 0, b"loge", 0, len(buf), 0, seq, len(sectors), 0, log_guid.bytes_le,
                                   file_length, file_length)
        for i, (off, sector) in enumerate(sectors):
            (leading,) = struct.unpack_from("<Q", sector, 0)
            (trailing,) = struct.unpack_from("<I", sector, LOG_SECTOR - 4)
            LOG_DESCRIPTOR.pack_into(buf, LOG_ENTRY_HEADER.size + i * LOG_DESCRIPTOR.size, b"desc", trailing,
                                     leading, off, seq)
            at = (ndesc + i) * LOG_SECTOR
            LOG_DATA_HEAD.pack_into(buf, at, b"data", seq >> 32)
            buf[at + 8:at + 8 + DATA_BYTES] = sector[8:8 + DATA_BYTES]
            struct.pack_into("<I", buf, at + LOG_SECTOR - 4, seq & 0xFFFFFFFF)
        struct.pack_into("<I", buf, 4, checksum_with_hole(buf))
        return buf

    async def write_entry(self, entry: bytearray) -> None:
        """The entry at the start of the (empty) log, then a flush so it is stable before the in-place write."""
        if len(entry) > self.length:
            raise ImageCorrupt(f"VHDX image '{self.filename}': a metadata update does not fit in the log")
        await self.file.pwritev(self.offset, memoryview(entry))
        await self.file.flush()
