"""Creating and resizing files as QEMU's file driver does."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from blockgraph.driver import PreallocMode
from blockgraph.errors import BlockIOError, ImageLocked, OpenError
from blockgraph_file.driver import FileDriver

QEMU_IO = shutil.which("qemu-io")


def _create(session: Any, run: Any, path: Path, size: int, **kw: Any) -> None:
    run(FileDriver.create(session, str(path), FileDriver.CreateOptions(size=size, **kw)))


def test_size_is_rounded_to_sectors_and_the_first_block_allocated(tmp_path: Path, bg_new_session: Any,
                                                                   bg_runner: Any) -> None:
    img = tmp_path / "new.img"
    _create(bg_new_session(), bg_runner.run, img, 1000)
    assert img.stat().st_size == 1024
    assert img.stat().st_blocks * 512 >= 1024  # written, so O_DIRECT probing finds data
    _create(bg_new_session(), bg_runner.run, img, 1 << 20)
    st = img.stat()
    assert st.st_size == 1 << 20 and 4096 <= st.st_blocks * 512 < 1 << 20


def test_create_truncates_an_existing_file(tmp_path: Path, bg_new_session: Any, bg_runner: Any) -> None:
    img = tmp_path / "old.img"
    img.write_bytes(b"\x77" * 65536)
    _create(bg_new_session(), bg_runner.run, img, 8192)
    assert img.read_bytes() == bytes(8192)


def test_unsupported_preallocation_changes_nothing(tmp_path: Path, bg_new_session: Any, bg_runner: Any) -> None:
    img = tmp_path / "keep.img"
    img.write_bytes(b"\x11" * 4096)
    with pytest.raises(OpenError, match="Unsupported preallocation mode: metadata"):
        _create(bg_new_session(), bg_runner.run, img, 8192, preallocation="metadata")
    assert img.read_bytes() == b"\x11" * 4096
    session = bg_new_session()
    blk = bg_runner.run(session.open_backend(str(img), fmt="raw", share_all=True))
    with pytest.raises(BlockIOError, match="Unsupported preallocation mode: metadata"):
        bg_runner.run(blk.truncate(1 << 20, prealloc=PreallocMode.METADATA))
    with pytest.raises(BlockIOError, match="Cannot use preallocation for shrinking files"):
        bg_runner.run(blk.truncate(512, prealloc=PreallocMode.FALLOC))
    assert img.stat().st_size == 4096 and blk.getlength() == 4096


@pytest.mark.interop
@pytest.mark.skipif(QEMU_IO is None, reason="qemu-io (Debian qemu-utils) is not installed")
def test_create_refuses_an_image_another_process_keeps_from_writers(tmp_path: Path, bg_new_session: Any,
                                                                     bg_runner: Any) -> None:
    img = tmp_path / "busy.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    before = img.read_bytes()
    holder = subprocess.Popen([QEMU_IO, "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ino = os.stat(img).st_ino
        for _ in range(200):  # wait until qemu-io holds its locks
            if f":{ino} " in Path("/proc/locks").read_text():
                break
            time.sleep(0.01)
        with pytest.raises(ImageLocked, match='Failed to get "write" lock'):
            _create(bg_new_session(), bg_runner.run, img, 4096)
        assert img.read_bytes() == before  # nothing was wiped
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
