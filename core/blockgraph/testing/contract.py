"""The driver contract: what every block driver must do, as plain ``async def check_*(harness)``.

No pytest here (trio's ``check_*_stream`` rationale): the same checks back the pytest base
classes in :mod:`blockgraph.testing.suite` and can run from a CLI self-test (:func:`run_checks`).
A check returns quietly, raises :class:`ContractViolation` (an ``AssertionError``) saying what
broke and where. A capability the driver lacks is checked through the core's fallback for it; only a
driver that cannot write at all gets :class:`NotApplicable` from the checks that write. How the driver
is opened is the :class:`~blockgraph.testing.harness.Harness`'s business.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import itertools
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from .. import io
from ..backend import BlockBackend
from ..driver import SUPPORTED_API_VERSIONS, Capabilities, Concurrency, DriverKind, ReqFlags, Status
from ..errors import BlockGraphError, NotSupported, OptionError
from ..node import close_node
from ..options import merge, option_fields, unflatten
from ..perms import Perm
from ..session import Session
from .filter_contract import check_filter_forwarding
from .harness import (
    KIB,
    ContractViolation,
    Harness,
    Model,
    NotApplicable,
    Opened,
    assert_allowed,
    assert_bytes,
    call,
    check_size,
    clip,
    expect_error,
    fill,
    model_of,
    pattern,
    read,
    verify_all,
)

__all__ = ["CHECKS", "FILTER_CHECKS", "ContractViolation", "Harness", "NotApplicable", "Opened", "run_checks"]


# ---------------------------------------------------------------- read-back


async def check_read_back_aligned(h: Harness) -> None:
    """Aligned writes read back exactly, alone and as part of the whole disk; neighbours are untouched."""
    async with h.open_writable() as o:
        blk = o.blk
        length = blk.getlength()
        check_size(h, length)
        model = await model_of(h, blk)
        plan = clip([(0, 512), (4096, 4096), (65536, 65536), (length - 4096, 4096), (length // 2, 8192),
                      (0, 4096), (131072, 1024)], length)
        for i, (off, n) in enumerate(plan, 1):
            data = pattern(h.seed + i, n)
            await call(f"write at offset {off}, {n} bytes", blk.pwritev(off, memoryview(data)))
            model.write(off, data)
            assert_bytes(await read(blk, off, n), model[off:off + n], off, f"read-back of the write at {off}+{n}")
        # Into a view in the middle of a larger buffer: the driver must fill the caller's memory, in place.
        big = bytearray(b"\xee" * (8192 + 64))
        await call("read into a memoryview slice", blk.preadv(4096, memoryview(big)[32:32 + 8192]))
        assert_bytes(bytes(big[32:32 + 8192]), model[4096:4096 + 8192], 4096, "read into a memoryview slice")
        if big[:32] != b"\xee" * 32 or big[-32:] != b"\xee" * 32:
            raise ContractViolation("a read wrote outside the memoryview it was given")
        await verify_all(h, blk, model, "whole-disk read after aligned writes")


async def check_read_back_unaligned(h: Harness) -> None:
    """Writes and reads at any byte offset and length read back exactly (core does read-modify-write)."""
    async with h.open_writable() as o:
        blk = o.blk
        length = blk.getlength()
        model = await model_of(h, blk)
        plan = clip([(1, 1), (511, 2), (513, 1000), (4095, 4097), (777, 65536 + 333), (100, 3),
                      (length - 1, 1), (length - 3001, 3000), (70001, 511), (70000, 1)], length)
        for i, (off, n) in enumerate(plan, 100):
            data = pattern(h.seed + i, n)
            await call(f"write at offset {off}, {n} bytes", blk.pwritev(off, memoryview(data)))
            model.write(off, data)
            assert_bytes(await read(blk, off, n), model[off:off + n], off, f"read-back of the write at {off}+{n}")
        for off, n in clip([(3, 7), (4090, 20), (length - 5, 5), (509, 1030), (1, 70000)], length):
            assert_bytes(await read(blk, off, n), model[off:off + n], off, f"unaligned read at {off}+{n}")
        await verify_all(h, blk, model, "whole-disk read after unaligned writes")


# ---------------------------------------------------------------- zeroes and discard


async def check_write_zeroes(h: Harness) -> None:
    """Write-zeroes always reads back as zeros (with or without MAY_UNMAP, FUA, unaligned edges)."""
    async with h.open_writable() as o:
        blk = o.blk
        length = blk.getlength()
        model = await model_of(h, blk)
        await fill(h, blk, model, [(0, min(length, 512 * KIB)), (length - 8192, 8192)], 200)
        plan: list[tuple[int, int, ReqFlags]] = [
            (65536, 65536, ReqFlags.NONE), (1000, 3000, ReqFlags.NONE), (131072 + 7, 70000, ReqFlags.MAY_UNMAP),
            (300000, 4096, ReqFlags.FUA), (length - 4096, 4096, ReqFlags.MAY_UNMAP), (0, 1, ReqFlags.NONE),
            (250001, 1, ReqFlags.MAY_UNMAP)]
        for off, n, flags in plan:
            if off + n > length:
                continue
            await call(f"write-zeroes at offset {off}, {n} bytes ({flags!r})", blk.pwrite_zeroes(off, n, flags))
            model.zero(off, n)
            assert_bytes(await read(blk, off, n), bytes(n), off, f"read after write-zeroes at {off}+{n}")
        if h.caps.zero:
            off, n = 196608, 65536
            try:
                await blk.pwrite_zeroes(off, n, ReqFlags.NO_FALLBACK)
            except NotSupported:
                await call("write-zeroes after NotSupported", blk.pwrite_zeroes(off, n))
            except Exception as e:
                raise ContractViolation(f"write-zeroes with NO_FALLBACK at {off}+{n} failed: "
                                        f"{type(e).__name__}: {e} (only NotSupported may refuse it)") from e
            model.zero(off, n)
        await verify_all(h, blk, model, "whole-disk read after write-zeroes")


async def check_discard(h: Harness) -> None:
    """Discard leaves every byte outside the range alone; inside, zeros or old data per the declared guarantee.
    Without a Discarder the core drops discards (as QEMU's bdrv_co_pdiscard): nothing may change."""
    if not h.caps.discard:
        return await _check_discard_ignored(h)
    async with h.open_writable() as o:
        blk = o.blk
        length = blk.getlength()
        model = await model_of(h, blk)
        await fill(h, blk, model, [(0, min(length, 512 * KIB)), (length - 65536, 65536)], 300)
        lim = o.node.limits
        align = max(lim.pdiscard_alignment, lim.request_alignment, 1)
        inner: list[tuple[int, int]] = []
        for off, n in clip([(65536, 65536), (1000, 5000), (200003, 100000), (length - 65536, 65536)], length):
            await call(f"discard at offset {off}, {n} bytes", blk.pdiscard(off, n))
            start, end = -(-off // align) * align, (off + n) // align * align
            if end > start:
                inner.append((start, end))
        actual = await read(blk, 0, length)
        zeros = bytes(length)
        pos = 0
        for start, end in [*sorted(inner), (length, length)]:
            if start > pos:
                assert_bytes(actual[pos:start], model[pos:start], pos,
                             "data outside every discarded range changed")
            lo = max(start, pos)
            if end > lo:
                if h.discard_reads_zero:
                    assert_bytes(actual[lo:end], zeros[lo:end], lo,
                                 f"{h.driver} declares discard_reads_zero, but a discarded range")
                else:
                    assert_allowed(actual[lo:end], [model[lo:end], zeros[lo:end]], lo,
                                   "a discarded range must read as zeros or as the old data")
            pos = max(pos, end)
        model.data[:] = actual
        # Discarded space is usable again.
        await fill(h, blk, model, [(65536, 65536), (200003, 5000)], 350)
        await verify_all(h, blk, model, "whole-disk read after writing into discarded ranges")


async def _check_discard_ignored(h: Harness) -> None:
    async with h.open_writable() as o:
        blk = o.blk
        length = blk.getlength()
        model = await model_of(h, blk)
        await fill(h, blk, model, [(0, min(length, 512 * KIB))], 300)
        for off, n in clip([(65536, 65536), (1000, 5000), (0, length)], length):
            await call(f"discard at offset {off}, {n} bytes (no Discarder: ignored)", blk.pdiscard(off, n))
        await verify_all(h, blk, model, f"{h.driver} has no Discarder, but a discard changed data")


# ---------------------------------------------------------------- block status


async def _walk_status(h: Harness, blk: BlockBackend, content: bytes, want_zero: bool) -> None:
    length = len(content)
    pos = 0
    for _ in range(65536):
        if pos >= length:
            break
        st, _depth = await call(f"block status at {pos}", blk.block_status(pos, length - pos, want_zero=want_zero))
        where = f"block status at {pos} (want_zero={want_zero}) said {st.flags!r} for {st.length} bytes"
        if st.length <= 0 or pos + st.length > length:
            raise ContractViolation(f"{where}: the extent must be inside (0, {length - pos}]")
        seg = content[pos:pos + st.length]
        if st.flags & Status.ZERO and seg.count(0) != len(seg):
            first = next(i for i, b in enumerate(seg) if b)
            raise ContractViolation(f"{where}, but offset {pos + first} reads {seg[first]:#04x}")
        if seg.count(0) != len(seg) and not st.flags & Status.DATA:
            raise ContractViolation(f"{where}, but the range holds data (DATA must be set)")
        if bool(st.flags & Status.EOF) != (pos + st.length == length):
            raise ContractViolation(f"{where}: EOF must be set exactly on the extent that reaches the end")
        pos += st.length
    else:
        raise ContractViolation(f"block status did not reach the end of the disk in 65536 extents (at {pos})")
    st, _depth = await call("block status at the end", blk.block_status(length, 512))
    if st.length != 0 or not st.flags & Status.EOF:
        raise ContractViolation(f"block status at the end of the disk must be EOF with length 0, got {st!r}")


async def check_block_status(h: Harness) -> None:
    """Block status agrees with the data: ZERO ranges read as zeros, written data is DATA, extents tile the disk."""
    async with h.open() as o:
        blk = o.blk
        length = blk.getlength()
        if h.caps.write:
            model = await model_of(h, blk)
            await fill(h, blk, model, [(0, 65536), (200005, 100000), (length - 4096, 4096)], 400)
            await call("write-zeroes", blk.pwrite_zeroes(100 * KIB, 50 * KIB))
            if h.caps.discard:
                await call("discard", blk.pdiscard(400 * KIB, 64 * KIB))
        content = await read(blk, 0, length)
        for want_zero in (True, False):
            await _walk_status(h, blk, content, want_zero)
        if h.caps.write and h.stores_data:
            for off in (200005 + 17, 12345, length - 1):
                st, _depth = await call(f"block status at {off}", blk.block_status(off, 100))
                if not st.flags & Status.DATA or st.flags & Status.ZERO:
                    raise ContractViolation(f"block status at {off}, inside written data, said {st.flags!r}")


# ---------------------------------------------------------------- flush


async def check_flush(h: Harness) -> None:
    """Flush succeeds (clean, dirty, repeated, read-only); after flush or a FUA write the data is stable.

    Stable means visible to a second, read-only opener of the same storage (persistent drivers).
    """
    peer_ok = h.persistent and h.concurrent_open
    async with h.open_writable() as o:
        blk = o.blk
        model = await model_of(h, blk)
        await call("flush of a clean disk", blk.flush())
        await fill(h, blk, model, [(4096, 8192), (100000, 3000)], 500)
        await call("flush", blk.flush())
        await call("second flush", blk.flush())
        if peer_ok:
            async with h.open(read_only=True, force_share=True) as peer:
                await verify_all(h, peer.blk, model, "a second opener after flush")
        data = pattern(h.seed + 550, 4096)
        await call("FUA write", blk.pwritev(65536, memoryview(data), ReqFlags.FUA))
        model.write(65536, data)
        if peer_ok:
            async with h.open(read_only=True, force_share=True) as peer:
                await verify_all(h, peer.blk, model, "a second opener after a FUA write (no flush)")
        await verify_all(h, blk, model, "whole-disk read after flushes")
    async with h.open(read_only=True) as ro:
        await call("flush on a read-only node", ro.blk.flush())


# ---------------------------------------------------------------- truncate


async def check_truncate(h: Harness) -> None:
    """Growing reads zeros in the new space; shrinking cuts (and re-growing never resurrects old data)."""
    if h.supports_truncate is False or (h.supports_truncate is None and not h.caps.truncate):
        return await _check_truncate_refused(h)
    h.require("truncate")
    step = 64 * KIB
    async with h.open_writable() as o:
        blk = o.blk
        length = blk.getlength()
        model = await model_of(h, blk)
        await fill(h, blk, model, [(length - 3 * step, 3 * step), (0, 4096)], 600)
        await call(f"grow to {length + step}", blk.truncate(length + step))
        if blk.getlength() != length + step:
            raise ContractViolation(f"after truncate to {length + step}, getlength() is {blk.getlength()}")
        model.resize(length + step)
        await verify_all(h, blk, model, "after growing (old data kept, new space zeros)")
        await fill(h, blk, model, [(length + 100, 5000)], 650)
        short = length - 2 * step
        await call(f"shrink to {short}", blk.truncate(short))
        if blk.getlength() != short:
            raise ContractViolation(f"after truncate to {short}, getlength() is {blk.getlength()}")
        model.resize(short)
        await verify_all(h, blk, model, "after shrinking")
        await expect_error(f"read at {short} after shrinking", blk.preadv(short, memoryview(bytearray(1))),
                           [errno.EIO])
        await call(f"grow back to {length}", blk.truncate(length))
        model.resize(length)
        await verify_all(h, blk, model, "after shrinking and growing again (the cut data must not come back)")
    if h.persistent:
        async with h.open() as o:
            if o.blk.getlength() != length:
                raise ContractViolation(f"after truncate and reopen, getlength() is {o.blk.getlength()}, "
                                        f"expected {length}")
            await verify_all(h, o.blk, model, "after truncate and reopen")
    return None


async def _check_truncate_refused(h: Harness) -> None:
    async with h.open_writable() as o:
        blk = o.blk
        length = blk.getlength()
        model = await model_of(h, blk)
        why = "declares supports_truncate = False" if h.supports_truncate is False else "has no Truncatable"
        await expect_error(f"truncate of {h.driver}, which {why}",
                           blk.truncate(length + 65536), [errno.ENOTSUP, errno.EPERM, errno.EINVAL])
        if blk.getlength() != length:
            raise ContractViolation(f"a refused truncate changed the length from {length} to {blk.getlength()}")
        await verify_all(h, blk, model, "after a refused truncate")


# ---------------------------------------------------------------- bounds and permissions


async def check_out_of_range(h: Harness) -> None:
    """The length is the size asked for; requests beyond it fail with EIO and change nothing."""
    async with h.open() as o:
        blk = o.blk
        length = blk.getlength()
        check_size(h, length)
        before = await read(blk, 0, length)
        bad = [(length, 1), (length - 1, 2), (length + 4096, 512), (-1, 1), (-512, 1024), (0, length + 1)]
        for off, n in bad:
            await expect_error(f"read at {off}+{n} (length {length})", blk.preadv(off, memoryview(bytearray(n))),
                               [errno.EIO])
            if not h.caps.write:
                continue
            await expect_error(f"write at {off}+{n} (length {length})",
                               blk.pwritev(off, memoryview(b"\x01" * n)), [errno.EIO])
            await expect_error(f"write-zeroes at {off}+{n} (length {length})", blk.pwrite_zeroes(off, n),
                               [errno.EIO])
            await expect_error(f"discard at {off}+{n} (length {length})", blk.pdiscard(off, n), [errno.EIO])
        assert_bytes(await read(blk, 0, length), before, 0, "after refused out-of-range requests")
        assert_bytes(await read(blk, length - 1, 1), before[-1:], length - 1, "the last byte")


async def check_read_only(h: Harness) -> None:
    """A read-only open refuses every modification with EPERM and writes nothing, not even on close."""
    if h.caps.write:
        async with h.open() as o:
            await fill(h, o.blk, None, [(0, 65536), (o.blk.getlength() - 512, 512)], 700)
            expected = await read(o.blk, 0, o.blk.getlength())
    else:
        expected = None
    async with h.open(read_only=True) as ro:
        blk = ro.blk
        length = blk.getlength()
        if not ro.node.read_only:
            raise ContractViolation("a node opened with read-only=on does not say it is read-only")
        await expect_error("write on a read-only node", blk.pwritev(0, memoryview(b"\x01" * 512)), [errno.EPERM])
        await expect_error("write-zeroes on a read-only node", blk.pwrite_zeroes(0, 4096), [errno.EPERM])
        await expect_error("discard on a read-only node", blk.pdiscard(0, 65536), [errno.EPERM])
        await expect_error("truncate on a read-only node", blk.truncate(length + 65536), [errno.EPERM])
        await expect_error("attaching a read-write backend to a read-only node",
                           BlockBackend.attach_new(ro.session, ro.node), [errno.EPERM, errno.EACCES])
        seen = await read(blk, 0, length)
        if expected is not None and h.persistent:
            assert_bytes(seen, expected, 0, "read-only open of what was written before")
        if blk.getlength() != length:
            raise ContractViolation(f"refused requests changed the length from {length} to {blk.getlength()}")
    if h.persistent and h.caps.write:
        async with h.open() as o:
            assert_bytes(await read(o.blk, 0, o.blk.getlength()), expected, 0,
                         "data after a read-only open and close (the driver wrote while read-only)")
    if h.persistent and h.caps.write and h.concurrent_open:
        # A reader open while someone else writes must not write its (stale) view back when it closes.
        async with h.open(read_only=True, force_share=True):
            async with h.open() as o:
                model = await model_of(h, o.blk)
                await fill(h, o.blk, model, [(4096, 8192)], 750)
                await call("flush", o.blk.flush())
        async with h.open() as o:
            await verify_all(h, o.blk, model, "data written while a read-only opener was open, after that "
                             "opener closed (it wrote back on close)")


# ---------------------------------------------------------------- concurrency


@attrs.frozen
class _Op:
    kind: str  # read, write, zero, flush
    offset: int
    length: int
    data: bytes = b""


def _plan_batch(rng: random.Random, n: int, region: int, tag: int) -> list[_Op]:
    ops: list[_Op] = []
    for i in range(n):
        kind = rng.choices(("read", "write", "zero", "flush"), (40, 40, 12, 3))[0]
        if kind == "flush":
            ops.append(_Op("flush", 0, 0))
            continue
        # Mostly small, often unaligned, clustered so that requests overlap and share blocks.
        length = rng.choice((1, 7, 512, 513, 1000, 4096, 4097, 8192, 20000))
        base = rng.choice((0, 512, 4096, 65536 - 700, 131072 + 3, rng.randrange(region)))
        offset = max(0, min(base + rng.randrange(-600, 600), region - length))
        data = pattern(tag + i, length) if kind == "write" else bytes(length) if kind == "zero" else b""
        ops.append(_Op(kind, offset, length, data))
    return ops


async def check_concurrent(h: Harness) -> None:
    """N concurrent reads, writes and write-zeroes (overlapping, unaligned) agree with a serial model.

    A read may see, byte by byte, the old data or any write running beside it; after the batch a
    byte written by exactly one request holds that request's data, and one written by several holds
    one of theirs. Nothing outside the batch's writes may change (torn read-modify-write).
    """
    rng = random.Random(h.seed + 800)
    async with h.open_writable() as o:
        blk = o.blk
        length = blk.getlength()
        region = min(length, 256 * KIB)
        model = await model_of(h, blk)
        for rnd in range(4):
            ops = _plan_batch(rng, h.concurrent_requests, region, h.seed + 10_000 * (rnd + 1))
            bufs = [bytearray(op.length) if op.kind == "read" else None for op in ops]

            def start(op: _Op, buf: bytearray | None) -> Awaitable[Any]:
                if op.kind == "read":
                    return blk.preadv(op.offset, memoryview(buf))
                if op.kind == "write":
                    return blk.pwritev(op.offset, memoryview(op.data))
                if op.kind == "zero":
                    return blk.pwrite_zeroes(op.offset, op.length)
                return blk.flush()

            results = await asyncio.gather(*(start(op, b) for op, b in zip(ops, bufs, strict=True)),
                                           return_exceptions=True)
            for op, res in zip(ops, results, strict=True):
                if isinstance(res, BaseException):
                    raise ContractViolation(f"concurrent {op.kind} at {op.offset}+{op.length} failed: "
                                            f"{type(res).__name__}: {res}") from res
            writes = [op for op in ops if op.kind in ("write", "zero")]
            for op, buf in zip(ops, bufs, strict=True):
                if op.kind == "read":
                    _check_read(bytes(buf), op, model, writes, h.stores_data, rnd)
            after = await read(blk, 0, region)
            _check_final(after, model, writes, h.stores_data, rnd)
            model.data[:region] = after
        await verify_all(h, blk, model, "whole-disk read after the concurrent rounds")


def _segments(lo: int, hi: int, writes: list[_Op]) -> list[tuple[int, int, list[_Op]]]:
    """Split [lo, hi) where the set of writes covering it changes."""
    cuts = {lo, hi}
    for w in writes:
        cuts.update(x for x in (w.offset, w.offset + w.length) if lo < x < hi)
    points = sorted(cuts)
    return [(a, b, [w for w in writes if w.offset < b and a < w.offset + w.length])
            for a, b in itertools.pairwise(points)]


def _written(w: _Op, a: int, b: int, model: Model, stores: bool) -> bytes:
    """What [a, b) reads as once ``w`` (which covers it) has been applied."""
    return w.data[a - w.offset:b - w.offset] if stores or w.kind == "zero" else model[a:b]


def _check_read(got: bytes, op: _Op, model: Model, writes: list[_Op], stores: bool, rnd: int) -> None:
    """A concurrent read sees, byte by byte, the old data or a write running beside it."""
    for a, b, cover in _segments(op.offset, op.offset + op.length, writes):
        cands = [model[a:b]] + [_written(w, a, b, model, stores) for w in cover]
        assert_allowed(got[a - op.offset:b - op.offset], cands, a,
                       f"round {rnd}: concurrent read at {op.offset}+{op.length}")


def _check_final(after: bytes, model: Model, writes: list[_Op], stores: bool, rnd: int) -> None:
    """After the batch: untouched bytes are old; written bytes hold one of the writes covering them."""
    for a, b, cover in _segments(0, len(after), writes):
        got = after[a:b]
        if not cover:
            assert_bytes(got, model[a:b], a, f"round {rnd}: data that no concurrent write touched changed")
            continue
        cands = [_written(w, a, b, model, stores) for w in cover]
        if any(got == c for c in cands):
            continue
        try:
            assert_allowed(got, cands, a, f"round {rnd}: after concurrent writes")
        except ContractViolation as e:
            torn = " (old data came back: a torn read-modify-write?)" if got != model[a:b] and any(
                x == y for x, y in zip(got, model[a:b], strict=True)) else ""
            raise ContractViolation(f"{e}{torn}") from None


# ---------------------------------------------------------------- lifecycle


async def check_reopen(h: Harness) -> None:
    """Close and open again: the length is kept, and so is the data when the driver is persistent."""
    async with h.open() as o:
        length = o.blk.getlength()
        if h.caps.write:
            model = await model_of(h, o.blk)
            await fill(h, o.blk, model, [(0, 4096), (123457, 7777), (length - 512, 512)], 900)
        expected = await read(o.blk, 0, length)
    for attempt in range(2):
        async with h.open() as o:
            if o.blk.getlength() != length:
                raise ContractViolation(f"reopen #{attempt + 1}: getlength() is {o.blk.getlength()}, "
                                        f"was {length} before closing")
            if h.persistent:
                assert_bytes(await read(o.blk, 0, length), expected, 0,
                             f"reopen #{attempt + 1} of a persistent driver")
    async with h.open(read_only=True) as o:
        if h.persistent:
            assert_bytes(await read(o.blk, 0, length), expected, 0, "read-only reopen of a persistent driver")


async def check_live_reopen(h: Harness) -> None:
    """Reopen the live node read-only and back (blockdev-reopen): writes refused in between, data kept.
    Without Reopenable the core refuses the reopen with QEMU's text, and the node stays as it was."""
    h.require("write")
    if not h.caps.reopen:
        return await _check_reopen_refused(h)
    async with h.open() as o:
        blk, length = o.blk, o.blk.getlength()
        model = await model_of(h, blk)
        await fill(h, blk, model, [(0, 4096), (length // 2, 8192)], 700)
        blk.set_perm(Perm.CONSISTENT_READ, blk.shared)
        blk.read_only = True
        await call("reopen read-only", o.session.reopen(o.node, read_only=True))
        if not o.node.read_only:
            raise ContractViolation("the node is still writable after reopening it read-only")
        await expect_error("write to the node reopened read-only",
                           io.pwritev(o.node, 0, memoryview(pattern(h.seed + 702, 512))), [errno.EPERM])
        await verify_all(h, blk, model, "whole-disk read after reopening read-only")
        await call("reopen read-write", o.session.reopen(o.node, read_only=False))
        blk.read_only = False
        blk.set_perm(Perm.CONSISTENT_READ | Perm.WRITE, blk.shared)
        await fill(h, blk, model, [(4096, 4096), (length - 512, 512)], 703)
        await verify_all(h, blk, model, "whole-disk read after reopening read-write")


async def _check_reopen_refused(h: Harness) -> None:
    async with h.open() as o:
        blk = o.blk
        model = await model_of(h, blk)
        await fill(h, blk, model, [(0, 4096)], 700)
        try:
            await o.session.reopen(o.node, read_only=True)
        except BlockGraphError as e:
            if "does not support reopening files" not in str(e):
                raise ContractViolation(f"reopen of {h.driver}, which has no Reopenable: {e}") from e
        else:
            raise ContractViolation(f"reopen of {h.driver} read-only succeeded without Reopenable")
        if o.node.read_only:
            raise ContractViolation("a refused reopen left the node read-only")
        await fill(h, blk, model, [(4096, 4096)], 703)
        await verify_all(h, blk, model, "whole-disk read after a refused reopen")


async def check_close_idempotent(h: Harness) -> None:
    """Closing twice silently succeeds (trio's aclose rule), and the last user's close closes the whole tree."""
    async with h.open() as o:
        if h.caps.write:
            await fill(h, o.blk, None, [(0, 4096)], 950)
        drv = o.node.driver
        await call("closing the backend", o.blk.close())
        await call("closing the backend again", o.blk.close())
        if not o.node.closed:
            raise ContractViolation("the node stayed open after its only user closed")
        if o.session.nodes:
            raise ContractViolation(f"nodes left open after the root closed: {sorted(o.session.nodes)}")
        await call("a second driver.close()", drv.close())
        await call("a third driver.close()", drv.close())
        await call("close_node on a closed node", close_node(o.node))
        await call("closing the session", o.session.close())
    # The harness closes the session a second time on exit: that, too, must be quiet.


async def check_option_errors(h: Harness) -> None:
    """An unknown or invalid option is an OptionError naming node, driver and key, and leaves nothing open.

    The attributes name all three; the message names the key, and is QEMU's text where QEMU has one (which shows
    no node name, and never a generated one)."""
    cases: list[tuple[str, Any]] = [("x-no-such-option", "1"), *list(h.invalid_options.items())]
    name = "contract-opt"
    for key, value in cases:
        session = Session(plugins=h.new_host())
        try:
            tree = merge(h.tree(), unflatten({"node-name": name, key: value}))
            want_node, want_driver, want_key = name, h.driver, key
            head, _, rest = key.partition(".")
            if rest and head in getattr(h.driver_class, "child_options", ()) and isinstance(tree[head], dict):
                # A child's option: its own node (named or generated) and driver own the error.
                want_node, want_driver, want_key = tree[head].get("node-name"), tree[head].get("driver"), rest
            try:
                await session.open_node(tree)
            except OptionError as e:
                msg = str(e)
                for what, want, got in (("node", want_node, e.node), ("driver", want_driver, e.driver),
                                        ("option", want_key, e.option)):
                    if want is None and got:  # a generated node name: any, as long as it is named
                        want = got
                    if got != want or (what == "option" and f"'{want}'" not in msg):
                        raise ContractViolation(f"{key}={value!r}: the OptionError must name {what} '{want}' "
                                                f"(got {what}={got!r}, message {msg!r})") from e
                if "'#" in msg:
                    raise ContractViolation(f"{key}={value!r}: a generated node name in the message {msg!r}") from e
            except Exception as e:
                raise ContractViolation(f"{key}={value!r}: expected OptionError, got {type(e).__name__}: {e}") \
                    from e
            else:
                raise ContractViolation(f"{key}={value!r} was accepted; it must be refused with an OptionError")
            if session.nodes:
                raise ContractViolation(f"{key}={value!r}: the failed open left nodes behind: {sorted(session.nodes)}")
        finally:
            await session.close()


# ---------------------------------------------------------------- declarations


_METHODS = ("open", "close", "getlength", "preadv", "pwritev", "flush", "pwrite_zeroes", "pdiscard",
            "block_status", "truncate", "flush_to_os")


async def check_declared_capabilities(h: Harness) -> None:
    """What the driver registers and declares matches what it implements; declared guarantees are backed."""
    entry = h.host.driver_entry(h.driver)
    cls = h.driver_class
    problems: list[str] = []
    if getattr(cls, "name", None) != entry.name:
        problems.append(f"registered as '{entry.name}' but the class says name = {getattr(cls, 'name', None)!r}")
    try:
        kind = DriverKind(cls.kind)
    except (AttributeError, ValueError):
        problems.append(f"kind {getattr(cls, 'kind', None)!r} is not a DriverKind")
    else:
        if entry.meta["kind"] is not kind:
            problems.append(f"registered with kind={entry.meta['kind'].value} but the class says {kind.value}")
    if entry.meta["probe"] != callable(getattr(cls, "probe", None)):
        problems.append(f"registered with probe={entry.meta['probe']} but the class "
                        f"{'has' if callable(getattr(cls, 'probe', None)) else 'has no'} probe()")
    if getattr(cls, "api_version", None) not in SUPPORTED_API_VERSIONS:
        problems.append(f"api_version {getattr(cls, 'api_version', None)!r} is not supported")
    options = getattr(cls, "Options", None)
    if options is None or not attrs.has(options):
        problems.append("Options must be an attrs class")
    else:
        keys = [f.metadata.get("key") or f.name for f in attrs.fields(options)]
        if len(keys) != len(option_fields(options)):
            problems.append(f"Options declares a key twice: {keys}")
    if not isinstance(getattr(cls, "concurrency", Concurrency.SERIALIZE_REQUESTS), Concurrency):
        problems.append(f"concurrency {cls.concurrency!r} is not a Concurrency")
    for attr in ("supported_write_flags", "supported_zero_flags"):
        if not isinstance(getattr(cls, attr, ReqFlags.NONE), ReqFlags):
            problems.append(f"{attr} must be ReqFlags")
    for meth in _METHODS:
        fn = getattr(cls, meth, None)
        if fn is not None and not inspect.iscoroutinefunction(fn):
            problems.append(f"{meth}() must be 'async def' (core awaits it)")
    if callable(getattr(cls, "pwritev", None)) != callable(getattr(cls, "flush", None)):
        problems.append("Writable needs both pwritev() and flush(); with one of them core treats the node as "
                        "read-only")
    caps = Capabilities.of(cls)
    if h.supports_truncate and not caps.truncate:
        problems.append("declares supports_truncate = True but does not implement Truncatable")
    if h.discard_reads_zero and not caps.discard:
        problems.append("declares discard_reads_zero = True but does not implement Discarder")
    if h.persistent and not h.stores_data:
        problems.append("declares persistent = True and stores_data = False")
    if problems:
        raise ContractViolation(f"driver '{h.driver}': " + "; ".join(problems))


# ---------------------------------------------------------------- the list, and a runner without pytest


CHECKS: dict[str, Callable[[Harness], Awaitable[None]]] = {
    "read_back_aligned": check_read_back_aligned,
    "read_back_unaligned": check_read_back_unaligned,
    "write_zeroes": check_write_zeroes,
    "discard": check_discard,
    "block_status": check_block_status,
    "flush": check_flush,
    "truncate": check_truncate,
    "out_of_range": check_out_of_range,
    "read_only": check_read_only,
    "concurrent": check_concurrent,
    "reopen": check_reopen,
    "live_reopen": check_live_reopen,
    "close_idempotent": check_close_idempotent,
    "option_errors": check_option_errors,
    "declared_capabilities": check_declared_capabilities,
}


FILTER_CHECKS: dict[str, Callable[[Harness], Awaitable[None]]] = {"filter_forwarding": check_filter_forwarding}


@attrs.frozen
class Outcome:
    check: str
    status: str  # passed, failed, skipped
    message: str = ""


async def run_checks(h: Harness, names: Sequence[str] | None = None) -> list[Outcome]:
    """Run checks (all by default) and report each as passed, failed or skipped (a CLI self-test)."""
    out = []
    for name in names or CHECKS:
        try:
            await {**CHECKS, **FILTER_CHECKS}[name](h)
        except NotApplicable as e:
            out.append(Outcome(name, "skipped", str(e)))
        except Exception as e:
            out.append(Outcome(name, "failed", f"{type(e).__name__}: {e}"))
        else:
            out.append(Outcome(name, "passed"))
    return out
