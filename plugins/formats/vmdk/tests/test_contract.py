"""vmdk against the driver contract, for each writable subformat created by blockgraph itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockgraph.testing import DriverContract
from vmdk_helpers import bg_create


class VmdkContract(DriverContract):
    driver = "vmdk"
    persistent = True
    subformat = "monolithicSparse"
    create_opts: dict[str, Any] = {}
    invalid_options = {"x-allow-external-extents": "maybe"}
    supports_truncate = False  # as QEMU: vmdk cannot be resized

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        path = tmp_path / "disk.vmdk"
        bg_create(path, size, subformat=self.subformat, **self.create_opts)
        return {"file": {"driver": "file", "filename": str(path)}}


class TestMonolithicSparse(VmdkContract):
    subformat = "monolithicSparse"


class TestMonolithicSparseZeroedGrain(VmdkContract):
    subformat = "monolithicSparse"
    create_opts = {"zeroed_grain": "on"}


class TestMonolithicFlat(VmdkContract):
    subformat = "monolithicFlat"


class TestTwoGbMaxExtentSparse(VmdkContract):
    subformat = "twoGbMaxExtentSparse"


class TestStreamOptimized(VmdkContract):
    """Grains are appended compressed; rewrites append again (QEMU refuses them), so the whole contract holds."""

    subformat = "streamOptimized"
