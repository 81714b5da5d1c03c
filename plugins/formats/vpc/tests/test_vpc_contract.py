"""vpc against the driver contract: each subformat, and a differencing disk over a parent with data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockgraph.testing import DriverContract
from blockgraph_vpc.create import create_differencing
from vpc_helpers import arun, create

MiB = 1 << 20
CHS_EXACT = 4 * 17 * 31 * 512  # 1079296: a size CHS geometry represents exactly


def _image(tmp_path: Path, size: int, **opts: str) -> dict[str, Any]:
    path = tmp_path / "disk.vhd"
    create(path, size, **opts)
    return {"file": {"driver": "file", "filename": str(path)}}


class TestVpcDynamic(DriverContract):
    driver = "vpc"
    persistent = True
    size = 5 * MiB  # three 2 MiB blocks, the last one partial

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return _image(tmp_path, size, subformat="dynamic", force_size="on")


class TestVpcDynamicChs(DriverContract):
    driver = "vpc"
    persistent = True
    size = CHS_EXACT

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return _image(tmp_path, size)


class TestVpcFixed(DriverContract):
    driver = "vpc"
    persistent = True
    size = CHS_EXACT
    invalid_options = {"force_size_calc": "cylinders"}

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return _image(tmp_path, size, subformat="fixed")


class TestVpcDifferencing(DriverContract):
    """A child over a parent holding a pattern: unwritten sectors show the parent's data."""

    driver = "vpc"
    persistent = True
    size = 3 * MiB

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        from vpc_helpers import write_at

        parent = tmp_path / "parent.vhd"
        create(parent, size, force_size="on")
        write_at(parent, [(0, b"\x5a" * 4096), (size - 8192, b"\xa5" * 8192), (MiB + 512, b"\x42" * 1024)])
        child = tmp_path / "child.vhd"
        arun(_diff(child, parent))
        return {"file": {"driver": "file", "filename": str(child)}}


async def _diff(child: Path, parent: Path) -> None:
    from blockgraph.session import Session

    session = Session()
    try:
        await create_differencing(session, str(child), str(parent))
    finally:
        await session.close()
