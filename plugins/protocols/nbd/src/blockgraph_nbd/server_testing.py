"""An NBD server on a background thread: for tests and scripts that drive it with real clients.

>>> with ServerThread(tmp / "srv.sock") as srv:
...     srv.export("disk.raw", name="", writable=True)
...     subprocess.run(["nbdinfo", srv.uri()])
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from blockgraph.session import Session

from .server import NbdServer
from .server_export import NbdExport, new_export


class ServerThread:
    """One Session and one NbdServer on a loop in a daemon thread, listening on a unix socket (or TCP)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, bind: str = "127.0.0.1",
                 max_connections: int = 0, stall_timeout: float | None = 60.0,
                 handshake_timeout: float | None = 10.0, host: Any = None) -> None:
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        self.bind, self.plugins = bind, host
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nbd-server", daemon=True)
        self._opts = {"max_connections": max_connections, "stall_timeout": stall_timeout,
                      "handshake_timeout": handshake_timeout}
        self.session: Session | None = None
        self.server: NbdServer | None = None

    # ------------------------------------------------------------ running things on the loop

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float = 60, **kw: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(*args, **kw), self.loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()

        async def setup() -> None:
            self.session = Session(plugins=self.plugins)
            self.server = NbdServer(**self._opts)
            if self.socket_path is not None:
                await self.server.listen({"type": "unix", "path": self.socket_path})
            else:
                await self.server.listen({"type": "inet", "host": self.bind, "port": "0"})

        self.call(setup)
        return self

    def export(self, filename: str | os.PathLike[str], *, fmt: str = "raw", name: str = "", writable: bool = False,
               description: str = "", allocation_depth: bool = False, **open_kw: Any) -> NbdExport:
        async def add() -> NbdExport:
            assert self.session is not None and self.server is not None
            node = await self.session.open_image(os.fspath(filename), fmt=fmt, read_only=not writable, **open_kw)
            exp = await new_export(self.session, node, name=name, description=description, writable=writable,
                                   allocation_depth=allocation_depth)
            self.server.add_export(exp)
            return exp

        return self.call(add)

    def export_node(self, spec: dict[str, Any], *, name: str = "", writable: bool = False,
                    **export_kw: Any) -> NbdExport:
        """Export a node opened from an option tree (any driver, including test-only ones)."""
        async def add() -> NbdExport:
            assert self.session is not None and self.server is not None
            node = await self.session.open_node(dict(spec))
            exp = await new_export(self.session, node, name=name, writable=writable, **export_kw)
            self.server.add_export(exp)
            return exp

        return self.call(add)

    def uri(self, name: str = "") -> str:
        if self.socket_path is not None:
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        assert self.server is not None
        return f"nbd://{self.bind}:{self.server.port}/{name}"

    def client_count(self) -> int:
        assert self.server is not None
        return len(self.server.clients)

    def stop(self) -> None:
        async def teardown() -> None:
            if self.server is not None:
                await self.server.close()
            if self.session is not None:
                await self.session.close()

        if self._thread.is_alive():
            try:
                self.call(teardown)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
