"""Block commands of ``blockgraph serve``, driven by QEMU's own Python client (qemu.qmp)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import qemu.qmp as qmp_mod  # the test extra; CI installs it
from blockgraph.daemon.harness import ServeProcess

QMPClient, ExecuteError = qmp_mod.QMPClient, qmp_mod.ExecuteError
MiB = 1 << 20


def with_client(sock: str, body: Callable[[Any], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        qmp = QMPClient("blockgraph-test")
        await qmp.connect(sock)
        try:
            return await body(qmp)
        finally:
            await qmp.disconnect()

    return asyncio.run(main())


def qmp_error(sock: str, cmd: str, args: dict | None = None) -> tuple[str, str]:
    async def body(qmp: Any) -> tuple[str, str]:
        with pytest.raises(ExecuteError) as e:
            await qmp.execute(cmd, args)
        return e.value.error_class, str(e.value)

    return with_client(sock, body)


def qmp_exec(sock: str, cmd: str, args: dict | None = None) -> Any:
    async def body(qmp: Any) -> Any:
        return await qmp.execute(cmd, args)

    return with_client(sock, body)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cmds")
    for name in ("a.raw", "b.raw", "c.raw"):
        with open(tmp / name, "wb") as f:
            f.truncate(MiB)
    return tmp


@pytest.fixture(scope="module")
def daemon(images: Path):
    args = ["--blockdev", f"driver=file,filename={images / 'a.raw'},node-name=fa",
            "--blockdev", "driver=raw,file=fa,node-name=ra",
            "--blockdev", f'{{"driver": "file", "filename": "{images / "b.raw"}", "node-name": "fb", '
                          f'"read-only": true, "cache": {{"direct": false, "no-flush": true}}}}',
            "--blockdev", "null-co,node-name=nul,detect-zeroes=on,size=4096"]
    with ServeProcess(images, args) as d:
        yield d


def test_qemu_qmp_client_reads_the_greeting_and_query_version(daemon: ServeProcess) -> None:
    async def body(qmp: Any) -> Any:
        return qmp.greeting, await qmp.execute("query-version")

    greeting, version = with_client(daemon.socket, body)
    assert greeting.QMP.version == version and greeting.QMP.capabilities == []  # parsed by qemu.qmp
    assert version["qemu"]["major"] == 7 and version["package"].startswith("blockgraph")


def test_query_commands_lists_every_core_command(daemon: ServeProcess) -> None:
    names = {c["name"] for c in qmp_exec(daemon.socket, "query-commands")}
    assert {"qmp_capabilities", "query-version", "query-commands", "quit", "blockdev-add", "blockdev-del",
            "blockdev-reopen", "query-named-block-nodes", "query-block", "query-blockstats",
            "x-debug-query-block-graph", "block_resize", "blockdev-snapshot-sync", "blockdev-snapshot",
            "blockdev-snapshot-internal-sync", "blockdev-snapshot-delete-internal-sync", "block_set_io_throttle",
            "query-block-exports", "block-export-add", "block-export-del", "human-monitor-command"} <= names


def test_named_nodes_from_keyval_and_json_blockdevs(daemon: ServeProcess, images: Path) -> None:
    nodes = {n["node-name"]: n for n in qmp_exec(daemon.socket, "query-named-block-nodes", {"flat": True})}
    assert {"fa", "ra", "fb", "nul"} <= set(nodes)
    ra, fb, nul = nodes["ra"], nodes["fb"], nodes["nul"]
    assert (ra["drv"], ra["file"], ra["ro"]) == ("raw", str(images / "a.raw"), False)
    assert ra["image"]["virtual-size"] == MiB and ra["image"]["format"] == "raw"
    assert (fb["drv"], fb["ro"], fb["cache"]) == ("file", True, {"writeback": True, "direct": False,
                                                                 "no-flush": True})
    assert (nul["detect_zeroes"], nul["image"]["virtual-size"]) == ("on", 4096)
    assert nul["file"] == 'json:{"driver": "null-co", "size": 4096}'  # as QEMU names it
    for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "write_threshold", "backing_file_depth"):
        assert ra[key] == 0


def test_block_graph_shows_the_file_edge(daemon: ServeProcess) -> None:
    graph = qmp_exec(daemon.socket, "x-debug-query-block-graph")
    ids = {n["name"]: n["id"] for n in graph["nodes"]}
    assert all(n["type"] == "block-driver" for n in graph["nodes"])
    edges = [(e["parent"], e["child"], e["name"]) for e in graph["edges"]]
    assert (ids["ra"], ids["fa"], "file") in edges
    edge = next(e for e in graph["edges"] if e["parent"] == ids["ra"])
    assert set(edge["shared-perm"]) <= {"consistent-read", "write", "write-unchanged", "resize"}


def test_blockdev_add_and_del_with_qemu_errors(daemon: ServeProcess) -> None:
    sock = daemon.socket
    assert qmp_exec(sock, "blockdev-add", {"driver": "null-co", "node-name": "tmp1"}) == {}
    assert qmp_error(sock, "blockdev-add", {"driver": "null-co", "node-name": "tmp1"}) == (
        "GenericError", "Duplicate nodes with node-name='tmp1'")
    assert qmp_error(sock, "blockdev-add", {"driver": "null-co", "node-name": "x", "bogus": 1}) == (
        "GenericError", "Parameter 'bogus' is unexpected")
    assert qmp_error(sock, "blockdev-add", {"driver": "nosuch", "node-name": "x"}) == (
        "GenericError", "Parameter 'driver' does not accept value 'nosuch'")
    assert qmp_error(sock, "blockdev-add", {"driver": "file", "node-name": "x"}) == (
        "GenericError", "Parameter 'filename' is missing")
    assert qmp_error(sock, "blockdev-add", {"driver": "null-co"}) == (
        "GenericError", "'node-name' must be specified for the root node")
    assert qmp_error(sock, "blockdev-del", {"node-name": "fa"}) == ("GenericError", "Block device fa is in use")
    assert qmp_error(sock, "blockdev-del", {"node-name": "zz"}) == (
        "GenericError", "Failed to find node with node-name='zz'")
    assert qmp_exec(sock, "blockdev-del", {"node-name": "tmp1"}) == {}
    names = {n["node-name"] for n in qmp_exec(sock, "query-named-block-nodes")}
    assert "tmp1" not in names and "x" not in names


def test_reopen_read_only_to_read_write_then_write_through_the_monitor(images: Path, tmp_path: Path) -> None:
    img = tmp_path / "r.raw"
    with open(img, "wb") as f:
        f.truncate(MiB)
    with ServeProcess(tmp_path, ["--blockdev", f"driver=file,filename={img},node-name=f",
                                 "--blockdev", "raw,file=f,node-name=r,read-only=on"]) as d:
        async def body(qmp: Any) -> list[Any]:
            out = [await qmp.execute("human-monitor-command",
                                     {"command-line": 'qemu-io r "write -P 0x5a 0 64k"'})]
            await qmp.execute("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r", "file": "f"}]})
            out.append(await qmp.execute("human-monitor-command",
                                         {"command-line": 'qemu-io r "write -P 0x5a 0 64k"'}))
            nodes = {n["node-name"]: n["ro"] for n in await qmp.execute("query-named-block-nodes")}
            return [*out, nodes]

        refused, wrote, ro = with_client(d.socket, body)
        assert "Block node is read-only" in refused
        assert wrote.startswith("wrote 65536/65536 bytes at offset 0")
        assert ro["r"] is False
        assert qmp_error(d.socket, "blockdev-reopen", {"options": [{"driver": "file", "node-name": "r"}]}) == (
            "GenericError", "Cannot change the option 'driver'")
        assert d.stop() == 0
    check = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", str(img)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "read 65536/65536" in check.stdout


def test_block_resize_by_node_name(daemon: ServeProcess, images: Path) -> None:
    assert qmp_exec(daemon.socket, "block_resize", {"node-name": "ra", "size": 2 * MiB}) == {}
    assert os.path.getsize(images / "a.raw") == 2 * MiB
    nodes = {n["node-name"]: n for n in qmp_exec(daemon.socket, "query-named-block-nodes")}
    assert nodes["ra"]["image"]["virtual-size"] == 2 * MiB
    assert qmp_error(daemon.socket, "block_resize", {"node-name": "zz", "size": 1}) == (
        "GenericError", "Cannot find device='' nor node-name='zz'")
    assert qmp_error(daemon.socket, "block_resize", {"node-name": "fb", "size": MiB})[1] == \
        "Block node is read-only"


def test_query_block_and_blockstats_without_backends_are_empty(daemon: ServeProcess) -> None:
    assert qmp_exec(daemon.socket, "query-block") == []
    assert qmp_exec(daemon.socket, "query-blockstats") == []
    stats = qmp_exec(daemon.socket, "query-blockstats", {"query-nodes": True})
    by_name = {s["node-name"]: s for s in stats}
    assert by_name["ra"]["parent"]["node-name"] == "fa"
    assert by_name["ra"]["stats"]["wr_bytes"] == 0


def test_block_set_io_throttle_needs_a_device(daemon: ServeProcess) -> None:
    args = {"device": "nope", "bps": 1, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}
    assert qmp_error(daemon.socket, "block_set_io_throttle", args) == ("DeviceNotFound", "Device 'nope' not found")
    del args["iops_wr"]
    assert qmp_error(daemon.socket, "block_set_io_throttle", args) == (
        "GenericError", "Parameter 'iops_wr' is missing")


def test_objects_throttle_group_is_kept_other_types_refused(daemon: ServeProcess) -> None:
    sock = daemon.socket
    assert qmp_exec(sock, "object-add", {"qom-type": "throttle-group", "id": "tg9",
                                         "limits": {"bps-total": 1000}}) == {}
    assert {"name": "tg9", "type": "child<throttle-group>"} in qmp_exec(sock, "qom-list", {"path": "/objects"})
    assert qmp_error(sock, "object-add", {"qom-type": "throttle-group", "id": "tgx", "x-foo": 1}) == (
        "GenericError", "Parameter 'x-foo' is unexpected")
    assert "not supported by blockgraph" in qmp_error(sock, "object-add", {"qom-type": "secret", "id": "s"})[1]
    assert qmp_exec(sock, "object-del", {"id": "tg9"}) == {}


def test_exports_of_a_type_no_plugin_provides_name_the_distribution(daemon: ServeProcess) -> None:
    assert qmp_exec(daemon.socket, "query-block-exports") == []
    cls, desc = qmp_error(daemon.socket, "block-export-add", {"type": "fuse", "id": "e", "node-name": "ra",
                                                              "mountpoint": "/tmp/x"})
    assert cls == "GenericError" and "blockgraph-fuse" in desc
    assert qmp_error(daemon.socket, "block-export-del", {"id": "e"}) == ("GenericError", "Export 'e' is not found")


def test_internal_snapshots_refused_by_raw(daemon: ServeProcess) -> None:
    assert qmp_error(daemon.socket, "blockdev-snapshot-internal-sync", {"device": "ra", "name": "s"}) == (
        "GenericError", "Block format 'raw' used by device 'ra' does not support internal snapshots")
    assert qmp_error(daemon.socket, "blockdev-snapshot-internal-sync", {"device": "zz", "name": "s"}) == (
        "GenericError", "Cannot find device='zz' nor node-name='zz'")


def test_several_qemu_qmp_clients_at_once(daemon: ServeProcess) -> None:
    async def main() -> list[Any]:
        clients = [QMPClient(f"c{i}") for i in range(3)]
        for c in clients:
            await c.connect(daemon.socket)
        try:
            return await asyncio.gather(*(c.execute("query-named-block-nodes", {"flat": True}) for c in clients))
        finally:
            for c in clients:
                await c.disconnect()

    results = asyncio.run(main())
    assert len(results) == 3 and results[0] == results[1] == results[2]
