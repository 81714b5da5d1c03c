"""The conformance kit itself: it passes correct drivers, and every check fails on a broken one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
from blockgraph.driver import DriverKind, ReqFlags
from blockgraph.errors import DriverNotFound
from blockgraph.options import opt, parse_size
from blockgraph.plugins import PluginHost
from blockgraph.testing import (
    CHECKS,
    ContractViolation,
    DriverContract,
    FilterContract,
    Harness,
    NotApplicable,
    contract,
    memdisk,
    mutants,
)
from blockgraph.testing.contract import FILTER_CHECKS, run_checks

SIZE = 1 << 20


def memdisk_host() -> PluginHost:
    return PluginHost(autoload=False, extra=[(memdisk, "blockgraph-testing-memdisk")])


def mutant_host() -> PluginHost:
    return PluginHost(autoload=False, extra=[(memdisk, "blockgraph-testing-memdisk"),
                                             (mutants, "blockgraph-testing-mutants")])


@pytest.fixture(autouse=True)
def _forget_stores() -> Iterator[None]:
    before = set(memdisk.STORES)
    yield
    for key in set(memdisk.STORES) - before:
        del memdisk.STORES[key]


def memdisk_harness(driver: str = "testing-memdisk", host: Any = memdisk_host, **kw: Any) -> Harness:
    declared: dict[str, Any] = {"persistent": True, "discard_reads_zero": True,
                                "invalid_options": {"block-size": "3"}}
    declared.update(kw)
    options = {"size": SIZE, "id": uuid.uuid4().hex, **declared.pop("options", {})}
    return Harness(driver, options, size=SIZE, plugins=host, **declared)


def run(check: Any, harness: Harness) -> None:
    asyncio.run(check(harness))


# ---------------------------------------------------------------- correct drivers pass


class TestMemdisk(DriverContract):
    driver = "testing-memdisk"
    extra_plugins = ((memdisk, "blockgraph-testing-memdisk"),)
    autoload = False
    persistent = True
    discard_reads_zero = True
    supports_truncate = True
    invalid_options = {"block-size": "3", "size": "-1"}

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return {"size": size, "id": uuid.uuid4().hex}


class TestMemdiskSectors(TestMemdisk):
    """512-byte request alignment: every unaligned request goes through core's read-modify-write."""

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return {"size": size, "id": uuid.uuid4().hex, "block-size": 512}


class TestMemdiskLimits(TestMemdisk):
    """Small max-transfer and a discard granularity: core splits requests and drops unaligned discard edges."""

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return {"size": size, "id": uuid.uuid4().hex, "block-size": 512, "max-transfer": "8k",
                "discard-granularity": "64k"}


class TestPassthroughFilter(FilterContract):
    driver = "testing-passthrough"
    extra_plugins = ((memdisk, "blockgraph-testing-memdisk"),)
    autoload = False
    discard_reads_zero = True


# ---------------------------------------------------------------- every check can fail


def test_every_check_has_a_mutant() -> None:
    assert set(mutants.TARGETS) == set(CHECKS)
    assert set(mutants.FILTER_TARGETS) - set(CHECKS) == set(FILTER_CHECKS)


@pytest.mark.parametrize(("check", "mutant", "declared"),
                         [(c, m, d) for c, ms in mutants.TARGETS.items() for m, d in ms],
                         ids=[f"{c}-{m}" for c, ms in mutants.TARGETS.items() for m, _ in ms])
def test_check_fails_on_its_mutant(check: str, mutant: str, declared: dict[str, Any]) -> None:
    harness = memdisk_harness(mutant, mutant_host, **declared)
    with pytest.raises(ContractViolation) as info:
        run(CHECKS[check], harness)
    assert str(info.value)  # the violation explains itself


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_check_passes_on_the_reference_driver(check: str) -> None:
    run(CHECKS[check], memdisk_harness(supports_truncate=True))


@pytest.mark.parametrize(("check", "mutant"), [(c, m) for c, ms in mutants.FILTER_TARGETS.items() for m in ms])
def test_filter_check_fails_on_its_mutant(check: str, mutant: str) -> None:
    store = uuid.uuid4().hex
    harness = Harness(mutant, {"file": {"driver": "testing-memdisk", "id": store, "size": SIZE}}, size=SIZE,
                      plugins=mutant_host, persistent=True, child_store=store)
    with pytest.raises(ContractViolation):
        run({**CHECKS, **FILTER_CHECKS}[check], harness)


def test_mutant_messages_say_what_broke() -> None:
    with pytest.raises(ContractViolation, match=r"first at offset \d+"):
        run(contract.check_read_back_aligned, memdisk_harness(mutants.OffByOneRead.name, mutant_host))
    torn = r"round \d+: (concurrent read|after concurrent writes|data that no concurrent write)"
    with pytest.raises(ContractViolation, match=torn):
        run(contract.check_concurrent, memdisk_harness(mutants.SeekThenWrite.name, mutant_host))
    with pytest.raises(ContractViolation, match="must name node 'contract-opt'"):
        run(contract.check_option_errors, memdisk_harness(mutants.VagueOptionError.name, mutant_host))
    with pytest.raises(ContractViolation, match="registered with kind=format but the class says protocol"):
        run(contract.check_declared_capabilities, memdisk_harness(mutants.KindLiar.name, mutant_host))
    with pytest.raises(ContractViolation, match="a second opener after flush"):
        run(contract.check_flush, memdisk_harness(mutants.WriteBack.name, mutant_host))
    with pytest.raises(ContractViolation, match="a second opener after a FUA write"):
        run(contract.check_flush, memdisk_harness(mutants.FuaIgnored.name, mutant_host))


def test_wrong_declarations_fail() -> None:
    """Declaring a guarantee the driver does not give is caught, not skipped."""
    with pytest.raises(ContractViolation, match="declares discard_reads_zero"):
        run(contract.check_discard, memdisk_harness(mutants.DiscardNoop.name, mutant_host))
    with pytest.raises(ContractViolation, match="declares supports_truncate = False"):
        run(contract.check_truncate, memdisk_harness(supports_truncate=False))
    with pytest.raises(ContractViolation, match="read-back of the write"):
        run(contract.check_read_back_aligned, memdisk_harness(stores_data=False))


# ---------------------------------------------------------------- skips name the missing capability


@attrs.frozen(kw_only=True)
class TinyOptions:
    size: int = opt(converter=parse_size)


class Tiny:
    """Only the required protocol plus Writable: no Discarder, no Truncatable, no BlockStatusReporter."""

    name: ClassVar[str] = "tiny"
    kind: ClassVar[DriverKind] = DriverKind.PROTOCOL
    api_version: ClassVar[int] = 1
    Options: ClassVar[type] = TinyOptions

    async def open(self, node: Any, options: TinyOptions) -> None:
        self.disk = bytearray(options.size)

    async def close(self) -> None:
        self.disk = bytearray()

    async def getlength(self) -> int:
        return len(self.disk)

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        buf[:] = self.disk[offset:offset + len(buf)]

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self.disk[offset:offset + len(buf)] = buf

    async def flush(self) -> None:
        """Nothing to do."""


class TinyPlugin:
    from blockgraph import hookimpl

    @hookimpl
    def blockgraph_register_drivers(self, register: Any) -> None:
        register(Tiny)


class TestTiny(DriverContract):
    """A minimal driver passes everything: what it lacks is checked through the core's fallbacks."""

    driver = "tiny"
    options = {"size": "1M"}
    extra_plugins = ((TinyPlugin(), "tiny"),)
    autoload = False


def test_a_missing_capability_checks_the_fallback_and_can_fail(tmp_path: Path) -> None:
    """tiny has no Discarder/Truncatable: discard must change nothing and truncate must be refused. A
    supports_truncate = True claim without Truncatable fails instead of passing or skipping."""
    suite = TestTiny()
    suite.run_check(contract.check_discard, tmp_path)
    suite.run_check(contract.check_truncate, tmp_path / "t")

    class TestBoasting(TestTiny):
        supports_truncate = True

    with pytest.raises(ContractViolation, match="declares supports_truncate = True but does not implement Truncatable"):
        TestBoasting().run_check(contract.check_declared_capabilities, tmp_path / "b")


def test_unknown_driver_fails_with_an_install_hint(tmp_path: Path) -> None:
    class TestNobody(DriverContract):
        driver = "no-such-driver"
        autoload = False

    with pytest.raises(pytest.fail.Exception, match=r"Unknown driver 'no-such-driver'.*install the plugin"):
        TestNobody().run_check(contract.check_reopen, tmp_path)


def test_run_checks_without_pytest() -> None:
    tiny = Harness("tiny", {"size": SIZE}, size=SIZE,
                   plugins=lambda: PluginHost(autoload=False, extra=[(TinyPlugin(), "tiny")]))
    outcomes = {o.check: o for o in asyncio.run(run_checks(tiny))}
    assert set(outcomes) == set(CHECKS)
    assert {o.status for o in outcomes.values()} == {"passed"}, outcomes
    bad = asyncio.run(run_checks(memdisk_harness(mutants.StatusLiar.name, mutant_host), ["block_status"]))
    assert [(o.check, o.status) for o in bad] == [("block_status", "failed")]
    assert "ContractViolation" in bad[0].message


def test_not_applicable_is_not_a_failure() -> None:
    assert not issubclass(NotApplicable, AssertionError)
    assert issubclass(ContractViolation, AssertionError)


# ---------------------------------------------------------------- the pytest plugin's fixtures


def test_markers_are_registered(pytestconfig: pytest.Config) -> None:
    markers = pytestconfig.getini("markers")
    assert any(m.startswith("interop:") for m in markers)
    assert any(m.startswith("slow:") for m in markers)


def test_bg_plugins_registers_in_process(bg_plugins: Any, bg_new_session: Any, bg_runner: asyncio.Runner) -> None:
    host = bg_plugins((memdisk, "blockgraph-testing-memdisk"), autoload=False)
    assert "testing-memdisk" in host.drivers
    assert "testing-memdisk" not in PluginHost(autoload=False).drivers  # nothing leaked into other hosts
    session = bg_new_session(host)
    node = bg_runner.run(session.open_node({"driver": "testing-memdisk", "size": 4096}))
    assert node.length == 4096
    with pytest.raises(DriverNotFound):
        bg_plugins(autoload=False).driver("testing-memdisk")


def test_bg_plugins_accepts_a_module_by_its_name(bg_plugins: Any) -> None:
    host = bg_plugins(memdisk, autoload=False)
    assert host.drivers["testing-memdisk"].plugin == memdisk.__name__


def test_null_node(null_node: Any, bg_runner: asyncio.Runner) -> None:
    from blockgraph import io

    assert null_node.driver_name == "null-co" and null_node.length == 64 << 20
    buf = bytearray(b"\xff" * 4096)
    bg_runner.run(io.preadv(null_node, 12345, memoryview(buf)))
    assert buf == bytes(4096)


def test_bg_tmp_image(bg_tmp_image: Any, bg_session: Any, bg_runner: asyncio.Runner) -> None:
    path = bg_tmp_image(8192, data=b"hello")
    assert path.stat().st_size == 8192
    node = bg_runner.run(bg_session.open_image(str(path), fmt="raw", read_only=True))
    buf = bytearray(8)
    from blockgraph import io

    bg_runner.run(io.preadv(node, 0, memoryview(buf)))
    assert bytes(buf) == b"hello\0\0\0"
    assert bg_tmp_image() != path
