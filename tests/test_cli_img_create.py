"""``blockgraph img create``: qemu-img's Formatting line, -o handling, errors and exit codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers_img import allocated, img

USAGE_TAIL = "Try 'qemu-img --help' for more information\n"


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_create_prints_formatting_line_and_makes_sparse_file() -> None:
    r = img("create", "-f", "raw", "x.img", "1G")
    assert (r.rc, r.out, r.err) == (0, "Formatting 'x.img', fmt=raw size=1073741824\n", "")
    assert os.path.getsize("x.img") == 1 << 30
    assert allocated(Path("x.img")) < 1 << 20


def test_default_format_is_raw_and_sizes_take_suffixes() -> None:
    assert img("create", "x.img", "1.5k").out == "Formatting 'x.img', fmt=raw size=1536\n"
    assert img("create", "x.img", "0x10").out == "Formatting 'x.img', fmt=raw size=16\n"
    assert img("create", "x.img", "0").out == "Formatting 'x.img', fmt=raw size=0\n"
    assert os.path.getsize("x.img") == 0


def test_preallocation_option_is_printed_and_applied() -> None:
    r = img("create", "-f", "raw", "-o", "preallocation=falloc", "x.img", "1M")
    assert r.out == "Formatting 'x.img', fmt=raw size=1048576 preallocation=falloc\n"
    assert allocated(Path("x.img")) >= 1 << 20
    r = img("create", "-f", "raw", "-o", "preallocation=full", "y.img", "64k")
    assert r.out == "Formatting 'y.img', fmt=raw size=65536 preallocation=full\n"
    assert Path("y.img").read_bytes() == bytes(65536)


def test_size_given_as_option() -> None:
    assert img("create", "-o", "size=2M", "x.img").out == "Formatting 'x.img', fmt=raw size=2097152\n"
    assert img("create", "-o", "size=3M,size=4M", "x.img").out == "Formatting 'x.img', fmt=raw size=4194304\n"


def test_quiet_prints_nothing() -> None:
    r = img("create", "-q", "x.img", "1M")
    assert (r.rc, r.out, r.err) == (0, "", "")
    assert os.path.getsize("x.img") == 1 << 20


def test_option_help_lists_create_options() -> None:
    r = img("create", "-f", "raw", "-o", "help", "x.img")
    assert r.rc == 0 and r.lines[0] == "Supported options:"
    assert any(line.startswith("  size=<size>            - ") for line in r.lines)
    assert any(line.startswith("  preallocation=<str>    - ") for line in r.lines)
    assert not Path("x.img").exists()
    r = img("create", "-o", "?")
    assert r.lines[0] == "Supported raw options:"
    assert r.lines[-2:] == ["The protocol level may support further options.",
                            "Specify the target filename to include those options."]
    assert img("create", "-o", "preallocation=full,help", "x.img").lines[0] == "Supported options:"


@pytest.mark.parametrize(("args", "err"), [
    (["x.img"], "qemu-img: x.img: Image creation needs a size parameter\n"),
    (["-o", "size=2M", "x.img", "3M"], "qemu-img: x.img: The image size must be specified only once\n"),
    (["-o", "foo=bar", "x.img", "1M"], "qemu-img: x.img: Invalid parameter 'foo'\n"),
    (["-f", "nosuch", "x.img", "1M"], "qemu-img: x.img: Unknown file format 'nosuch'\n"),
    (["-o", "size=foo", "x.img"], "qemu-img: x.img: Parameter 'size' expects a non-negative number below "
                                  "2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                                  "peta-\nand exabytes, respectively.\n"),
    (["x.img", "9E"], "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.\n"),
    (["x.img", "1KiB"], "qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                        "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"),
    (["-b", "base.img", "x.img", "1M"], "qemu-img: x.img: Backing file not supported for file format 'raw'\n"),
    (["-F", "raw", "x.img", "1M"], "qemu-img: x.img: Backing file format not supported for file format 'raw'\n"),
])
def test_errors_before_anything_is_created(args: list[str], err: str) -> None:
    r = img("create", *args)
    assert (r.rc, r.out, r.err) == (1, "", err)
    assert not Path("x.img").exists()


def test_bad_option_value_is_refused_after_the_formatting_line() -> None:
    r = img("create", "-o", "preallocation=bogus", "x.img", "1M")
    assert r.rc == 1
    assert r.out == "Formatting 'x.img', fmt=raw size=1048576 preallocation=bogus\n"
    assert r.err == "qemu-img: x.img: invalid parameter value: bogus\n"


def test_uncreatable_path_reports_the_os_error() -> None:
    r = img("create", "/nonexistent-dir/x.img", "1M")
    assert r.rc == 1
    assert r.out == "Formatting '/nonexistent-dir/x.img', fmt=raw size=1048576\n"
    assert r.err == ("qemu-img: /nonexistent-dir/x.img: Could not create '/nonexistent-dir/x.img': "
                     "No such file or directory\n")


@pytest.mark.parametrize(("args", "err"), [
    ([], "qemu-img: Expecting image file name\n" + USAGE_TAIL),
    (["x.img", "1M", "extra"], "qemu-img: Unexpected argument: extra\n" + USAGE_TAIL),
    (["-Z", "x.img"], "qemu-img: unrecognized option '-Z'\n" + USAGE_TAIL),
    (["-f"], "qemu-img: missing argument for option '-f'\n" + USAGE_TAIL),
    (["-o", ",x", "x.img"], "qemu-img: Invalid option list: ,x\n"),
])
def test_usage_errors(args: list[str], err: str) -> None:
    r = img("create", *args)
    assert (r.rc, r.err) == (1, err)


def test_protocol_as_format() -> None:
    r = img("create", "-f", "file", "x.img", "64k")
    assert (r.rc, r.out) == (0, "Formatting 'x.img', fmt=file size=65536\n")
    assert os.path.getsize("x.img") == 65536


def test_not_installed_format_names_its_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    # Load only file and raw, so qcow2 is missing whatever else this machine has installed.
    monkeypatch.setenv("BLOCKGRAPH_LOAD_PLUGINS", "blockgraph-file,blockgraph-raw")
    r = img("create", "-f", "qcow2", "x.img", "1M")
    assert r.rc == 1 and "blockgraph-qcow2" in r.err and r.err.startswith("qemu-img: x.img: ")


@pytest.mark.parametrize(("args", "err"), [
    (["-f", "vmdk", "-b", "src.raw", "-F", "vmdk", "new.vmdk"], "new.vmdk: invalid VMDK image descriptor"),
    (["-f", "vmdk", "-b", "src.raw", "-F", "qcow2", "sub/new.vmdk"], "sub/new.vmdk: Image is not in qcow2 format"),
    (["-f", "vmdk", "-b", "missing.raw", "-F", "raw", "sub/new.vmdk"],
     "sub/new.vmdk: Could not open 'sub/missing.raw': No such file or directory"),
])
def test_unusable_backing_file_as_qemu_img(args: list[str], err: str) -> None:
    """bdrv_img_create prints the open error itself, not qemu-img's "Could not open 'F': " around it."""
    os.mkdir("sub")
    for d in (".", "sub"):
        with open(f"{d}/src.raw", "wb") as f:
            f.truncate(1 << 20)
    r = img("create", *args)
    assert (r.rc, r.out, r.err) == (1, "", f"qemu-img: {err}\nCould not open backing image.\n")
    assert not os.path.exists(args[-1])
