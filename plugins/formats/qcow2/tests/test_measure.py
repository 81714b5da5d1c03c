"""``blockgraph img measure -O qcow2`` equals ``qemu-img measure`` over a table of sizes, options and sources."""

from __future__ import annotations

import contextlib
import io
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


def same(*args: str) -> None:
    real = qemu_img("measure", *args, check=False)
    assert bg("measure", *args) == (real.returncode, real.stdout, real.stderr)


@pytest.mark.parametrize("size", ["0", "1", "1M", "10G", "1T", "64T"])
@pytest.mark.parametrize("opts", ["", "cluster_size=512", "cluster_size=4k", "cluster_size=2M", "refcount_bits=1",
                                  "refcount_bits=64", "extended_l2=on", "compat=0.10", "preallocation=full",
                                  "preallocation=metadata", "cluster_size=16k,extended_l2=on,refcount_bits=8"])
def test_sizes_and_options(size: str, opts: str) -> None:
    args = ["-O", "qcow2", "--size", size] + (["-o", opts] if opts else [])
    same(*args)


@pytest.mark.parametrize("args", [["-o", "cluster_size=3k"], ["-o", "compat=0.9"], ["-o", "refcount_bits=3"],
                                  ["-o", "compat=0.10,refcount_bits=8"], ["-o", "cluster_size=4k,extended_l2=on"],
                                  ["-o", "cluster_size=512", "--size", "1P"], ["--output=json"]])
def test_refusals_and_json(args: list[str]) -> None:
    same("-O", "qcow2", "--size", "1G", *args) if "--size" not in args else same("-O", "qcow2", *args)


def test_from_images(tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\x01" * 70000 + bytes(200000) + b"\x02" * 5000)
    q = tmp_path / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), "8M")
    qemu_io(q, "write -P 1 0 100k", "write -z 1M 1M", "write -P 2 5M 64k")
    for src in (["-f", "raw", str(raw)], [str(q)]):
        for opts in ([], ["-o", "cluster_size=4k"], ["-o", "compat=0.10"], ["-o", "backing_file=x"],
                     ["--output=json"]):
            same("-O", "qcow2", *opts, *src)
