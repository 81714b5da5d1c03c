"""Running ``blockgraph img`` in-process for the tests/test_cli_img_*.py files, and image helpers."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import attrs


@attrs.frozen
class Result:
    rc: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def img(*args: str) -> Result:
    """``blockgraph img ARGS...`` in this process; stdout, stderr and the exit status."""
    from blockgraph.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["img", *args])
    return Result(rc, out.getvalue(), err.getvalue())


def make_image(path: Path, size: int, extents: dict[int, bytes] | None = None) -> Path:
    """A sparse raw file of ``size`` bytes with ``extents`` ({offset: data}) written into it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, data in (extents or {}).items():
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return path


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The file's allocated ranges, from SEEK_DATA / SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def pattern(byte: int, length: int) -> bytes:
    return bytes([byte]) * length
