"""Commands on named BlockBackends and exports, run in-process on a Daemon (fast, no subprocess)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from blockgraph import hookimpl
from blockgraph.daemon import Daemon
from blockgraph.errors import BlockIOError
from blockgraph.plugins import PluginHost
from blockgraph.qmp import QMPError
from blockgraph.session import Session

MiB = 1 << 20


class FakeExport:
    type = "fake"

    def __init__(self, options: dict[str, Any]) -> None:
        self.id, self.node_name = options["id"], options["node-name"]
        self.shutting_down = False
        self.deleted: str | None = None

    @classmethod
    async def create(cls, daemon: Any, options: dict[str, Any]) -> FakeExport:
        if options.get("refuse"):
            raise QMPError("fake export refused")
        return cls(options)

    async def delete(self, mode: str) -> None:
        self.deleted = mode


class FakePlugin:
    @hookimpl
    def blockgraph_register_exports(self, register: Any) -> None:
        register(FakeExport, name="fake")

    @hookimpl
    def blockgraph_register_qmp_commands(self, register: Any) -> None:
        register(lambda daemon, args: {"echo": args["word"]}, name="x-echo", args={"word": "str"})


def run(body: Callable[[Daemon], Awaitable[Any]], *, host: PluginHost | None = None) -> Any:
    async def main() -> Any:
        h = host or PluginHost(extra=[(FakePlugin(), "fake")])
        session = Session(plugins=h)
        daemon = Daemon(h, session)
        try:
            return await body(daemon)
        finally:
            await daemon.close()

    return asyncio.run(main())


async def call(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> Any:
    return await daemon.qmp.commands[name].run(daemon, args or {})


async def error_of(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> tuple[str, str]:
    with pytest.raises(QMPError) as e:
        await call(daemon, name, args)
    return e.value.cls, e.value.desc


def image(tmp_path: Path) -> str:
    path = tmp_path / "d.raw"
    with open(path, "wb") as f:
        f.truncate(MiB)
    return str(path)


def test_query_block_lists_named_backends_with_their_root(tmp_path: Path) -> None:
    async def body(d: Daemon) -> Any:
        await d.session.open_backend(image(tmp_path), fmt="raw", name="drive0", write_cache=False)
        return await call(d, "query-block"), await call(d, "query-blockstats")

    blocks, stats = run(body)
    assert len(blocks) == 1
    b = blocks[0]
    assert (b["device"], b["locked"], b["removable"], b["type"]) == ("drive0", False, True, "unknown")
    ins = b["inserted"]
    assert (ins["drv"], ins["file"], ins["ro"]) == ("raw", str(tmp_path / "d.raw"), False)
    assert ins["cache"]["writeback"] is False
    assert stats[0]["device"] == "drive0" and stats[0]["stats"]["account_invalid"] is True


def test_block_set_io_throttle_is_stored_and_reported(tmp_path: Path) -> None:
    async def body(d: Daemon) -> Any:
        await d.session.open_backend(image(tmp_path), fmt="raw", name="drive0")
        limits = {"device": "drive0", "bps": 1000000, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0,
                  "iops_wr": 0, "bps_max": 2000000}
        await call(d, "block_set_io_throttle", limits)
        on = (await call(d, "query-block"))[0]["inserted"]
        bad = await error_of(d, "block_set_io_throttle", {**limits, "bps_rd": 5})
        both = await error_of(d, "block_set_io_throttle", {**limits, "id": "drive0"})
        await call(d, "block_set_io_throttle", {**limits, "bps": 0, "bps_max": 0})
        off = (await call(d, "query-block"))[0]["inserted"]
        return on, bad, both, off

    on, bad, both, off = run(body)
    assert (on["bps"], on["bps_max"], on["group"]) == (1000000, 2000000, "drive0")
    assert bad == ("GenericError", "bps and bps_rd/bps_wr cannot be used at the same time")
    assert both == ("GenericError", "Need exactly one of 'device' and 'id'")
    assert off["bps"] == 0 and "group" not in off


def test_blockdev_del_refuses_a_node_a_backend_uses(tmp_path: Path) -> None:
    async def body(d: Daemon) -> Any:
        blk = await d.session.open_backend(image(tmp_path), fmt="raw", name="drive0")
        return await error_of(d, "blockdev-del", {"node-name": blk.node.name})

    cls, desc = run(body)
    assert cls == "GenericError" and desc.endswith("is in use")


def test_block_resize_by_device_name(tmp_path: Path) -> None:
    async def body(d: Daemon) -> Any:
        blk = await d.session.open_backend(image(tmp_path), fmt="raw", name="drive0")
        await call(d, "block_resize", {"device": "drive0", "size": 3 * MiB})
        return blk.getlength()

    assert run(body) == 3 * MiB
    assert (tmp_path / "d.raw").stat().st_size == 3 * MiB


def test_exports_dispatch_to_the_plugin_type() -> None:
    async def body(d: Daemon) -> Any:
        await d.add_blockdev({"driver": "null-co", "node-name": "n0"})
        await call(d, "block-export-add", {"type": "fake", "id": "e0", "node-name": "n0"})
        listed = await call(d, "query-block-exports")
        dup = await error_of(d, "block-export-add", {"type": "fake", "id": "e0", "node-name": "n0"})
        missing_node = await error_of(d, "block-export-add", {"type": "fake", "id": "e1", "node-name": "zz"})
        refused = await error_of(d, "block-export-add", {"type": "fake", "id": "e2", "node-name": "n0",
                                                         "refuse": True})
        export = d.exports["e0"]
        in_use = await error_of(d, "blockdev-del", {"node-name": "n0"})
        await call(d, "block-export-del", {"id": "e0", "mode": "hard"})
        return listed, dup, missing_node, refused, export.deleted, d.exports, in_use

    listed, dup, missing_node, refused, deleted, left, _ = run(body)
    assert listed == [{"id": "e0", "type": "fake", "node-name": "n0", "shutting-down": False}]
    assert dup == ("GenericError", "Block export id 'e0' is already in use")
    assert missing_node == ("GenericError", "Cannot find device='' nor node-name='zz'")  # as qemu-storage-daemon
    assert refused == ("GenericError", "fake export refused")
    assert deleted == "hard" and left == {}


def test_exports_are_deleted_at_shutdown() -> None:
    exports: list[FakeExport] = []

    async def body(d: Daemon) -> None:
        await d.add_blockdev({"driver": "null-co", "node-name": "n0"})
        await d.add_export({"type": "fake", "id": "e0", "node-name": "n0"})
        exports.append(d.exports["e0"])

    run(body)
    assert exports[0].deleted == "hard"


def test_plugin_commands_are_validated_and_listed() -> None:
    async def body(d: Daemon) -> Any:
        names = {c["name"] for c in await call(d, "query-commands")}
        return names, await call(d, "x-echo", {"word": "hi"}), await error_of(d, "x-echo", {})

    names, echoed, missing = run(body)
    assert "x-echo" in names and echoed == {"echo": "hi"}
    assert missing == ("GenericError", "Parameter 'word' is missing")


def test_nbd_export_without_its_plugin_names_blockgraph_nbd() -> None:
    host = PluginHost(block=["nbd"])

    async def body(d: Daemon) -> Any:
        await d.add_blockdev({"driver": "null-co", "node-name": "n0"})
        return (await error_of(d, "block-export-add", {"type": "nbd", "id": "e", "node-name": "n0"}),
                await _start_error(d))

    async def _start_error(d: Daemon) -> str:
        with pytest.raises(QMPError) as e:
            await d.start_export_server("nbd", {"addr": {"type": "unix", "path": "/nonexistent"}})
        return e.value.desc

    (cls, desc), server = run(body, host=host)
    assert cls == "GenericError" and "blockgraph-nbd" in desc and "blockgraph-nbd" in server


class FailingDisk:
    """A protocol driver whose writes fail with ENOSPC until ``healed``."""

    name = "test-enospc"
    kind = "protocol"
    api_version = 1
    healed = False

    @attrs.frozen
    class Options:
        size: int = 65536

    async def open(self, node: Any, options: Any) -> None:
        self.data = bytearray(options.size)

    async def close(self) -> None:
        pass

    async def getlength(self) -> int:
        return len(self.data)

    async def preadv(self, offset: int, buf: memoryview, flags: Any) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    async def pwritev(self, offset: int, buf: memoryview, flags: Any) -> None:
        if not FailingDisk.healed:
            raise BlockIOError(errno.ENOSPC, op="write", offset=offset)
        self.data[offset:offset + len(buf)] = buf

    async def flush(self) -> None:
        pass


class FailingPlugin:
    @hookimpl
    def blockgraph_register_drivers(self, register: Any) -> None:
        register(FailingDisk, name="test-enospc", kind="protocol")


@pytest.mark.parametrize("werror", ["report", "stop"])
def test_io_errors_become_block_io_error_events_and_cont_resumes(werror: str) -> None:
    from blockgraph.backend import BlockBackend

    events: list[tuple[str, Any]] = []
    FailingDisk.healed = False

    async def body(d: Daemon) -> Any:
        d.emit = lambda name, data=None: events.append((name, data))  # type: ignore[method-assign]
        node = await d.add_blockdev({"driver": "test-enospc", "node-name": "bad"})
        blk = await BlockBackend.attach_new(d.session, node, name="d0", werror=werror)
        d.watch_backend(blk)
        write = asyncio.ensure_future(blk.pwritev(0, memoryview(b"x" * 512)))
        while not events:
            await asyncio.sleep(0)
        if werror == "stop":
            assert (await call(d, "query-block"))[0]["io-status"] == "nospace"
            FailingDisk.healed = True
            await call(d, "cont")
            await write
            result = "done"
        else:
            with pytest.raises(BlockIOError):
                await write
            result = "failed"
        await blk.close()
        return result

    result = run(body, host=PluginHost(extra=[(FailingPlugin(), "failing")]))
    name, data = events[0]
    assert name == "BLOCK_IO_ERROR"
    assert data == {"device": "d0", "node-name": "bad", "operation": "write", "action": werror, "nospace": True,
                    "reason": "No space left on device"}
    assert result == ("done" if werror == "stop" else "failed")
