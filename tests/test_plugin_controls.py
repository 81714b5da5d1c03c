"""Choosing plugins: -p no:NAME, --plugin FILE, BLOCKGRAPH_LOAD_PLUGINS, autoload off, broken plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from blockgraph import hookimpl
from blockgraph.cli.main import main
from blockgraph.errors import DriverNotFound
from blockgraph.plugins import PluginHost

LOCAL_PLUGIN = '''
from blockgraph import hookimpl

@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_null.driver:NullCoDriver", name="local-null", kind="protocol")
'''


def _plugins_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert main([*args, "plugins", "--output=json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_blocking_a_plugin_by_entry_point_name(capsys: pytest.CaptureFixture[str]) -> None:
    names = {row["name"] for row in _plugins_json(capsys, "-p", "no:null")}
    assert "null" not in names and {"builtin", "file", "raw"} <= names


def test_a_one_off_plugin_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "myplugin.py"
    plugin.write_text(LOCAL_PLUGIN)
    rows = _plugins_json(capsys, "--plugin", str(plugin))
    local = [r for r in rows if r["name"] == f"local:{plugin}"]
    assert local and local[0]["drivers"] == ["local-null"]


def test_load_only_the_listed_distributions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKGRAPH_LOAD_PLUGINS", "blockgraph-raw")
    host = PluginHost()
    assert {p.dist for p in host.plugins} == {"blockgraph", "blockgraph-raw"}
    with pytest.raises(DriverNotFound, match="provided by blockgraph-file, which is not installed"):
        host.driver("file")
    monkeypatch.setenv("BLOCKGRAPH_LOAD_PLUGINS", "")
    assert {p.dist for p in PluginHost().plugins} == {"blockgraph"}


def test_autoload_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKGRAPH_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert [p.name for p in PluginHost().plugins] == ["builtin"]


def test_a_broken_plugin_is_reported_and_fatal_only_when_used(tmp_path: Path) -> None:
    """One plugin failing to import takes nobody else down; asking for its driver says why."""
    site = tmp_path / "site"
    info = site / "blockgraph_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: blockgraph-ssh\nVersion: 0.1\n\n")
    (info / "entry_points.txt").write_text("[blockgraph]\nbroken = blockgraph_broken_plugin\n")
    (site / "blockgraph_broken_plugin.py").write_text("raise ImportError('needs libfoo')\n")
    code = ("from blockgraph.plugins import PluginHost\nh = PluginHost()\n"
            "print([(p.name, p.error) for p in h.plugins if p.error])\nprint(sorted(h.drivers)[:3])\n"
            "try:\n    h.driver('ssh')\nexcept Exception as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "[('broken', 'ImportError: needs libfoo')]"
    assert "file" in lines[1]  # the others still load
    assert lines[2] == "driver 'ssh' is provided by blockgraph-ssh, which failed to load: ImportError: needs libfoo"


class _EverythingPlugin:
    """One plugin registering an entry of every kind, lazily by dotted path."""

    @staticmethod
    def _reg(register: Any, kind: str) -> None:
        register("json:dumps", name=f"demo-{kind}", help=f"a {kind}")

    @hookimpl
    def blockgraph_register_jobs(self, register: Any) -> None:
        self._reg(register, "job")

    @hookimpl
    def blockgraph_register_devices(self, register: Any) -> None:
        self._reg(register, "device")

    @hookimpl
    def blockgraph_register_exports(self, register: Any) -> None:
        self._reg(register, "export")

    @hookimpl
    def blockgraph_register_object_types(self, register: Any) -> None:
        self._reg(register, "object")

    @hookimpl
    def blockgraph_register_qmp_commands(self, register: Any) -> None:
        self._reg(register, "command")


def test_every_registry_is_filled_through_its_hook_and_resolved_lazily() -> None:
    host = PluginHost(autoload=False, extra=[(_EverythingPlugin(), "everything")])
    expected = {"jobs": "demo-job", "devices": "demo-device", "exports": "demo-export",
                "object_types": "demo-object", "qmp_commands": "demo-command"}
    for table, name in expected.items():
        entry = host.table(table)[name]
        assert entry.plugin == "everything" and entry.meta == {"help": name.replace("demo-", "a ")}
        assert entry.target == "json:dumps"  # not imported until used
        assert entry.resolve() is json.dumps
    assert {"img", "io", "plugins", "serve"} <= set(host.table("cli"))  # core's own, through the same hook
