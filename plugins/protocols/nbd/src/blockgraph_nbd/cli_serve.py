"""The running half of ``blockgraph nbd``: listen, open the image, export it, wait.

The order is qemu-nbd's: bind first (a busy port fails before the image is
touched), then open, then serve until the last client leaves (unless ``-t``) or
SIGTERM/SIGINT, and flush everything on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from blockgraph.errors import BlockGraphError, DriverNotFound
from blockgraph.session import Session

from . import activation
from .cli import NbdExit
from .server import NbdServer
from .server_export import new_export

if TYPE_CHECKING:
    from blockgraph.node import Node

    from .cli import Config


def serve(cfg: Config, host: Any, saved_stderr: int | None) -> int:
    return asyncio.run(_serve(cfg, host, saved_stderr))


async def _serve(cfg: Config, host: Any, saved_stderr: int | None) -> int:
    session = Session(plugins=host, warn=lambda msg: print(msg, file=sys.stderr))
    server = NbdServer(max_connections=cfg.shared)
    stop = asyncio.Event()
    pid_written = False
    try:
        await _listen(server, cfg)
        if cfg.image_opts and cfg.fmt:
            raise NbdExit("--image-opts and -f are mutually exclusive")
        node = await _open(session, cfg)
        try:
            exp = await new_export(session, node, name=cfg.export_name, description=cfg.description,
                                   writable=not cfg.read_only, writethrough=cfg.writethrough,
                                   allocation_depth=cfg.allocation_depth, bitmaps=tuple(cfg.bitmaps),
                                   export_id="qemu-nbd-export")
        except BlockGraphError as e:
            raise NbdExit(getattr(e, "reason", str(e))) from None
        server.add_export(exp)

        def client_closed(_client: Any, negotiated: bool) -> None:
            if negotiated and not server.clients and not cfg.persistent:
                stop.set()

        server.on_client_closed = client_closed
        server.accept()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        if cfg.pid_file:
            _write_pid_file(cfg.pid_file)
            pid_written = True
        if saved_stderr is not None:  # --fork: closing the pipe tells the parent we are up
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
        await stop.wait()
        return 0
    finally:
        await server.close()
        await session.close()
        if pid_written:
            with contextlib.suppress(OSError):
                os.unlink(cfg.pid_file)


async def _listen(server: NbdServer, cfg: Config) -> None:
    """Bind the address the options name, or take the listening socket systemd handed over at fd 3."""
    if cfg.activation:
        try:
            server.adopt(socket.socket(fileno=activation.FIRST_FD))
        except OSError as e:
            raise NbdExit("Failed to use socket activation: Unable to query remote socket address: "
                          f"{os.strerror(e.errno or 0)}") from None
        return
    try:
        await server.listen(cfg.address(), accept=False)
    except BlockGraphError as e:
        raise NbdExit(str(e)) from None


def _write_pid_file(path: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        raise NbdExit(f"Cannot open pid file: {e.strerror}") from None


async def _open(session: Session, cfg: Config) -> Node:
    """The node to export: the image (``-f``, cache and discard modes), with ``-s`` / ``-l`` / ``-o`` applied."""
    filename = cfg.filename
    if cfg.image_opts:
        from blockgraph.cli.img_util import image_opts_filename

        try:
            filename = image_opts_filename(cfg.filename)
        except BlockGraphError as e:
            raise NbdExit(str(e)) from None
    options: dict[str, Any] = {}
    if cfg.detect_zeroes != "off":
        options["detect-zeroes"] = cfg.detect_zeroes
    if cfg.aio is not None:
        options["file"] = {"aio": cfg.aio}
    try:
        node = await session.open_image(filename, fmt=cfg.fmt, options=options,
                                        read_only=cfg.read_only or cfg.snapshot, cache_direct=cfg.cache_direct,
                                        no_flush=cfg.no_flush, discard=cfg.discard)
    except BlockGraphError as e:
        raise NbdExit(f"Failed to blk_new_open '{cfg.filename}': {e}") from None
    if cfg.snapshot:
        node = await _temporary_overlay(session, node, cfg)
    if cfg.load_snapshot is not None:
        raise NbdExit(f"Failed to load snapshot: Block format '{node.driver_name}' used by device '' does not "
                      "support temporarily loading internal snapshots")
    if cfg.offset:
        try:
            node = await session.open_node({"driver": "raw", "file": node.name, "offset": cfg.offset,
                                            "read-only": cfg.read_only})
        except BlockGraphError as e:
            raise NbdExit(str(e)) from None
    return node


async def _temporary_overlay(session: Session, base: Node, cfg: Config) -> Node:
    """``-s``: writes go to a qcow2 file in the temporary directory, deleted once open (bdrv_append_temp_snapshot)."""
    try:
        cls = session.registry.driver("qcow2")
    except DriverNotFound as e:
        raise NbdExit(f"--snapshot needs a temporary qcow2 overlay, but {e}") from None
    if not callable(getattr(cls, "create", None)):
        raise NbdExit("--snapshot needs a temporary qcow2 overlay, but the installed blockgraph-qcow2 "
                      "cannot create images")
    from blockgraph.cli.img_create import img_create
    from blockgraph.cli.img_opts import ImgExit

    fd, path = tempfile.mkstemp(prefix="vl.", dir=os.environ.get("TMPDIR", "/var/tmp"))
    os.close(fd)
    try:
        backing = base.filename if base.filename.startswith(("/", "json:")) or ":" in base.filename \
            else os.path.abspath(base.filename)
        try:
            await img_create(session, path, "qcow2", None, base.length, backing=backing,
                             backing_fmt=base.driver_name, unsafe=True, quiet=True)
            return await session.open_image(path, fmt="qcow2", options={"backing": base.name})
        except ImgExit as e:
            raise NbdExit(*e.lines) from None
        except BlockGraphError as e:
            raise NbdExit(f"Could not create temporary overlay '{path}': {e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
