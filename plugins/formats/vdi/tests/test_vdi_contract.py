"""vdi against the driver contract: dynamic and static images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockgraph.testing import DriverContract
from vdi_helpers import create

MiB = 1 << 20


def _image(tmp_path: Path, size: int, **opts: str) -> dict[str, Any]:
    path = tmp_path / "disk.vdi"
    create(path, size, **opts)
    return {"file": {"driver": "file", "filename": str(path)}}


class TestVdiDynamic(DriverContract):
    driver = "vdi"
    persistent = True
    size = 3 * MiB + 512 * 7  # the last block partial

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return _image(tmp_path, size)


class TestVdiStatic(DriverContract):
    driver = "vdi"
    persistent = True
    size = 2 * MiB

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return _image(tmp_path, size, static="on")
