"""What the ``blockgraph img`` subcommands share: running, opening images, progress, sizes.

Images are opened generically: the protocol comes from the filename prefix,
the format from ``-f`` or probing, and ``--image-opts`` takes QEMU's keyval
option syntax. Which permissions a subcommand takes and shares follows
qemu-img (only convert's sources refuse to share write; ``-U`` shares all).
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..errors import BlockGraphError, BlockIOError, DriverNotFound, ImageLocked
from .img_opts import PROG, ImgExit

if TYPE_CHECKING:
    from ..backend import BlockBackend
    from ..node import Node
    from ..plugins import PluginHost
    from ..session import Session



def report(*lines: str) -> None:
    """qemu's ``error_report``: one ``qemu-img: `` line each, on stderr."""
    for line in lines:
        sys.stderr.write(f"{PROG}: {line}\n")


def run(host: PluginHost, body: Callable[[Session], Awaitable[int]], *, error_code: int = 1) -> int:
    """Run ``body(session)`` on a fresh loop; errors become qemu-img's messages and exit codes."""
    from ..session import Session

    async def wrapper() -> int:
        session = Session(plugins=host, warn=lambda msg: print(msg, file=sys.stderr, flush=True))
        try:
            return await body(session)
        finally:
            try:
                await session.close()
            except BlockGraphError as e:
                report(str(e))

    try:
        code = asyncio.run(wrapper())
    except ImgExit as e:
        sys.stdout.flush()
        report(*e.lines)
        if e.usage:
            sys.stderr.write(f"Try '{PROG} --help' for more information\n")
        code = e.code
    except BlockGraphError as e:
        sys.stdout.flush()
        report(str(e))
        code = error_code
    sys.stdout.flush()
    return code


# ---------------------------------------------------------------- cache modes

CACHE_MODES = {  # mode -> (write cache, cache.direct, cache.no-flush)
    "writeback": (True, False, False), "none": (True, True, False), "off": (True, True, False),
    "writethrough": (False, False, False), "directsync": (False, True, False),
    "unsafe": (True, False, True),
}


def cache_mode(mode: str, message: str = "Invalid cache option: {0}") -> tuple[bool, bool, bool]:
    try:
        return CACHE_MODES[mode]
    except KeyError:
        raise ImgExit(message.format(mode)) from None


# ---------------------------------------------------------------- opening

def image_opts_filename(text: str) -> str:
    """``--image-opts`` keyval text as a ``json:`` filename (QEMU's implied key is ``file``)."""
    from ..options import parse_keyval

    return "json:" + json.dumps(parse_keyval(text, implied_key="file"))


async def open_node(session: Session, filename: str, *, fmt: str | None = None, image_opts: bool = False,
                    read_only: bool = True, force_share: bool = False, cache: str = "writeback",
                    unmap: bool = False, options: dict[str, Any] | None = None, code: int = 1) -> Node:
    """Open ``filename`` as qemu-img does; failures become ``Could not open 'F': reason``."""
    if image_opts and fmt:
        raise ImgExit("--image-opts and --format are mutually exclusive", code)
    _, direct, no_flush = cache_mode(cache)
    name = filename
    if image_opts:
        try:
            filename = image_opts_filename(filename)
        except BlockGraphError as e:
            raise ImgExit(str(e), code) from None
    if force_share and not read_only:
        raise ImgExit(f"Could not open '{name}': force-share=on can only be used with read-only images", code)
    try:
        return await session.open_image(filename, fmt=fmt, options=options, read_only=read_only,
                                        force_share=force_share,
                                        cache_direct=direct, no_flush=no_flush,
                                        discard="unmap" if unmap else None)
    except DriverNotFound as e:
        if e.dist is None:
            raise ImgExit(f"Could not open '{name}': Unknown driver '{e.driver}'", code) from None
        raise ImgExit(f"Could not open '{name}': {e}", code) from None
    except ImageLocked as e:
        raise ImgExit(_locked(name, e), code) from None
    except BlockGraphError as e:
        raise ImgExit(f"Could not open '{name}': {e}", code) from None


def _locked(name: str, e: Exception) -> str:
    """QEMU's lock refusal, hint line included (qemu-img 7.2 suggests no -U)."""
    return f"Could not open '{name}': {e}"


async def open_backend(session: Session, filename: str, *, fmt: str | None = None, image_opts: bool = False,
                       read_only: bool = True, force_share: bool = False, share_all: bool = True,
                       cache: str = "writeback", resize: bool = False, unmap: bool = False,
                       options: dict[str, Any] | None = None, code: int = 1) -> BlockBackend:
    """An image with a BlockBackend on top, taking the permissions qemu-img's ``blk_new_open`` takes."""
    from ..backend import BlockBackend
    from ..node import close_node

    write_cache, _, _ = cache_mode(cache)
    node = await open_node(session, filename, fmt=fmt, image_opts=image_opts, read_only=read_only,
                           force_share=force_share, cache=cache, unmap=unmap, options=options, code=code)
    try:
        return await BlockBackend.attach_new(session, node, read_only=read_only,
                                             share_all=share_all or force_share, write_cache=write_cache,
                                             resize=resize)
    except ImageLocked as e:
        await close_node(node)
        raise ImgExit(_locked(filename, e), code) from None
    except BlockGraphError as e:
        await close_node(node)
        reason = e.strerror if isinstance(e, BlockIOError) else e  # bdrv_check_perm's bare "Block node is read-only"
        raise ImgExit(f"Could not open '{filename}': {reason}", code) from None


def format_class(session: Session, fmt: str, *, prefix: str = "") -> type:
    """The driver class for ``fmt``; qemu-img's ``Unknown file format`` when nobody provides it."""
    try:
        return session.registry.driver(fmt)
    except DriverNotFound as e:
        if e.dist is None:
            raise ImgExit(f"{prefix}Unknown file format '{fmt}'") from None
        raise ImgExit(f"{prefix}{e}") from None


def protocol_class(session: Session, filename: str, *, prefix: str = "") -> type:
    try:
        proto = session.registry.protocol_for(filename) or "file"
        return session.registry.driver(proto)
    except BlockGraphError as e:
        raise ImgExit(f"{prefix}{e}") from None


async def create_image(session: Session, fmt_cls: type, filename: str, options: Any) -> None:
    """Create an image through the driver's ``create`` classmethod, in its own open/close."""
    await fmt_cls.create(session, filename, options)


def same_file_guard(out: str, nodes: list[Node], prefix: str) -> None:
    """Refuse to create ``out`` over an image this command has open (its creation would truncate it).

    qemu-img gets this refusal from the file driver's locks at creation time.
    """
    import os

    for node in nodes:
        cur, depth = node, 0
        while cur is not None and depth < 16:
            path = cur.filename
            try:
                if path and os.path.exists(out) and os.path.samefile(path, out):
                    raise ImgExit(f"{prefix}Failed to get \"write\" lock\n"
                                  f"Is another process using the image [{out}]?")
            except OSError:
                pass
            child = cur.file or cur.primary()
            cur = child.node if child is not None else None
            depth += 1


def allocated_size(node: Node) -> int | None:
    """Bytes the image occupies on its host storage (qemu's ``actual-size``), when known."""
    import os

    seen = 0
    while node is not None and seen < 64:
        seen += 1
        getter = getattr(node.driver, "allocated_size", None)
        if callable(getter):
            return getter()
        fd = getattr(node.driver, "fd", None)
        if node.kind.value == "protocol" and isinstance(fd, int) and fd >= 0:
            try:
                return os.fstat(fd).st_blocks * 512
            except OSError:
                return None
        child = node.file or node.primary()
        node = child.node if child is not None else None
    return None


# ---------------------------------------------------------------- progress

def f32(x: float) -> float:
    """Round to a C ``float``, as qemu's progress state is kept in one."""
    return struct.unpack("f", struct.pack("f", x))[0]


class Progress:
    """qemu's progress meter: ``    (NN.NN/100%)\\r`` on stdout, a newline at the end.

    Disabled, it still answers SIGUSR1 with one line on stderr, as qemu-img does.
    """

    def __init__(self, enabled: bool, min_skip: float) -> None:
        self.enabled, self.min_skip = enabled, f32(min_skip)
        self.current = self.last = 0.0
        self.pending = False
        self._old = None
        if not enabled and hasattr(signal, "SIGUSR1"):
            try:
                self._old = signal.signal(signal.SIGUSR1, self._on_signal)
            except ValueError:  # not the main thread
                self._old = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending = True

    def print(self, delta: float, maximum: int = 0) -> None:
        if maximum == 0:
            current = f32(delta)
        else:
            current = f32(self.current + f32(f32(f32(delta) / 100) * maximum))
        current = min(current, 100.0)
        self.current = current
        if (current > f32(self.last + self.min_skip) or current < f32(self.last - self.min_skip)
                or current == 100 or current == 0):
            self.last = current
            if self.enabled:
                sys.stdout.write(f"    ({current:3.2f}/100%)\r")
                sys.stdout.flush()
        if self.pending:
            self.pending = False
            sys.stderr.write(f"    ({self.current:3.2f}/100%)\n")

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()
        elif self._old is not None:
            signal.signal(signal.SIGUSR1, self._old)
            self._old = None


def qprint(quiet: bool, text: str) -> None:
    if not quiet:
        sys.stdout.write(text + "\n")


def size_to_str(n: int) -> str:
    """QEMU's ``size_to_str``: three significant digits; the unit switches once the value reaches 1000."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = 0
    while i < len(units) - 1 and n * 1024 >= 1000 * (1 << (10 * (i + 1))):
        i += 1
    return f"{n / (1 << (10 * i)):0.3g} {units[i]}"
