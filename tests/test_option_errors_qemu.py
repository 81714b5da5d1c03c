"""Open-option mistakes print QEMU's texts: no node names (never generated ones), the option named as QEMU does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_img import img

QEMU_IMG = shutil.which("qemu-img")
pytestmark = pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img")

OPTS = [
    "bogus=1", "file.bogus=1", "l2-cache-size=abc", "l2-cache-size=99999999999999999999999",
    "lazy-refcounts=maybe", "cache-clean-interval=x", "cache.direct=perhaps", "node-name=top,bogus=1",
    "file.node-name=proto,file.bogus=1",
]


@pytest.fixture(autouse=True)
def _image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "o.qcow2", "1M"], check=True)


@pytest.mark.parametrize("extra", OPTS)
def test_image_opts_errors_as_qemu_img(extra: str) -> None:
    spec = f"driver=qcow2,file.filename=o.qcow2,{extra}"
    want = subprocess.run([QEMU_IMG, "info", "--image-opts", spec], capture_output=True, text=True, check=False)
    got = img("info", "--image-opts", spec)
    assert (got.rc, got.out, got.err) == (want.returncode, want.stdout, want.stderr)
    assert "#block" not in got.err


@pytest.mark.parametrize("opt", ["cluster_size=abc", "cluster_size=99999999999999999999999", "lazy_refcounts=maybe"])
def test_create_option_errors_as_qemu_img(opt: str) -> None:
    want = subprocess.run([QEMU_IMG, "create", "-f", "qcow2", "-o", opt, "x.qcow2", "1M"], capture_output=True,
                          text=True, check=False)
    got = img("create", "-f", "qcow2", "-o", opt, "x.qcow2", "1M")
    assert (got.rc, got.out, got.err) == (want.returncode, want.stdout, want.stderr)
