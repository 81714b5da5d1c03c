"""Reopen changes read-only and mutable options of a live node as one transaction."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from blockgraph.backend import BlockBackend
from blockgraph.errors import BlockGraphError, BlockIOError, OptionError
from blockgraph.perms import Perm


def _lock_bytes(path: Path) -> set[int]:
    ino = os.stat(path).st_ino
    held = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "OFDLCK" and fields[5].split(":")[2] == str(ino):
            held.update(range(int(fields[6]), int(fields[7]) + 1))  # adjacent bytes show as one range
    return held


def _open(session: Any, run: Any, img: Path, read_only: bool) -> Any:
    return run(session.open_node({"driver": "raw", "node-name": "fmt", "read-only": read_only,
                                  "file": {"driver": "file", "filename": str(img), "node-name": "proto"}}))


def test_read_only_to_read_write_and_back(tmp_path: Path, bg_new_session: Any, bg_runner: Any) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    session, run = bg_new_session(), bg_runner.run
    node = _open(session, run, img, read_only=True)
    blk = run(BlockBackend.attach_new(session, node, read_only=True, share_all=True))
    assert _lock_bytes(img) == {100}
    run(session.reopen(node, read_only=False))
    assert not node.read_only and not session.find_node("proto").read_only
    blk.read_only = False
    blk.set_perm(blk.perm | Perm.WRITE, blk.shared)
    run(blk.pwritev(0, memoryview(b"reopened")))
    run(blk.flush())
    assert img.read_bytes()[:8] == b"reopened"
    assert _lock_bytes(img) == {100, 101}
    blk.set_perm(Perm.CONSISTENT_READ, blk.shared)
    blk.read_only = True
    run(session.reopen(node, read_only=True))
    assert node.read_only and _lock_bytes(img) == {100}
    with pytest.raises(BlockIOError, match="read-only"):
        run(blk.pwritev(0, memoryview(b"x")))


def test_a_writer_keeps_a_node_read_write(tmp_path: Path, bg_new_session: Any, bg_runner: Any) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(65536))
    session, run = bg_new_session(), bg_runner.run
    node = _open(session, run, img, read_only=False)
    run(BlockBackend.attach_new(session, node, share_all=True))
    with pytest.raises(BlockGraphError, match=r"is read-only, but .* wants to write"):
        run(session.reopen(node, read_only=True))
    # Nothing changed: the node is still writable and its file still holds the write lock.
    assert not node.read_only and not session.find_node("proto").read_only
    assert _lock_bytes(img) == {100, 101}


def test_only_mutable_options_change(tmp_path: Path, bg_new_session: Any, bg_runner: Any) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(512) + b"window" + bytes(65530))
    session, run = bg_new_session(), bg_runner.run
    node = _open(session, run, img, read_only=True)
    proto = session.find_node("proto")
    with pytest.raises(OptionError, match="Cannot change the option 'locking'") as e:
        run(session.reopen(proto, options={"locking": "off"}))
    assert "node 'proto'" in str(e.value) and "driver 'file'" in str(e.value)
    assert proto.options.locking == "auto"
    with pytest.raises(OptionError, match="Cannot change the option 'bogus'"):
        run(session.reopen(node, options={"bogus": 1}))
    # raw's window is mutable, as in QEMU; the node's length follows it.
    run(session.reopen(node, options={"offset": 512, "size": 4096}))
    blk = run(BlockBackend.attach_new(session, node, read_only=True, share_all=True))
    buf = bytearray(6)
    run(blk.preadv(0, memoryview(buf)))
    assert buf == b"window" and node.length == 4096
    with pytest.raises(BlockGraphError, match="has to be smaller or equal"):
        run(session.reopen(node, options={"size": 1 << 30}))
    assert node.length == 4096 and node.options.size == 4096
