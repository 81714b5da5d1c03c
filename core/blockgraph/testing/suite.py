"""pytest base classes that run the driver contract (fsspec's abstract-test pattern).

A plugin's whole conformance file::

    from blockgraph.testing import DriverContract

    class TestRamdisk(DriverContract):
        driver = "ramdisk"
        options = {"size": "1M"}

Class attributes declare what the driver guarantees (``persistent``, ``stores_data``,
``discard_reads_zero``, ``supports_truncate``, ...); override ``make_options(tmp_path, size)``
when the options need files. Each test method runs one check of :mod:`blockgraph.testing.contract`
on a fresh event loop (``asyncio.Runner``), so no pytest-asyncio is needed. A capability the driver does
not implement is checked through the core's fallback for it (discard ignored, truncate and reopen refused).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ..errors import BlockGraphError
from ..options import merge
from ..plugins import PluginHost
from . import contract
from .contract import Harness, NotApplicable

CheckFn = Callable[[Harness], Awaitable[None]]


class DriverContract:
    """Inherit, set ``driver`` and ``options`` (or ``make_options``), declare guarantees; pytest does the rest."""

    driver: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    size: ClassVar[int] = 1 << 20  # at least 256 KiB; the image the options describe must have this size

    persistent: ClassVar[bool] = False  # data survives close and open again
    stores_data: ClassVar[bool] = True  # False: writes vanish and reads return zeros (null-co)
    discard_reads_zero: ClassVar[bool] = False  # discarded ranges read as zeros (else zeros or old data)
    supports_truncate: ClassVar[bool | None] = None  # None: whatever the class implements; False: must refuse
    concurrent_open: ClassVar[bool] = True  # a read-only force-share open may run beside a writer
    invalid_options: ClassVar[dict[str, Any]] = {}  # key -> bad value; each must be an OptionError
    concurrent_requests: ClassVar[int] = 64

    extra_plugins: ClassVar[Sequence[tuple[Any, str]]] = ()  # registered in-process on every session
    autoload: ClassVar[bool] = True  # also load installed plugins (entry points)

    # ------------------------------------------------------------ hooks for authors

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        """The driver's option tree (without ``driver``) for an image of ``size`` bytes."""
        return dict(self.options)

    def make_plugins(self) -> PluginHost:
        """The PluginHost of each session the checks open."""
        return PluginHost(autoload=self.autoload, extra=list(self.extra_plugins))

    def make_harness(self, tmp_path: Path) -> Harness:
        return Harness(
            driver=self.driver, options=self.make_options(tmp_path, self.size), size=self.size,
            plugins=self.make_plugins, persistent=self.persistent, stores_data=self.stores_data,
            discard_reads_zero=self.discard_reads_zero, supports_truncate=self.supports_truncate,
            concurrent_open=self.concurrent_open, invalid_options=dict(self.invalid_options),
            concurrent_requests=self.concurrent_requests)

    # ------------------------------------------------------------ running one check

    def run_check(self, check: CheckFn, tmp_path: Path) -> None:
        if not self.driver:
            pytest.fail(f"{type(self).__name__} must set the class attribute 'driver'")
        try:
            self.make_plugins().driver(self.driver)
        except BlockGraphError as e:
            pytest.fail(f"{e} (install the plugin, e.g. pip install -e ., or list it in extra_plugins)")
        harness = self.make_harness(tmp_path)
        try:
            with asyncio.Runner() as runner:
                runner.run(check(harness))
        except NotApplicable as e:
            pytest.skip(str(e))
        finally:
            self.cleanup(harness)

    def cleanup(self, harness: Harness) -> None:
        """Release what ``make_options`` made outside ``tmp_path`` (nothing by default)."""

    # ------------------------------------------------------------ one test per contract

    def test_read_back_aligned(self, tmp_path: Path) -> None:
        self.run_check(contract.check_read_back_aligned, tmp_path)

    def test_read_back_unaligned(self, tmp_path: Path) -> None:
        self.run_check(contract.check_read_back_unaligned, tmp_path)

    def test_write_zeroes(self, tmp_path: Path) -> None:
        self.run_check(contract.check_write_zeroes, tmp_path)

    def test_discard(self, tmp_path: Path) -> None:
        self.run_check(contract.check_discard, tmp_path)

    def test_block_status(self, tmp_path: Path) -> None:
        self.run_check(contract.check_block_status, tmp_path)

    def test_flush(self, tmp_path: Path) -> None:
        self.run_check(contract.check_flush, tmp_path)

    def test_truncate(self, tmp_path: Path) -> None:
        self.run_check(contract.check_truncate, tmp_path)

    def test_out_of_range(self, tmp_path: Path) -> None:
        self.run_check(contract.check_out_of_range, tmp_path)

    def test_read_only(self, tmp_path: Path) -> None:
        self.run_check(contract.check_read_only, tmp_path)

    def test_concurrent(self, tmp_path: Path) -> None:
        self.run_check(contract.check_concurrent, tmp_path)

    def test_reopen(self, tmp_path: Path) -> None:
        self.run_check(contract.check_reopen, tmp_path)

    def test_live_reopen(self, tmp_path: Path) -> None:
        self.run_check(contract.check_live_reopen, tmp_path)

    def test_close_idempotent(self, tmp_path: Path) -> None:
        self.run_check(contract.check_close_idempotent, tmp_path)

    def test_option_errors(self, tmp_path: Path) -> None:
        self.run_check(contract.check_option_errors, tmp_path)

    def test_declared_capabilities(self, tmp_path: Path) -> None:
        self.run_check(contract.check_declared_capabilities, tmp_path)


class FilterContract(DriverContract):
    """The driver contract for ``kind=FILTER`` drivers, plus forwarding.

    The filter is stacked over ``testing-memdisk`` (a correct in-memory driver that records
    the calls reaching it), so every data check also proves the filter does not change data.
    ``options`` are the filter's own options; the child goes under ``child`` (default ``file``).
    """

    child: ClassVar[str] = "file"
    persistent: ClassVar[bool] = True  # the memdisk store outlives each open
    discard_reads_zero: ClassVar[bool] = False

    def make_plugins(self) -> PluginHost:
        from . import memdisk

        extra = list(self.extra_plugins)
        if all(obj is not memdisk for obj, _name in extra):
            extra.append((memdisk, "blockgraph-testing-memdisk"))
        return PluginHost(autoload=self.autoload, extra=extra)

    def make_harness(self, tmp_path: Path) -> Harness:
        harness = super().make_harness(tmp_path)
        store = f"filter-{uuid.uuid4().hex}"
        harness.options = merge(harness.options, {
            self.child: {"driver": "testing-memdisk", "id": store, "size": self.size}})
        harness.child_store = store
        return harness

    def cleanup(self, harness: Harness) -> None:
        from .memdisk import STORES

        STORES.pop(harness.child_store or "", None)
        super().cleanup(harness)

    def test_filter_forwarding(self, tmp_path: Path) -> None:
        self.run_check(contract.check_filter_forwarding, tmp_path)
