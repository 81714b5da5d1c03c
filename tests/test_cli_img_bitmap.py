"""``blockgraph img bitmap`` against qemu-img 7.2's ``bitmap``: each command runs on one copy of the same images
with qemu-img and on another with blockgraph; stdout, stderr and exit status must match byte for byte (QEMU's
generated node names, ``#block`` and a random suffix, aside), and so must ``qemu-img info --output=json`` and the
dirty maps qemu-nbd serves (``nbdinfo --map=qemu:dirty-bitmap:NAME``) of the results; ``qemu-img check`` clean."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_img import Result, img

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                 reason="qemu-img/qemu-io/qemu-nbd (qemu-utils) or nbdinfo (libnbd-bin) missing")]
NODE = re.compile(r"#block\d+")
IMAGES = ("a.qcow2", "src.qcow2", "big.qcow2", "v2.qcow2", "r.raw", "o.qcow2")


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.qcow2 (4 MiB): b0 (64 KiB), b1 (4 KiB) dirtied by qemu-io, b2 disabled; src.qcow2 (4 MiB): s (16 KiB)
    dirtied elsewhere; big.qcow2 (8 MiB) with x; a qcow2 v2 image, a raw one, and o.qcow2 whose backing file is
    missing."""
    d = tmp_path_factory.mktemp("bitmap-base")
    for args in (["a.qcow2", "4M"], ["src.qcow2", "4M"], ["big.qcow2", "8M"], ["-o", "compat=0.10", "v2.qcow2", "1M"]):
        assert run("qemu-img", "create", "-q", "-f", "qcow2", *args, cwd=d).returncode == 0
    assert run("qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M", cwd=d).returncode == 0
    assert run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "o.qcow2", "4M",
               cwd=d).returncode == 0
    for args in (["a.qcow2", "b0"], ["-g", "4k", "a.qcow2", "b1"], ["--disable", "a.qcow2", "b2"],
                 ["-g", "16k", "src.qcow2", "s"], ["big.qcow2", "x"]):
        assert run("qemu-img", "bitmap", "--add", *args, cwd=d).returncode == 0
    writes = {"a.qcow2": ["write -P 1 0 1", "write -P 2 1M 100k", "write -z 3M 64k"],
              "src.qcow2": ["write -P 3 512k 8k", "write -P 4 2M 1M", "discard 3968k 16k"]}
    for name, cmds in writes.items():
        argv = ["qemu-io"]
        for c in cmds:
            argv += ["-c", c]
        assert run(*argv, name, cwd=d).returncode == 0
    return d


@pytest.fixture
def dirs(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Copies of the images for qemu-img (q/) and for blockgraph (b/, the working directory)."""
    q, b = tmp_path / "q", tmp_path / "b"
    for d in (q, b):
        d.mkdir()
        for name in IMAGES:
            shutil.copyfile(base / name, d / name)
    monkeypatch.chdir(b)
    return q, b


def qemu_img(q: Path, *args: str) -> Result:
    res = run("qemu-img", *args, cwd=q)
    return Result(res.returncode, res.stdout, res.stderr)


def both(q: Path, *args: str) -> Result:
    """``bitmap ARGS`` through qemu-img in q/ and blockgraph in b/; the results must be the same."""
    theirs = qemu_img(q, "bitmap", *args)
    ours = img("bitmap", *args)
    assert (ours.rc, ours.out, NODE.sub("#block", ours.err)) == \
        (theirs.rc, theirs.out, NODE.sub("#block", theirs.err)), args
    return ours


def info(d: Path, name: str) -> dict:
    res = run("qemu-img", "info", "--output=json", name, cwd=d)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    out.pop("actual-size")  # host allocation: the two writers may place clusters differently
    return out


def dirty_map(d: Path, name: str, bitmap: str) -> str:
    res = run("nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B",
              bitmap, name, "]", cwd=d)
    assert res.returncode == 0, res.stderr
    return res.stdout


def same_images(q: Path, b: Path, name: str = "a.qcow2", maps: tuple[str, ...] = ()) -> dict:
    """The two copies of ``name`` look the same to qemu-img info and qemu-nbd, and are clean."""
    if name == "o.qcow2":  # its backing file, needed by info and check, was missing for the bitmap commands
        for d in (q, b):
            if not (d / "missing.qcow2").exists():
                assert run("qemu-img", "create", "-q", "-f", "qcow2", "missing.qcow2", "4M", cwd=d).returncode == 0
    theirs = info(q, name)
    assert info(b, name) == theirs
    res = run("qemu-img", "check", name, cwd=b)
    assert res.returncode == 0 and "No errors were found on the image." in res.stdout, res.stdout + res.stderr
    for bitmap in maps:
        assert dirty_map(b, name, bitmap) == dirty_map(q, name, bitmap), bitmap
    return theirs


def bitmaps(meta: dict) -> list[dict]:
    return meta["format-specific"]["data"].get("bitmaps", [])


# ---------------------------------------------------------------- operations


@pytest.mark.parametrize("args", [
    ["--add", "a.qcow2", "n"],
    ["--add", "-g", "4k", "--disable", "a.qcow2", "n"],
    ["--add", "-g", "2G", "a.qcow2", "n"],
    ["--add", "-g", "512", "--granularity", "0", "a.qcow2", "n"],
    ["-g", "4294967808", "--add", "a.qcow2", "n"],  # passed on as a uint32_t: 512
    ["--add", "--remove", "--add", "a.qcow2", "n"],
    ["--remove", "a.qcow2", "b1"],
    ["--clear", "a.qcow2", "b0"],
    ["--disable", "a.qcow2", "b0"],
    ["--enable", "a.qcow2", "b2"],
    ["--merge", "b1", "a.qcow2", "b2"],
    ["--merge", "b0", "--merge", "b1", "--clear", "--merge", "b1", "a.qcow2", "b2"],
    ["--merge", "s", "-b", "src.qcow2", "a.qcow2", "b0"],
    ["--add", "--merge", "s", "--source-file", "src.qcow2", "--source-format", "qcow2", "a.qcow2", "n"],
    ["--image-opts", "--add", "driver=qcow2,file.filename=a.qcow2", "n"],
    ["--object", "secret,id=s0,data=x", "--add", "-f", "qcow2", "a.qcow2", "n"],
    ["--object", '{"qom-type": "secret", "id": "s0", "data": "x"}', "--object", "throttle-group,id=t", "--add",
     "a.qcow2", "n"],
])
def test_operations_as_qemu_img(dirs: tuple[Path, Path], args: list[str]) -> None:
    q, b = dirs
    assert both(q, *args) == Result(0, "", "")
    meta = same_images(q, b, maps=tuple(bm["name"] for bm in bitmaps(info(q, "a.qcow2"))))
    assert all("in-use" not in bm["flags"] for bm in bitmaps(meta))


@pytest.mark.parametrize("args", [
    ["--add", "o.qcow2", "n"],
    ["--add", "--image-opts", "driver=qcow2,file.filename=o.qcow2,backing=", "n"],
])
def test_backing_file_not_opened(dirs: tuple[Path, Path], args: list[str]) -> None:
    """The image is opened without its backing chain (which is missing here)."""
    q, b = dirs
    assert both(q, *args).rc == 0
    assert [bm["name"] for bm in bitmaps(same_images(q, b, "o.qcow2"))] == ["n"]


def test_added_bitmaps_listed_with_flags_and_granularity(dirs: tuple[Path, Path]) -> None:
    q, b = dirs
    both(q, "--add", "-g", "128k", "a.qcow2", "g")
    both(q, "--add", "--disable", "a.qcow2", "d")
    listed = bitmaps(same_images(q, b))
    assert {bm["name"]: (bm["flags"], bm["granularity"]) for bm in listed} == {
        "b0": (["auto"], 65536), "b1": (["auto"], 4096), "b2": ([], 65536), "g": (["auto"], 131072),
        "d": ([], 65536)}


def test_guest_writes_then_merge_clear_remove(dirs: tuple[Path, Path]) -> None:
    """Bitmaps dirtied by qemu-io, then changed by each tool step by step, dirty maps compared at each step."""
    q, b = dirs
    both(q, "--add", "--disable", "a.qcow2", "m")
    both(q, "--merge", "b0", "--merge", "b1", "a.qcow2", "m")
    m = dirty_map(b, "a.qcow2", "m")
    assert m.split("\n")[0].split() == ["0", "65536", "1", "dirty"]
    same_images(q, b, maps=("b0", "b1", "m"))
    for d in (q, b):  # further guest writes: recorded by the enabled bitmaps only
        assert run("qemu-io", "-c", "write -P 5 2M 4k", "a.qcow2", cwd=d).returncode == 0
    same_images(q, b, maps=("b0", "b1", "m"))
    both(q, "--enable", "--merge", "s", "-b", "src.qcow2", "a.qcow2", "m")
    same_images(q, b, maps=("m",))
    both(q, "--clear", "a.qcow2", "b0")
    assert "dirty" not in dirty_map(b, "a.qcow2", "b0")
    both(q, "--remove", "a.qcow2", "b1")
    assert [bm["name"] for bm in bitmaps(same_images(q, b, maps=("b0", "m")))] == ["b0", "b2", "m"]
    both(q, "--remove", "a.qcow2", "b0")
    both(q, "--remove", "a.qcow2", "b2")
    both(q, "--remove", "a.qcow2", "m")
    assert bitmaps(same_images(q, b)) == []


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("args", [
    [], ["a.qcow2", "n"], ["--add"], ["--add", "a.qcow2"], ["--add", "a.qcow2", "n", "extra"],
    ["-g", "64k", "--remove", "a.qcow2", "b0"], ["-b", "src.qcow2", "--add", "a.qcow2", "n"],
    ["-F", "qcow2", "--merge", "s", "a.qcow2", "b0"], ["-F", "qcow2", "--add", "a.qcow2", "n"],
    ["--add", "-g", "x", "a.qcow2", "n"], ["--add", "-g", "-1", "a.qcow2", "n"],
    ["--add", "-g", "256", "a.qcow2", "n"], ["--add", "-g", "3000", "a.qcow2", "n"],
    ["--add", "-g", "4G", "a.qcow2", "n"], ["--add", "-g", "1k", "--merge", "b0", "a.qcow2", "b0"],
    ["--add", "a.qcow2", "b0"], ["--add", "a.qcow2", ""], ["--add", "a.qcow2", "n" * 1024],
    ["--remove", "a.qcow2", "zz"], ["--clear", "a.qcow2", "zz"], ["--enable", "a.qcow2", "zz"],
    ["--disable", "a.qcow2", "zz"], ["--merge", "zz", "a.qcow2", "b0"], ["--merge", "b0", "a.qcow2", "zz"],
    ["--merge", "s", "a.qcow2", "b0"], ["--merge", "x", "-b", "big.qcow2", "a.qcow2", "b0"],
    ["--merge", "s", "-b", "src.qcow2", "-F", "raw", "a.qcow2", "b0"],
    ["--merge", "s", "-b", "nofile.qcow2", "a.qcow2", "b0"],
    ["--add", "--add", "a.qcow2", "n"], ["--remove", "--remove", "a.qcow2", "b0"],
    ["--add", "v2.qcow2", "n"], ["--add", "r.raw", "n"], ["--add", "-f", "raw", "a.qcow2", "n"],
    ["--add", "-f", "foo", "a.qcow2", "n"], ["--add", "nofile.qcow2", "n"],
    ["--add", "--image-opts", "a.qcow2", "n"], ["--add", "--image-opts", "-f", "qcow2", "driver=qcow2", "n"],
    ["--add", "--image-opts", "driver=qcow2,file.filename=a.qcow2,read-only=on", "n"],
    ["--add", "--image-opts", "driver=qcow2,node-name=top,file.filename=v2.qcow2", "n"],
    ["--add", "--image-opts", "driver=qcow2,file.filename=o.qcow2,backing=a.qcow2", "n"],
    ["--add", "--image-opts", "file.filename=o.qcow2,backing.driver=qcow2,backing.file.filename=a.qcow2", "n"],
    ["--add", "a.qcow2", "n", "--bogus"], ["--add", "a.qcow2", "n", "-b"], ["--merge"], ["-x", "--add", "a", "n"],
    ["--object", "foo,id=o", "--add", "a.qcow2", "n"], ["--object", "id=o", "--add", "a.qcow2", "n"],
    ["--object", "secret", "--add", "a.qcow2", "n"], ["--object", "secret,id=s", "--add", "a.qcow2", "n"],
    ["--object", "secret,id=s,data=x,bogus=1", "--add", "a.qcow2", "n"],
    ["--object", "secret,id=s,data=x", "--object", "secret,id=s,data=y", "--add", "a.qcow2", "n"],
    ["--add", "-g", "x", "--object", "foo", "a.qcow2", "n"], ["--object", "iothread,id=i", "--add", "a.qcow2", "n"],
    ["--object", "throttle-group,id=t", "--object", "secret,id=t,data=x", "--add", "a.qcow2", "n"],
])
def test_errors_as_qemu_img(dirs: tuple[Path, Path], args: list[str]) -> None:
    q, b = dirs
    assert both(q, *args).rc == 1
    for name in ("a.qcow2", "o.qcow2"):
        same_images(q, b, name)


def test_inconsistent_bitmap_refused_with_hint_then_removed(dirs: tuple[Path, Path]) -> None:
    """A bitmap left in_use (its writer was killed) can only be removed; the refusal carries QEMU's hint."""
    q, b = dirs
    for d in dirs:
        _set_in_use(d / "a.qcow2", "b1")
    for op in (["--clear"], ["--enable"], ["--disable"], ["--merge", "b0"], ["--add", "--disable"]):
        r = both(q, *op, "a.qcow2", "b1")
        assert r.rc == 1
    r = both(q, "--merge", "b1", "a.qcow2", "b0")
    assert r.err.splitlines()[-1] == "Try block-dirty-bitmap-remove to delete this bitmap from disk"
    both(q, "--merge", "b1", "-b", "a.qcow2", "src.qcow2", "s")
    assert both(q, "--remove", "a.qcow2", "b1").rc == 0
    theirs = info(q, "a.qcow2")
    assert info(b, "a.qcow2") == theirs and [bm["name"] for bm in bitmaps(theirs)] == ["b0", "b2"]
    assert dirty_map(b, "a.qcow2", "b0") == dirty_map(q, "a.qcow2", "b0")
    # Both free the removed bitmap's clusters (blockgraph only those nothing else references): no leak.
    for d in dirs:
        res = run("qemu-img", "check", "a.qcow2", cwd=d)
        assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr


def _set_in_use(path: Path, name: str) -> None:
    """Set the in_use flag of bitmap ``name`` in its directory entry (docs/interop/qcow2.txt)."""
    import struct

    with path.open("r+b") as f:
        head = f.read(4096)
        pos = struct.unpack(">I", head[100:104])[0]
        while True:
            kind, length = struct.unpack(">II", head[pos:pos + 8])
            assert kind, "no bitmaps extension"
            if kind == 0x23852875:
                nb, _, size, offset = struct.unpack(">IIQQ", head[pos + 8:pos + 32])
                break
            pos += 8 + (length + 7 & ~7)
        f.seek(offset)
        d = f.read(size)
        p = 0
        for _ in range(nb):
            flags, _, _, name_size, extra = struct.unpack(">IBBHI", d[p + 12:p + 24])
            if d[p + 24 + extra:p + 24 + extra + name_size] == name.encode():
                f.seek(offset + p + 12)
                f.write(struct.pack(">I", flags | 1))
                return
            p += 24 + extra + name_size + 7 & ~7
    raise AssertionError(f"no bitmap {name}")


def test_locked_image_refused_as_qemu_img(dirs: tuple[Path, Path]) -> None:
    """Another process writing the image (qemu-io): the target's write lock and the source's shared lock."""
    q, b = dirs
    holders = [subprocess.Popen(["qemu-io", "a.qcow2"], cwd=d, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for d in dirs]
    try:
        for h in holders:  # its prompt comes once the image is open (and locked)
            assert h.stdout.read(len("qemu-io> ")) == "qemu-io> ", h.stderr.read()
        r = both(q, "--add", "a.qcow2", "n")
        assert r.err == "qemu-img: Could not open 'a.qcow2': Failed to get \"write\" lock\n" \
                        "Is another process using the image [a.qcow2]?\n"
        assert "shared \"write\" lock" in both(q, "--merge", "b0", "-b", "a.qcow2", "src.qcow2", "s").err
    finally:
        for h in holders:
            h.communicate("quit\n", timeout=30)
    same_images(q, b)


def test_help_lists_bitmap() -> None:
    r = img("--help")
    assert r.rc == 0
    assert ("  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file "
            "[-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap") in r.lines
