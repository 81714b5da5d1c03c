"""null-co and null-aio against the driver contract: a disk that stores nothing and reads zeros."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockgraph.testing import DriverContract


class TestNullCo(DriverContract):
    driver = "null-co"
    stores_data = False  # writes vanish; with read-zeroes=on every read returns zeros
    persistent = False
    invalid_options = {"latency-ns": "-1", "read-zeroes": "maybe", "size": "lots"}
    # No Discarder and no Truncatable: those checks skip and say so.

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return {"size": size, "read-zeroes": "on"}


class TestNullAio(TestNullCo):
    driver = "null-aio"


class TestNullCoLatency(TestNullCo):
    """With latency-ns every request really waits, so concurrent requests overlap in time."""

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return {"size": size, "read-zeroes": "on", "latency-ns": 20000}
