"""qcow2 against the driver contract: v3, v2, extended L2 entries, small clusters, over an external data file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockgraph.testing import DriverContract
from blockgraph_qcow2.testing import bg_create


class TestQcow2V3(DriverContract):
    driver = "qcow2"
    persistent = True
    discard_reads_zero = True  # v3 discard leaves zero clusters
    invalid_options = {"l2-cache-size": "nope", "cache-clean-interval": "x", "overlap-check": "some",
                       "lazy-refcounts": "maybe"}
    create: dict[str, Any] = {}

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        path = bg_create(tmp_path / "disk.qcow2", size, **self.create)
        return {"file": {"driver": "file", "filename": str(path)}}


class TestQcow2V2(TestQcow2V3):
    create = {"compat": "0.10"}
    discard_reads_zero = True  # v2 discard unmaps, and there is no backing file


class TestQcow2ExtendedL2(TestQcow2V3):
    create = {"extended_l2": "on", "cluster_size": "32k"}


class TestQcow2SmallClusters(TestQcow2V3):
    create = {"cluster_size": "512", "refcount_bits": "1"}


class TestQcow2LazyRefcounts64(TestQcow2V3):
    create = {"lazy_refcounts": "on", "refcount_bits": "64", "cluster_size": "4k"}


class TestQcow2DataFile(DriverContract):
    driver = "qcow2"
    persistent = True
    discard_reads_zero = True

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        path = bg_create(tmp_path / "disk.qcow2", size, data_file=str(tmp_path / "disk.data"))
        return {"file": {"driver": "file", "filename": str(path)}}
