"""Format probing, and why a probed raw image must not be rewritten into another format."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from blockgraph.errors import BlockIOError
from blockgraph.session import RAW_PROBE_WARNING
from helpers_drivers import TCOW_MAGIC, drivers_plugin


@pytest.fixture
def warnings() -> list[str]:
    return []


@pytest.fixture
def session(bg_plugins: Any, bg_new_session: Any, warnings: list[str]) -> Any:
    """The installed drivers plus ``tcow``, whose probe recognises its magic in the first bytes."""
    return bg_new_session(bg_plugins(drivers_plugin()), warn=warnings.append)


def header(magic: bytes = TCOW_MAGIC) -> memoryview:
    return memoryview(bytearray(magic + bytes(512 - len(magic))))


def test_probing_picks_the_best_score(session: Any, bg_runner: Any, bg_tmp_image: Any, warnings: list[str]) -> None:
    plain = bg_tmp_image(size=65536, data=b"hello")
    magic = bg_tmp_image(size=65536, data=TCOW_MAGIC)
    assert bg_runner.run(session.open_image(str(magic))).driver_name == "tcow"
    assert warnings == []
    node = bg_runner.run(session.open_image(str(plain)))
    assert node.driver_name == "raw" and node.probed_raw
    assert warnings == [RAW_PROBE_WARNING.format(plain)]


def test_probed_raw_refuses_a_first_sector_that_would_probe_as_another_format(
        session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=65536, data=b"\x07" * 1024)
    blk = bg_runner.run(session.open_backend(str(path), share_all=True))
    assert blk.node.driver_name == "raw" and blk.node.probed_raw
    for offset, data in ((0, header()), (0, memoryview(bytearray(TCOW_MAGIC + bytes(8000))))):
        with pytest.raises(BlockIOError) as info:
            bg_runner.run(blk.pwritev(offset, data))
        assert info.value.errno == errno.EPERM and info.value.strerror == "Operation not permitted"
    # Built up piecewise: the read-modify-write still hands the whole first sector to the check.
    bg_runner.run(blk.pwritev(0, memoryview(bytearray(TCOW_MAGIC[:2]))))
    with pytest.raises(BlockIOError, match="Operation not permitted"):
        bg_runner.run(blk.pwritev(2, memoryview(bytearray(TCOW_MAGIC[2:]))))
    assert path.read_bytes()[:6] == TCOW_MAGIC[:2] + b"\x07" * 4


def test_probed_raw_accepts_harmless_writes(session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=65536)
    blk = bg_runner.run(session.open_backend(str(path), share_all=True))
    bg_runner.run(blk.pwritev(0, memoryview(bytearray(b"QQQQ"))))  # unaligned, first sector, harmless
    bg_runner.run(blk.pwritev(4096, header()))  # the magic outside the first sector is just data
    assert path.read_bytes()[:4] == b"QQQQ" and path.read_bytes()[4096:4102] == TCOW_MAGIC
    bg_runner.run(blk.pwrite_zeroes(0, 512))
    bg_runner.run(blk.pwritev(100, memoryview(bytearray(b"x" * 1000))))
    assert path.read_bytes()[:1536] == bytes(100) + b"x" * 1000 + bytes(436)


def test_explicit_raw_has_no_restriction(session: Any, bg_runner: Any, bg_tmp_image: Any,
                                         warnings: list[str]) -> None:
    path = bg_tmp_image(size=65536)
    blk = bg_runner.run(session.open_backend(str(path), fmt="raw", share_all=True))
    assert not blk.node.probed_raw and blk.node.limits.request_alignment == 1
    bg_runner.run(blk.pwritev(0, header()))
    bg_runner.run(blk.close())
    assert path.read_bytes()[:6] == TCOW_MAGIC and warnings == []
    # ...which is exactly the hazard: the next probe sees the other format.
    assert bg_runner.run(session.open_image(str(path), read_only=True)).driver_name == "tcow"


def test_read_only_probe_does_not_warn(session: Any, bg_runner: Any, bg_tmp_image: Any,
                                       warnings: list[str]) -> None:
    path = bg_tmp_image(size=4096)
    node = bg_runner.run(session.open_image(str(path), read_only=True))
    assert node.driver_name == "raw" and warnings == []


@pytest.mark.interop
@pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-io is not installed")
def test_warning_text_is_qemus(session: Any, bg_runner: Any, tmp_path: Path, warnings: list[str]) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(65536))
    qemu = subprocess.run(["qemu-io", "-c", "read 0 512", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert qemu.returncode == 0
    bg_runner.run(session.open_image(str(path)))
    assert warnings and warnings[0] + "\n" == qemu.stderr


def test_probing_imports_no_format_driver_module() -> None:
    """Formats register light probe functions, so probing (every open without -f) imports no driver module."""
    import sys

    from blockgraph.plugins import PluginHost

    code = ("import sys; from blockgraph.plugins import PluginHost; h = PluginHost(); "
            "print(h.probe(b'QFI\\xfb\\x00\\x00\\x00\\x03' + bytes(2040), 'x')); "
            "print(sorted(m for m in sys.modules if m.startswith('blockgraph_') and m.endswith('.driver')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    installed = PluginHost().drivers
    if "qcow2" in installed:
        assert out[0] == "qcow2"
    assert out[1] in ("[]", "['blockgraph_raw.driver']")  # raw's probe is its class's (score 1, always)
