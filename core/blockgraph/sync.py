"""A synchronous facade for scripts and notebooks.

    with blockgraph.open("disk.qcow2") as d:
        d.write(0, b"hello")
        data = d.read(0, 4096)
        for e in d.extents():           # qemu-img map --output=json, as Extent records
            ...
        d.info()                        # qemu-img info --output=json, as a dict
        shutil.copyfileobj(d.as_file(), out)   # a seekable io.RawIOBase over the image

Positions are explicit (``read(offset, length)``); ``as_file()`` adds a cursor for code that wants a file.
``read_only=True`` writes nothing to the image: a dirty qcow2 (lazy refcounts, writer killed) is read as
it is and its refcounts are left for a read-write open to repair, as QEMU does.

Each call runs on a private event loop owned by the facade, so it must not be
used from inside a running loop (use :class:`blockgraph.Session` there).
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import sys
from collections.abc import AsyncIterator, Coroutine, Generator, Iterator
from typing import Any, Literal, NamedTuple, TypeVar, overload

from .backend import BlockBackend
from .driver import BlockStatus, PreallocMode
from .session import Session

T = TypeVar("T")


class _Resume:
    """Continues, inside a task, a coroutine that :meth:`Image._run` started and that suspended on ``first``.

    ``__await__`` is PEP 380's expansion of ``yield from`` for an iterator that already yielded once.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, Any]:
        it = self.coro.__await__()
        out = self.first
        while True:
            try:
                sent = yield out
            except GeneratorExit:
                it.close()
                raise
            except BaseException as e:  # cancellation or an error thrown by the task: forward it
                try:
                    out = it.throw(e)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    out = it.send(sent)
                except StopIteration as stop:
                    return stop.value


_DIRECT_MIN = 256 * 1024  # below this, copying the result costs less than the ctypes set-up
_new_bytes: Any = None
_view_of: Any = None


def _fresh_bytes(n: int) -> tuple[bytes, memoryview] | None:
    """A new, not yet shared ``bytes`` of ``n`` bytes and a writable view of its contents (CPython only).

    This is the C API's ``PyBytes_FromStringAndSize(NULL, n)`` then fill: ``read`` returns ``bytes``, and
    reading into a bytearray then copying it costs a second pass over every byte of a large read.
    """
    global _new_bytes, _view_of
    if n < _DIRECT_MIN or sys.implementation.name != "cpython":
        return None
    if _new_bytes is None:
        import ctypes

        api = ctypes.pythonapi
        new, view = api.PyBytes_FromStringAndSize, api.PyMemoryView_FromMemory
        new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
        view.restype, view.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
        _new_bytes, _view_of = new, view
    b = _new_bytes(None, n)
    # ob_sval starts one byte before the end of the fixed part; 0x200 is PyBUF_WRITE.
    return b, _view_of(id(b) + bytes.__basicsize__ - 1, n, 0x200)


async def _finish(coro: Coroutine[Any, Any, T], first: Any) -> T:
    return await _Resume(coro, first)


class Image:
    """An open image: a session, a node tree and a BlockBackend, driven synchronously."""

    def __init__(self, filename: str, fmt: str | None = None, *, read_only: bool = False,
                 options: dict[str, Any] | None = None, force_share: bool = False) -> None:
        self.session: Session | None = None
        self.filename = os.fspath(filename)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("blockgraph.open() cannot be called from a running event loop; "
                               "use blockgraph.Session there")
        self._runner = asyncio.Runner()
        self.blk: BlockBackend | None = None
        try:
            self.session = Session()
            self.blk = self._runner.run(self.session.open_backend(
                filename, fmt=fmt, read_only=read_only, force_share=force_share, share_all=True,
                options=options))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            self._runner.run(session.close())
        self._runner.close()

    @property
    def length(self) -> int:
        return self.blk.getlength()

    @property
    def format(self) -> str:
        return self.blk.node.driver_name

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion on the facade's loop.

        Most requests never wait (page-cache hits are served inline, metadata comes from caches), so
        the first step runs right here, with the loop marked as running; only a request that suspends
        goes on in a task on the loop. ``Runner.run`` for every call costs about 100 us (a task, two
        loop iterations, SIGINT handler swaps), ten times a cached 4 KiB read.
        """
        if asyncio._get_running_loop() is not None:
            coro.close()
            raise RuntimeError("blockgraph.Image cannot be used from a running event loop; use blockgraph.Session")
        loop = self._runner.get_loop()
        asyncio._set_running_loop(loop)
        try:
            first = coro.send(None)
        except StopIteration as stop:
            return stop.value
        finally:
            asyncio._set_running_loop(None)
        return self._runner.run(_finish(coro, first))

    def read(self, offset: int, length: int) -> bytes:
        fresh = _fresh_bytes(length)
        if fresh is not None:
            out, view = fresh
            with view:
                self._run(self.blk.preadv(offset, view))
            return out
        buf = bytearray(length)
        self._run(self.blk.preadv(offset, memoryview(buf)))
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        self._run(self.blk.preadv(offset, memoryview(buf)))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._run(self.blk.pwritev(offset, memoryview(data)))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._run(self.blk.pwrite_zeroes(offset, length))

    def discard(self, offset: int, length: int) -> None:
        self._run(self.blk.pdiscard(offset, length))

    def flush(self) -> None:
        self._runner.run(self.blk.flush())

    def truncate(self, length: int, prealloc: str = "off") -> None:
        self._runner.run(self.blk.truncate(length, prealloc=PreallocMode(prealloc)))

    def block_status(self, offset: int, length: int) -> BlockStatus:
        return self._run(self.blk.block_status(offset, length))[0]

    def extents(self, start: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents of ``[start, start + length)`` as ``qemu-img map --output=json`` lists them.

        Neighbours that agree are merged; ``depth`` counts backing layers down to the one that answers. Built on
        the code of ``blockgraph img map``; only the empty extent qemu-img prints past the end is left out.
        Lazy: block status is asked as the iteration goes on.
        """
        from .cli.img_map import map_entries

        entries = map_entries(self.blk.node, start, length)
        try:
            while True:
                step = self._run(_next(entries))
                if step is None:
                    return
                e = step[0]
                if e.length > 0:
                    yield Extent(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset)
        finally:
            if self.session is not None:
                self._run(entries.aclose())

    @overload
    def info(self, backing_chain: Literal[False] = False) -> dict[str, Any]: ...
    @overload
    def info(self, backing_chain: Literal[True]) -> list[dict[str, Any]]: ...

    def info(self, backing_chain: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
        """What ``qemu-img info --output=json [--backing-chain]`` prints, parsed: a dict, or a list of them.

        A plain dict with qemu-img's keys (``virtual-size``, ``format-specific``...) rather than dataclasses:
        the content is QEMU's ImageInfo schema, open-ended per driver, and the CLI builds exactly this dict, so
        a class would only restate the schema and drift from it.
        """
        from .cli.img_info import chain_info

        infos = self._run(chain_info(self.blk.node, self.filename, chain=backing_chain))
        return infos if backing_chain else infos[0]

    def as_file(self) -> ImageFile:
        """A new seekable binary file over the image, positioned at 0; see :class:`ImageFile`."""
        return ImageFile(self)


class Extent(NamedTuple):
    """One entry of ``qemu-img map --output=json``; ``offset`` (host offset in the file) is None where qemu-img
    omits it. ``_asdict()`` gives qemu-img's keys in its order."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None


async def _next(entries: AsyncIterator[T]) -> T | None:
    try:
        return await entries.__anext__()
    except StopAsyncIteration:
        return None


class ImageFile(io.RawIOBase):
    """A cursor over an open :class:`Image`: ``seek``/``tell``/``read``/``readinto``/``write``/``truncate``.

    ``Image.as_file()`` rather than a ``mode=`` on ``blockgraph.open``: the image (its open, lock and caches)
    stays one object with positional I/O, any number of cursors can share it, and builtins.open's text and
    buffering modes, meaningless for a disk, need no equivalent. Closing the file leaves the image open.

    Unbuffered like ``FileIO``; wrap it in ``io.BufferedReader`` for small reads. Reads stop at the image's
    end (``b""`` there, as for files). An image does not grow by writing: a write that would pass the end
    fails with ENOSPC, as on a block device, and writes nothing; ``truncate(size)`` resizes the image.
    """

    def __init__(self, image: Image) -> None:
        super().__init__()
        self._image = image
        self._pos = 0
        self.name = image.filename
        self.mode = "rb" if image.blk.read_only else "r+b"

    def __repr__(self) -> str:
        return f"<blockgraph.sync.ImageFile name={self.name!r} mode={self.mode!r}>"

    def _check(self) -> Image:
        if self.closed or self._image.session is None:
            raise ValueError("I/O operation on closed file")
        return self._image

    def readable(self) -> bool:
        self._check()
        return True

    def writable(self) -> bool:
        return not self._check().blk.read_only

    def seekable(self) -> bool:
        self._check()
        return True

    def tell(self) -> int:
        self._check()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        image = self._check()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = image.length + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self._pos = pos
        return pos

    def _span(self, want: int) -> int:
        """How many of ``want`` bytes from the position lie inside the image."""
        return max(0, min(want, self._check().length - self._pos))

    def readinto(self, buf: Any) -> int:
        with memoryview(buf) as view, view.cast("B") as flat:
            n = self._span(len(flat))
            if n:
                self._image.readinto(self._pos, flat[:n])
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        n = self._span(size)
        data = self._image.read(self._pos, n) if n else b""
        self._pos += n
        return data

    def readall(self) -> bytes:
        return self.read(self._span(self._check().length))

    def write(self, buf: Any) -> int:
        if not self.writable():
            raise io.UnsupportedOperation("File not open for writing")
        with memoryview(buf) as view, view.cast("B") as flat:
            n = len(flat)
            if self._pos + n > self._image.length:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
            if n:
                self._image.write(self._pos, flat)
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        if not self.writable():
            raise io.UnsupportedOperation("File not open for writing")
        size = self._pos if size is None else size
        if size < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if size != self._image.length:
            self._image.truncate(size)
        return size

    def flush(self) -> None:
        super().flush()  # ValueError once closed, as for any file
        if self._image.session is not None and not self._image.blk.read_only:
            self._image.flush()


def open(filename: str, fmt: str | None = None, **kw: Any) -> Image:  # mirrors builtins.open on purpose
    """Open an image for synchronous use; see :class:`Image`."""
    return Image(filename, fmt, **kw)
