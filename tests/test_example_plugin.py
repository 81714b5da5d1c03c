"""The third-party example (tests/example_plugin, distribution blockgraph-ramdisk) and the kit on it.

In-process: the module is registered on a per-test PluginHost (``extra=[(module, "ramdisk")]``) and
the example's own ``tests/test_contract.py`` class runs unchanged. Slow: the example is installed
into a fresh venv next to blockgraph, found through its entry point, and its tests pass there.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from blockgraph.driver import Capabilities
from blockgraph.plugins import PluginHost
from blockgraph.testing import Harness, run_checks
from helpers_venv import make_venv

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = Path(__file__).parent / "example_plugin"
GUIDE = ROOT / "docs/plugin-authors.md"


def guide_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ramdisk = _load("blockgraph_ramdisk", EXAMPLE / "blockgraph_ramdisk.py")
example_tests = _load("example_plugin_test_contract", EXAMPLE / "tests/test_contract.py")


def ramdisk_host() -> PluginHost:
    return PluginHost(autoload=False, extra=[(ramdisk, "ramdisk")])


class TestRamdiskInProcess(example_tests.TestRamdisk):
    """The example's conformance class exactly as its author wrote it, plus in-process registration."""

    extra_plugins = ((ramdisk, "ramdisk"),)
    autoload = False


def test_entry_point_names_the_module() -> None:
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "blockgraph-ramdisk"
    assert meta["project"]["entry-points"]["blockgraph"] == {"ramdisk": "blockgraph_ramdisk"}
    assert ramdisk_host().drivers["ramdisk"].target is ramdisk.RamdiskDriver


@pytest.mark.parametrize(("path", "lang"), [("blockgraph_ramdisk.py", "python"), ("pyproject.toml", "toml"),
                                           ("tests/test_contract.py", "python")])
def test_the_guide_shows_the_example_as_it_is(path: str, lang: str) -> None:
    assert (EXAMPLE / path).read_text() in guide_blocks(lang)


def test_the_driver_stays_small() -> None:
    assert len((EXAMPLE / "blockgraph_ramdisk.py").read_text().splitlines()) <= 50


def test_capabilities_and_fallbacks() -> None:
    caps = Capabilities.of(ramdisk.RamdiskDriver)
    assert caps.write and not (caps.zero or caps.discard or caps.block_status or caps.truncate)


def test_missing_capabilities_check_the_core_fallbacks() -> None:
    """Without Discarder, Truncatable or Reopenable the checks verify what the core does instead (discard
    ignored, truncate and reopen refused with the node unchanged): every check passes, none is skipped."""
    harness = Harness("ramdisk", {"size": "1M"}, plugins=ramdisk_host)
    outcomes = {o.check: o for o in asyncio.run(run_checks(harness))}
    assert {o.status for o in outcomes.values()} == {"passed"}, outcomes


# ---------------------------------------------------------------- installed for real


@pytest.mark.slow
def test_installed_example_passes_its_own_tests(tmp_path: Path) -> None:
    checkout = tmp_path / "blockgraph-ramdisk"
    shutil.copytree(EXAMPLE, checkout, ignore=shutil.ignore_patterns("__pycache__"))
    bindir = make_venv(tmp_path / "venv", str(ROOT), f"{checkout}[test]")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "BLOCKGRAPH_"))}

    listing = subprocess.run([str(bindir / "blockgraph"), "plugins"], cwd=checkout, env=env,
                             capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "blockgraph-ramdisk 0.1.0 (entry point 'ramdisk', blockgraph_ramdisk)" in listing.stdout
    assert "drivers: ramdisk" in listing.stdout

    run = subprocess.run([str(bindir / "python"), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                         cwd=checkout, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "15 passed in" in run.stdout and "skipped" not in run.stdout

    usage = next(b for b in guide_blocks("python") if "asyncio.run(main())" in b)
    (tmp_path / "usage.py").write_text(usage)
    used = subprocess.run([str(bindir / "python"), str(tmp_path / "usage.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert used.returncode == 0, used.stderr
