"""null-co and null-aio against the driver contract: a disk that stores nothing and reads zeros."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
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


def test_img_info_shows_no_disk_usage_like_qemu(capsys: pytest.CaptureFixture[str]) -> None:
    from blockgraph.cli.main import main

    assert main(["img", "info", "--output=json", "null-co://"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["actual-size"] == 0 and info["virtual-size"] == 1 << 30 and info["format"] == "raw"
