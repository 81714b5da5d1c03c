"""The fast entry-point scanner agrees with importlib.metadata."""

from __future__ import annotations

import importlib.metadata as md
import sys
import zipfile
from pathlib import Path

import pytest
from blockgraph import entrypoints


@pytest.mark.parametrize("group", ["blockgraph", "console_scripts", "pytest11"])
def test_same_entry_points_as_importlib_metadata(group: str) -> None:
    ours = sorted((e.name, e.value, e.dist, e.version) for e in entrypoints.entry_points(group))
    theirs = sorted((e.name, e.value, e.dist.name, e.dist.version) for e in md.entry_points(group=group))
    assert ours == theirs and ours


def _dist(root: Path, name: str, version: str, value: str) -> None:
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n\n")
    (info / "entry_points.txt").write_text(f"[other]\nx = y\n\n[blockgraph]\nfake = {value}\n")


def test_an_earlier_path_entry_shadows_a_later_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _dist(tmp_path / "a", "blockgraph_fake", "2.0", "fake_new.plugin")
    _dist(tmp_path / "b", "blockgraph_fake", "1.0", "fake_old.plugin")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "a"), str(tmp_path / "b")])
    assert entrypoints.entry_points("blockgraph") == [
        entrypoints.EntryPoint("fake", "fake_new.plugin", "blockgraph-fake", "2.0")]


def test_a_zip_on_the_path_falls_back_to_importlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "deps.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: zipped\nVersion: 1.0\n\n")
        z.writestr("zipped-1.0.dist-info/entry_points.txt", "[blockgraph]\nzipped = zipped.plugin\n")
    monkeypatch.setattr(sys, "path", [str(archive)])
    assert [(e.name, e.dist) for e in entrypoints.entry_points("blockgraph")] == [("zipped", "zipped")]
