"""open_drive: a -drive expansion opened in a Session, with a named BlockBackend on its root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from blockgraph.cmdline import DriveTable, expand_drive, open_drive
from blockgraph.errors import BlockGraphError, BlockIOError, DriverNotFound, OptionError


def opened(session: Any, runner: Any, text: str, table: DriveTable | None = None) -> Any:
    exp = expand_drive(text, table or DriveTable(), host=session.registry)
    return runner.run(open_drive(session, exp))


def test_raw_drive(bg_session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=1 << 20)
    blk = opened(bg_session, bg_runner, f"file={path},format=raw,if=none,id=d0,cache=writethrough,werror=report")
    assert bg_session.backends["d0"] is blk and blk.name == "d0"
    assert not blk.write_cache and blk.werror == "report" and blk.rerror == "report"
    root = blk.node
    assert root.driver_name == "raw" and root.name.startswith("#block")  # made-up names are not used
    assert root.file.node.driver_name == "file" and root.file.node.filename == str(path)
    bg_runner.run(blk.pwritev(0, memoryview(b"x" * 512)))
    bg_runner.run(blk.flush())
    assert path.read_bytes()[:512] == b"x" * 512


def test_user_node_name_and_detect_zeroes_unmap(bg_session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image()
    blk = opened(bg_session, bg_runner, f"file={path},format=raw,if=none,node-name=top,detect-zeroes=unmap")
    assert blk.node.name == "top" and blk.node.detect_zeroes == "unmap"
    assert bg_session.find_node("top") is blk.node


def test_probed_format_warns_for_raw(bg_plugins: Any, bg_new_session: Any, bg_runner: Any,
                                     bg_tmp_image: Any) -> None:
    warnings: list[str] = []
    session = bg_new_session(bg_plugins(), warn=warnings.append)
    blk = opened(session, bg_runner, f"file={bg_tmp_image()},if=none")
    assert blk.node.driver_name == "raw" and blk.node.probed_raw
    assert warnings and "probing guessed raw" in warnings[0]


def test_read_only_drive_refuses_writes(bg_session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    blk = opened(bg_session, bg_runner, f"file={bg_tmp_image()},format=raw,if=none,readonly=on")
    assert blk.read_only and blk.node.read_only and blk.node.file.node.read_only
    with pytest.raises(BlockIOError):
        bg_runner.run(blk.pwritev(0, memoryview(b"x" * 512)))


def test_empty_drive(bg_session: Any, bg_runner: Any) -> None:
    blk = opened(bg_session, bg_runner, "if=none,id=cd0")
    assert bg_session.backends["cd0"] is blk and blk.root is None


def test_same_id_twice_refused(bg_session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    opened(bg_session, bg_runner, f"file={bg_tmp_image()},format=raw,if=none,id=d")
    with pytest.raises(OptionError, match="Device with id 'd' already exists"):
        opened(bg_session, bg_runner, f"file={bg_tmp_image()},format=raw,if=none,id=d")


def test_failed_open_leaves_nothing(bg_session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    with pytest.raises(BlockGraphError):
        opened(bg_session, bg_runner, f"file={bg_tmp_image()},format=raw,if=none,file.locking=bogus")
    with pytest.raises(BlockGraphError, match="Could not open"):
        opened(bg_session, bg_runner, "file=/nonexistent/x.img,format=raw,if=none")
    assert bg_session.nodes == {} and bg_session.backends == {}


@pytest.mark.parametrize(("option", "driver", "dist"), [
    ("copy-on-read=on", "copy-on-read", "blockgraph-copy-on-read"),
    ("bps=1000", "throttle", "blockgraph-throttle")])
def test_missing_plugins_are_named(bg_session: Any, bg_runner: Any, bg_tmp_image: Any, option: str,
                                   driver: str, dist: str) -> None:
    text = f"file={bg_tmp_image()},format=raw,if=none,{option}"
    if driver in bg_session.registry.drivers:
        blk = opened(bg_session, bg_runner, text)
        assert blk.node.driver_name == driver
        return
    with pytest.raises(DriverNotFound) as info:
        opened(bg_session, bg_runner, text)
    assert dist in str(info.value) and info.value.dist == dist
    assert bg_session.nodes == {}


def test_snapshot_overlay_keeps_the_image_unchanged(bg_session: Any, bg_runner: Any, bg_tmp_image: Any,
                                                    tmp_path: Path, monkeypatch: Any) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    path = bg_tmp_image(data=b"base" * 128)
    text = f"file={path},format=raw,if=none,snapshot=on"
    if "qcow2" not in bg_session.registry.drivers:
        with pytest.raises(DriverNotFound, match="blockgraph-qcow2"):
            opened(bg_session, bg_runner, text)
        return
    blk = opened(bg_session, bg_runner, text)
    assert blk.node.driver_name == "qcow2" and blk.node.no_flush
    assert os.listdir(tmpdir) == []  # deleted at once; the open file keeps it alive
    bg_runner.run(blk.pwritev(0, memoryview(b"new!" * 128)))
    buf = bytearray(512)
    bg_runner.run(blk.preadv(0, memoryview(buf)))
    assert bytes(buf) == b"new!" * 128
    assert path.read_bytes()[:512] == b"base" * 128
