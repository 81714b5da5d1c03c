"""The state one ``blockgraph io`` run works on: the session, the open image, the aio requests in flight.

Opening follows qemu-io: a BlockBackend that shares every permission (other users may write too),
``discard=unmap``, writethrough unless a cache mode says otherwise, and qemu-io's error lines.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from ..backend import BlockBackend
from ..driver import DriverKind
from ..errors import BlockGraphError, BlockIOError, ImageLocked, OptionError
from ..options import merge
from ..perms import Perm
from ..session import Session
from .common import parse_cache_mode

PROG = "qemu-io"  # error lines read as qemu-io's, so that scripts matching them keep working
LOCK_HINT = ("Use -U (--force-share) together with -r to open the image read-only while the other "
             "process uses it.")
CACHE_MODES = ("writeback", "none", "off", "writethrough", "directsync", "unsafe")
DISCARD_MODES = {"off": "ignore", "ignore": "ignore", "on": "unmap", "unmap": "unmap"}
AIO_MODES = ("threads", "native", "io_uring")

CommandFn = Callable[["IoState", str, list[str]], Awaitable[bool]]
COMMANDS: dict[str, CommandFn] = {}


def command(name: str) -> Callable[[CommandFn], CommandFn]:
    """Register ``fn`` as the implementation of qemu-io command ``name``."""

    def register(fn: CommandFn) -> CommandFn:
        COMMANDS[name] = fn
        return fn

    return register


def out(*lines: str) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")


def err(*lines: str) -> None:
    sys.stdout.flush()
    for line in lines:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def error_report(message: str) -> None:
    """An error as qemu's error_report prints it: ``qemu-io: message`` on stderr."""
    err(f"{PROG}: {message}")


@attrs.frozen(kw_only=True)
class OpenFlags:
    """What ``-r -U -t -n -d -i -k -s -C`` ask for (on the command line or the ``open`` command)."""

    read_only: bool = False
    force_share: bool = False
    cache: str = "writethrough"  # qemu-io's default: every write is a FUA write
    discard: str = "unmap"
    aio: str = "threads"
    snapshot: bool = False
    copy_on_read: bool = False


def check_cache(mode: str) -> None:
    if mode not in CACHE_MODES:
        raise BlockGraphError(f"Invalid cache option: {mode}")


def check_discard(mode: str) -> str:
    if mode not in DISCARD_MODES:
        raise BlockGraphError(f"Invalid discard option: {mode}")
    return DISCARD_MODES[mode]


def check_aio(mode: str) -> None:
    if mode not in AIO_MODES:
        raise BlockGraphError(f"Invalid aio option: {mode}")


def open_failure(e: BaseException) -> str:
    """The text after ``can't open device X:`` for an error raised while opening."""
    if isinstance(e, BlockIOError):
        return e.strerror
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


@attrs.define
class IoState:
    """One qemu-io session: at most one open image, and the aio requests still running."""

    session: Session
    blk: BlockBackend | None = None
    pending: set[asyncio.Task] = attrs.Factory(set)
    failed: bool = False
    quit: bool = False

    @property
    def writable(self) -> bool:
        blk = self.blk
        return blk is not None and not blk.read_only and bool(blk.perm & Perm.WRITE)

    def start(self, coro: Awaitable[object]) -> asyncio.Task:
        """Run an aio request as its own task, so that several are in flight at once."""
        async def guarded() -> None:
            try:
                await coro
            except Exception as e:  # an aio request has no caller left to raise to
                error_report(f"aio request failed: {type(e).__name__}: {e}")

        task = asyncio.ensure_future(guarded())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task

    async def drain_aio(self) -> None:
        """Wait for every aio request (their completions print as they arrive)."""
        while self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)
        if self.blk is not None and self.blk.root is not None:
            await self.blk.drain()

    async def open(self, name: str | None, options: dict[str, Any], flags: OpenFlags) -> bool:
        """Open an image as qemu-io's ``openfile`` does; print its error lines and return False on failure."""
        if self.blk is not None:
            error_report("file open already, try 'help close'")
            return False
        options = dict(options)
        if flags.force_share:
            given = options.get("force-share")
            if given is not None and str(given).lower() not in ("on", "true", "yes"):
                error_report("-U conflicts with image options")
                return False
        where = f" device {name}" if name is not None else ""
        try:
            self.blk = await self._open_backend(name, options, flags)
        except ImageLocked as e:
            error_report(f"can't open{where}: {e}")
            err(LOCK_HINT)
            return False
        except (BlockGraphError, OSError) as e:
            error_report(f"can't open{where}: {open_failure(e)}")
            return False
        self.blk.copy_on_read = flags.copy_on_read
        return True

    async def _open_backend(self, name: str | None, options: dict[str, Any], flags: OpenFlags) -> BlockBackend:
        if flags.force_share and not flags.read_only:
            raise OptionError("force-share=on can only be used with read-only images")
        if flags.snapshot:
            self.session.registry.driver("qcow2")  # says which distribution to install when it is missing
        if flags.copy_on_read and flags.read_only:
            raise OptionError("Can't use copy-on-read on read-only device")
        cache = parse_cache_mode(flags.cache)
        fmt = options.pop("driver", None)
        if name is None and fmt is None:
            # No driver: the format is probed on the file the options name (as QEMU does), and the
            # probing warning names that file.
            file_opts = options.get("file")
            if isinstance(options.get("filename"), str):
                name = options.pop("filename")
            elif isinstance(file_opts, dict) and isinstance(file_opts.get("filename"), str):
                name = file_opts["filename"]
        if name is None:
            filename = "json:" + json.dumps({**options, **({"driver": fmt} if fmt else {})})
            fmt, options = None, {}
        else:
            filename = name
        kw = {"fmt": fmt, "read_only": flags.read_only, "force_share": flags.force_share, "share_all": True,
              "write_cache": cache["write_cache"], "cache_direct": cache["cache_direct"],
              "no_flush": cache["no_flush"], "discard": flags.discard}
        with_aio = self._with_aio(filename, fmt, options, flags.aio) if flags.aio != "threads" else options
        if flags.snapshot:
            return await self._open_snapshot(filename, options, kw)
        if with_aio is options:
            return await self.session.open_backend(filename, options=options, **kw)
        if flags.aio == "native" and not cache["cache_direct"]:
            raise OptionError("aio=native was specified, but it requires cache.direct=on, which was not specified.")
        try:
            return await self.session.open_backend(filename, options=with_aio, **kw)
        except OptionError as e:
            if e.option != "aio":
                raise
            # An engine no installed plugin provides: qemu-io scripts keep working on the thread pool.
            error_report(f"warning: {e.reason}; using aio=threads")
            return await self.session.open_backend(filename, options=options, **kw)

    async def _open_snapshot(self, filename: str, options: dict[str, Any], kw: dict[str, Any]) -> BlockBackend:
        """-s: writes go to a temporary qcow2 overlay; the image itself is opened read-only (BDRV_O_SNAPSHOT)."""
        from ..cmdline.open import open_temp_snapshot
        from ..node import close_node

        base = await self.session.open_image(filename, fmt=kw["fmt"], options=options, read_only=True,
                                             cache_direct=kw["cache_direct"], discard=kw["discard"])
        try:
            top = await open_temp_snapshot(self.session, base)
        except BaseException:
            await close_node(base)
            raise
        return await BlockBackend.attach_new(self.session, top, read_only=kw["read_only"], share_all=True,
                                             write_cache=kw["write_cache"])

    def _with_aio(self, filename: str, fmt: str | None, options: dict[str, Any], aio: str) -> dict[str, Any]:
        """``-i``/``-k`` select the file protocol's I/O engine; other protocols ignore it (as in QEMU)."""
        if filename.startswith("json:"):
            return options
        registry = self.session.registry
        if fmt is not None and registry.driver_entry(fmt).meta["kind"] is DriverKind.PROTOCOL:
            return merge(options, {"aio": aio}) if fmt == "file" else options
        if registry.protocol_for(filename) not in (None, "file"):
            return options
        return merge(options, {"file": {"aio": aio}})

    async def close(self) -> None:
        """Wait for aio requests, then close the image (flushing what was written)."""
        await self.drain_aio()
        blk, self.blk = self.blk, None
        if blk is not None:
            await blk.close()
