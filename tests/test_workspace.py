"""The workspace stays consistent: members, install list, entry points and the known-drivers table."""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from pathlib import Path

from blockgraph.plugins import GROUP, KNOWN_DRIVERS, PluginHost

ROOT = Path(__file__).resolve().parents[1]


def _members() -> list[Path]:
    return sorted(p.parent for p in ROOT.glob("plugins/*/*/pyproject.toml") if "_template" not in p.parts)


def test_requirements_list_every_workspace_member() -> None:
    lines = (ROOT / "requirements/all.txt").read_text().splitlines()
    listed = {line.split()[1] for line in lines if line.startswith("-e plugins/")}
    assert listed == {str(m.relative_to(ROOT)) for m in _members()}


def test_every_member_is_a_uv_workspace_source() -> None:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources = set(root["tool"]["uv"]["sources"])
    for m in _members():
        name = tomllib.loads((m / "pyproject.toml").read_text())["project"]["name"]
        assert name in sources, f"{name} missing from [tool.uv.sources]"


def test_each_member_has_one_entry_point_named_after_it_and_a_readme() -> None:
    for m in _members():
        project = tomllib.loads((m / "pyproject.toml").read_text())["project"]
        eps = project["entry-points"][GROUP]
        assert list(eps) == [m.name], f"{m}: entry points {list(eps)}"
        assert eps[m.name].endswith(".plugin")
        assert (m / "README.md").is_file() and (m / "tests").is_dir()


def test_entry_point_names_are_unique() -> None:
    names = [ep.name for ep in entry_points(group=GROUP)]
    assert len(names) == len(set(names))


def test_known_drivers_table_matches_installed_plugins() -> None:
    host = PluginHost()
    for name, entry in host.drivers.items():
        assert KNOWN_DRIVERS.get(name) == entry.dist, f"KNOWN_DRIVERS[{name!r}] should be {entry.dist!r}"


def test_plugin_modules_are_import_light() -> None:
    """Registering drivers must not import them: that is what keeps start-up fast."""
    import subprocess
    import sys

    code = ("import sys; from blockgraph.plugins import PluginHost; PluginHost(); "
            "print(sorted(m for m in sys.modules if m.endswith('.driver') and m.startswith('blockgraph_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
