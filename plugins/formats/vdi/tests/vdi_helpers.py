"""Helpers of the vdi tests: the shared interop helpers with vdi as the default format."""

from __future__ import annotations

from asyncio import run as arun
from pathlib import Path
from typing import Any

from blockgraph.testing import peers
from blockgraph.testing.peers import QEMU_IMG, QEMU_IO, bg, needs_qemu, qemu_raw, run

__all__ = ["QEMU_IMG", "QEMU_IO", "arun", "bg", "create", "needs_qemu", "qemu_raw", "read_all", "run", "with_image",
           "write_at"]
FMT = "vdi"


def with_image(path: Path | str, fn: Any, *, read_only: bool = False, fmt: str = FMT,
               extra: dict[str, Any] | None = None) -> Any:
    return peers.with_image(path, fmt, fn, read_only=read_only, extra=extra)


def read_all(path: Path | str, fmt: str = FMT, extra: dict[str, Any] | None = None) -> bytes:
    return peers.read_all(path, fmt, extra)


def write_at(path: Path | str, writes: list[tuple[int, bytes]], fmt: str = FMT) -> None:
    peers.write_at(path, fmt, writes)


def create(path: Path | str, size: int | str, fmt: str = FMT, **opts: str) -> None:
    peers.create(path, size, fmt, **opts)
