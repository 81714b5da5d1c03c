"""``blockgraph img amend`` on qcow2 against ``qemu-img amend`` on a copy: same result, same refusals."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
from blockgraph_qcow2.testing import HAVE_QEMU, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")


def bg(*args: str) -> tuple[int, str, str]:
    from blockgraph.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["img", *args])
    return rc, out.getvalue(), err.getvalue()


def info(path: Path) -> list[str]:
    return [line for line in qemu_img("info", str(path)).stdout.splitlines()
            if not line.startswith(("image:", "disk size:"))]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    x, y = tmp_path / "x.qcow2", tmp_path / "y.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(x), "4M")
    qemu_io(x, "write -P 1 0 1M", "write -z 2M 128k", "write -c -P 2 3M 64k")
    shutil.copy(x, y)
    return x, y


def amend_both(x: Path, y: Path, *args: str) -> None:
    real = qemu_img("amend", *args, str(x), check=False)
    assert bg("amend", *args, str(y)) == (real.returncode, real.stdout, real.stderr)
    r = qemu_img("check", str(y), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert info(y) == info(x)
    assert qemu_img("compare", str(x), str(y), check=False).returncode == 0


@pytest.mark.parametrize("steps", [
    ["compat=0.10", "compat=1.1"],
    ["lazy_refcounts=on", "lazy_refcounts=off"],
    ["refcount_bits=64"], ["refcount_bits=1"], ["refcount_bits=8"],  # qemu-img is slow narrowing from 64 or 1
    ["size=8M", "size=2M"],
    ["compat=v2", "lazy_refcounts=on", "refcount_bits=8", "compat=v3,refcount_bits=8"],
])
def test_amend_sequences(pair: tuple[Path, Path], steps: list[str]) -> None:
    x, y = pair
    for opt in steps:
        amend_both(x, y, "-o", opt)


def test_refusals_with_snapshots(pair: tuple[Path, Path]) -> None:
    x, y = pair
    for p in (x, y):
        qemu_img("snapshot", "-c", "s", str(p))
    qemu_io(x, "write -P 3 0 64k")
    qemu_io(y, "write -P 3 0 64k")
    amend_both(x, y, "-o", "refcount_bits=1")  # a shared cluster needs 2
    amend_both(x, y, "-o", "size=8M")
    amend_both(x, y, "-o", "compat=0.10")  # the snapshot's disk size differs now


@pytest.mark.parametrize("opt", ["cluster_size=4k", "foo=1", "compat=0.9", "refcount_bits=3",
                                 "backing_file=nope", "data_file=x", "data_file_raw=on", "preallocation=full"])
def test_option_errors(pair: tuple[Path, Path], opt: str) -> None:
    x, y = pair
    amend_both(x, y, "-o", opt)


def test_help_lists_amendable_options() -> None:
    real = qemu_img("amend", "-f", "qcow2", "-o", "help")
    mine = bg("amend", "-f", "qcow2", "-o", "help")
    assert mine[0] == 0
    names = [line.split("=")[0].strip() for line in mine[1].splitlines()[1:]]
    assert set(names) <= {line.split("=")[0].strip() for line in real.stdout.splitlines()[1:]}
    assert {"compat", "lazy_refcounts", "refcount_bits", "size"} <= set(names)


def test_data_file_rename_and_raw_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # data file names are relative to the image, created from here
    infos = []
    for name in ("x", "y"):
        img = tmp_path / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={name}.raw,data_file_raw=on", str(img), "4M")
        shutil.copy(tmp_path / f"{name}.raw", tmp_path / f"{name}2.raw")
        run = qemu_img if name == "x" else None
        for opt in (f"data_file={name}2.raw", "data_file_raw=off"):
            if run is not None:
                qemu_img("amend", "-o", opt, str(img))
            else:
                assert bg("amend", "-o", opt, str(img)) == (0, "", "")
        infos.append([line.replace(f"{name}2", "N") for line in info(img)])
    assert infos[0] == infos[1]
    assert "    data file: N.raw" in infos[1]
    assert qemu_img("check", str(tmp_path / "y.qcow2"), check=False).returncode == 0
