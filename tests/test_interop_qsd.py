"""The same --blockdev lines given to the real qemu-storage-daemon and to ``blockgraph serve``: the QMP
query results have the same shape and the same values for drivers, filenames, ro, cache and detect-zeroes."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
import qemu.qmp as qmp_mod  # the test extra; CI installs it
from blockgraph.daemon.harness import QSD, ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="qemu-storage-daemon (Debian qemu-system-common) not installed")
MiB = 1 << 20
COMPARED = ("drv", "file", "ro", "cache", "detect_zeroes", "backing_file_depth", "encrypted", "bps", "iops",
            "write_threshold")
IMAGE_COMPARED = ("format", "filename", "virtual-size")


def lines(d: Path) -> list[str]:
    a, b = d / "a.raw", d / "b.raw"
    return [
        f"driver=file,filename={a},node-name=fa",
        "driver=raw,file=fa,node-name=ra,detect-zeroes=unmap,discard=unmap",
        f"driver=file,filename={b},node-name=fb,read-only=on,cache.direct=on,cache.no-flush=on",
        "null-co,node-name=nul,size=65536,detect-zeroes=on",
        f'{{"driver": "raw", "node-name": "rj", "read-only": true, "file": {{"driver": "file", '
        f'"filename": "{b}"}}}}',
        "driver=raw,file=fb,node-name=part,force-share=on,read-only=on",
        "driver=raw,file=fa,node-name=window,offset=4096,size=8192",
    ]


async def queries(sock: str) -> dict[str, Any]:
    qmp = qmp_mod.QMPClient("interop")
    await qmp.connect(sock)
    try:
        return {"flat": await qmp.execute("query-named-block-nodes", {"flat": True}),
                "tree": await qmp.execute("query-named-block-nodes"),
                "graph": await qmp.execute("x-debug-query-block-graph"),
                "block": await qmp.execute("query-block"),
                "exports": await qmp.execute("query-block-exports")}
    finally:
        await qmp.disconnect()


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    d = tmp_path_factory.mktemp("qsd")
    for name in ("a.raw", "b.raw"):
        with open(d / name, "wb") as f:
            f.truncate(MiB)
    args = [x for line in lines(d) for x in ("--blockdev", line)]
    out = []
    for program, sub in ((QSD, "qsd"), (None, "bg")):
        (d / sub).mkdir()
        with ServeProcess(d / sub, args, program=program) as proc:
            out.append(asyncio.run(queries(proc.socket)))
            assert proc.stop() == 0
    return out[0], out[1]


def named(result: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in result if not n["node-name"].startswith("#")}


def test_same_nodes_same_keys_same_values(both: tuple[dict[str, Any], dict[str, Any]]) -> None:
    theirs, ours = named(both[0]["flat"]), named(both[1]["flat"])
    assert set(theirs) == set(ours) == {"fa", "ra", "fb", "nul", "rj", "part", "window"}
    for name, q in theirs.items():
        b = ours[name]
        assert set(b) == set(q), name
        assert {k: b[k] for k in COMPARED} == {k: q[k] for k in COMPARED}, name
        assert {k: b["image"][k] for k in IMAGE_COMPARED} == {k: q["image"][k] for k in IMAGE_COMPARED}, name


def test_node_list_order_is_newest_first(both: tuple[dict[str, Any], dict[str, Any]]) -> None:
    order = [[n["node-name"] for n in r["flat"] if not n["node-name"].startswith("#")] for r in both]
    assert order[0] == order[1]


def test_generated_child_names_and_graph_edges_match(both: tuple[dict[str, Any], dict[str, Any]]) -> None:
    def edges(result: dict[str, Any]) -> set[tuple[str, ...]]:
        names = {n["id"]: n["name"] for n in result["graph"]["nodes"]}
        gen = lambda n: "#gen" if n.startswith("#") else n  # noqa: E731 - QEMU's counter differs
        return {(gen(names[e["parent"]]), gen(names[e["child"]]), e["name"], " ".join(sorted(e["perm"])),
                 " ".join(sorted(e["shared-perm"]))) for e in result["graph"]["edges"]}

    assert edges(both[1]) == edges(both[0])
    assert sum(n["node-name"].startswith("#") for n in both[0]["flat"]) == \
        sum(n["node-name"].startswith("#") for n in both[1]["flat"])


def test_no_backends_no_exports_on_either(both: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert both[0]["block"] == both[1]["block"] == []
    assert both[0]["exports"] == both[1]["exports"] == []


PROTOCOL_LINES = ['{"execute": "qmp_capabilities"}', "garbage", '{"execute": tru}', '{"a": }', '"str"', "12",
                  '{"arguments": {}}', '{"exec-oob": "query-version"}', '{"foo": 1}', '{"execute": 1}',
                  '{"execute": "query-version", "arguments": []}', '{"execute": "nosuch", "id": [1, {"x": null}]}',
                  '{"execute": "query-named-block-nodes", "arguments": {"flat": "yes"}}',
                  '{"execute": "query-version", "arguments": {"x": 1}}', '{"execute": "qmp_capabilities"}',
                  '{"execute": "blockdev-del", "arguments": {"node-name": "zz"}}',
                  '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "x": 1}}',
                  '{"execute": "blockdev-add", "arguments": {"driver": "null-co"}}',
                  '{"execute": "block_resize", "arguments": {"node-name": "zz", "size": 1}}']


def raw_session(sock: str, texts: list[str]) -> tuple[dict[str, Any], list[bytes]]:
    import json
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sock)
    f = s.makefile("rwb")
    greeting = json.loads(f.readline())
    replies = []
    for text in texts:
        f.write(text.encode() + b"\n")
        f.flush()
        replies.append(f.readline())
    s.close()
    return greeting, replies


def test_protocol_errors_are_byte_identical(tmp_path: Path) -> None:
    out = []
    for program, sub in ((QSD, "qsd"), (None, "bg")):
        (tmp_path / sub).mkdir()
        with ServeProcess(tmp_path / sub, [], program=program) as proc:
            out.append(raw_session(proc.socket, PROTOCOL_LINES))
            assert proc.stop() == 0
    (g_theirs, theirs), (g_ours, ours) = out
    assert set(g_ours["QMP"]) == set(g_theirs["QMP"])
    assert set(g_ours["QMP"]["version"]["qemu"]) == set(g_theirs["QMP"]["version"]["qemu"])
    for text, a, b in zip(PROTOCOL_LINES, theirs, ours, strict=True):
        assert b == a, text


GRAPH_LINES = [
    '{"execute": "qmp_capabilities"}',
    '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "zz", "file": "fa"}]}}',
    '{"execute": "blockdev-reopen", "arguments": {"options": [{"node-name": "ra", "file": "fa"}]}}',
    '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "ra", "file": "fa"}]}}',
    '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "ra", "file": "fb"}]}}',
    '{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "q1", "snapshot-file": "S3", '
    '"snapshot-node-name": "q2"}}',
    '{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "q1", "snapshot-file": "S3"}}',
    '{"execute": "blockdev-snapshot", "arguments": {"node": "q1", "overlay": "q1"}}',
    '{"execute": "blockdev-snapshot", "arguments": {"node": "q1", "overlay": "ra"}}',
    '{"execute": "blockdev-snapshot", "arguments": {"node": "q1", "overlay": "zz"}}',
    '{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "q2", "name": ""}}',
    '{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "ra", "name": "x"}}',
    '{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "q2"}}',
    '{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "q2", "name": "nn"}}',
    '{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "q2", "id": "9", "name": "nn"}}',
    '{"execute": "block_resize", "arguments": {"node-name": "q2", "size": -1}}',
    '{"execute": "block_resize", "arguments": {"device": "q2", "size": 2097152}}',
    '{"execute": "block-export-del", "arguments": {"id": "x"}}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "f1"}}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "q2"}}',
]


def test_graph_command_replies_are_byte_identical(tmp_path: Path) -> None:
    import subprocess

    out = []
    for program, sub in ((QSD, "qsd"), (None, "bg")):
        d = tmp_path / sub
        d.mkdir()
        for name in ("s1.qcow2", "s2.qcow2"):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / name), str(MiB)], check=True)
        for name in ("a.raw", "b.raw"):
            with open(d / name, "wb") as f:
                f.truncate(MiB)
        args = [x for line in (f"driver=file,filename={d / 's1.qcow2'},node-name=f1", "qcow2,file=f1,node-name=q1",
                               f"driver=file,filename={d / 's2.qcow2'},node-name=f2", "qcow2,file=f2,node-name=q2",
                               f"driver=file,filename={d / 'a.raw'},node-name=fa", "raw,file=fa,node-name=ra",
                               f"driver=file,filename={d / 'b.raw'},node-name=fb")
                for x in ("--blockdev", line)]
        with ServeProcess(d, args, program=program) as proc:
            lines = [t.replace("S3", str(d / "s3.qcow2")) for t in GRAPH_LINES]
            out.append([r.replace(str(d).encode(), b"DIR") for r in raw_session(proc.socket, lines)[1]])
            assert proc.stop() == 0
    for text, a, b in zip(GRAPH_LINES, out[0], out[1], strict=True):
        assert b == a, text


def test_qcow2_chain_queries_match(tmp_path: Path) -> None:
    import subprocess

    results = []
    for program, sub in ((QSD, "qsd"), (None, "bg")):
        d = tmp_path / sub
        d.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), str(MiB)], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                        str(d / "top.qcow2")], check=True)
        args = ["--blockdev", f"driver=file,filename={d / 'top.qcow2'},node-name=ft",
                "--blockdev", "qcow2,file=ft,node-name=top,cache.no-flush=on"]
        with ServeProcess(d, args, program=program) as proc:
            r = asyncio.run(queries(proc.socket))
            assert proc.stop() == 0
        results.append((d, r))

    def norm(d: Path, node: dict[str, Any]) -> dict[str, Any]:
        text = repr({k: node[k] for k in (*COMPARED, "backing_file") if k in node})
        image = node["image"]
        chain = []
        while image is not None:
            chain.append({k: image.get(k) for k in (*IMAGE_COMPARED, "backing-filename", "full-backing-filename",
                                                    "backing-filename-format", "cluster-size")})
            image = image.get("backing-image")
        return {"node": text.replace(str(d), "DIR"), "chain": repr(chain).replace(str(d), "DIR")}

    (d0, theirs), (d1, ours) = results
    q, b = named(theirs["tree"])["top"], named(ours["tree"])["top"]
    assert set(b) == set(q)
    assert norm(d1, b) == norm(d0, q)
    assert len(theirs["flat"]) == len(ours["flat"])  # the backing file's two nodes are there, unnamed
