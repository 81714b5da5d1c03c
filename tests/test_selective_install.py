"""Selective installs: a venv with only blockgraph, blockgraph-file and blockgraph-raw does everything raw,
and asking for a driver that is not installed names the distribution that provides it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers_venv import make_venv

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths = [str(ROOT), str(ROOT / "plugins/protocols/file"), str(ROOT / "plugins/formats/raw")]
    return make_venv(tmp_path_factory.mktemp("selective") / "venv", *paths)


def _run(bindir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run([str(bindir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True)


def test_only_the_three_distributions_are_installed(venv_bin: Path, tmp_path: Path) -> None:
    out = _run(venv_bin, "blockgraph", "plugins", "--output=json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    import json

    dists = {row["dist"] for row in json.loads(out.stdout)}
    assert dists == {"blockgraph", "blockgraph-file", "blockgraph-raw"}


def test_raw_works_end_to_end(venv_bin: Path, tmp_path: Path) -> None:
    script = (
        "import blockgraph\n"
        "with blockgraph.open('disk.img', 'raw') as d:\n"
        "    d.write(4096, b'selective' * 100)\n"
        "    d.flush()\n"
        "with blockgraph.open('disk.img', 'raw', read_only=True) as d:\n"
        "    assert d.read(4096, 9) == b'selective', d.read(4096, 9)\n"
        "    print(d.length)\n"
    )
    assert _run(venv_bin, "blockgraph", "img", "create", "-f", "raw", "disk.img", "1M", cwd=tmp_path).returncode == 0
    out = _run(venv_bin, "python", "-c", script, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(1 << 20)
    io = _run(venv_bin, "blockgraph", "io", "-f", "raw", "-c", "read -P 0 0 4k", "disk.img", cwd=tmp_path)
    assert io.returncode == 0, io.stdout + io.stderr
    info = _run(venv_bin, "blockgraph", "img", "info", "disk.img", cwd=tmp_path)
    assert "file format: raw" in info.stdout, info.stdout + info.stderr


@pytest.mark.parametrize(("fmt", "dist"), [("qcow2", "blockgraph-qcow2"), ("null-co", "blockgraph-null"),
                                           ("vmdk", "blockgraph-vmdk")])
def test_missing_driver_names_its_distribution(venv_bin: Path, tmp_path: Path, fmt: str, dist: str) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(65536))
    out = _run(venv_bin, "blockgraph", "img", "info", "-f", fmt, "disk.img", cwd=tmp_path)
    assert out.returncode != 0
    assert f"driver '{fmt}' is provided by {dist}, which is not installed" in out.stderr, out.stderr
    script = (f"import blockgraph\ntry:\n    blockgraph.open('disk.img', '{fmt}')\n"
              "except Exception as e:\n    print(e)\n")
    py = _run(venv_bin, "python", "-c", script, cwd=tmp_path)
    assert f"provided by {dist}" in py.stdout, py.stdout + py.stderr
