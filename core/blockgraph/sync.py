"""A synchronous facade for scripts and notebooks.

    with blockgraph.open("disk.img") as d:
        d.write(0, b"hello")
        data = d.read(0, 4096)

Each call runs on a private event loop owned by the facade, so it must not be
used from inside a running loop (use :class:`blockgraph.Session` there).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

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


def open(filename: str, fmt: str | None = None, **kw: Any) -> Image:  # mirrors builtins.open on purpose
    """Open an image for synchronous use; see :class:`Image`."""
    return Image(filename, fmt, **kw)
