"""The Python API (``blockgraph.open``, the synchronous facade) against dissect.hypervisor's pure-Python qcow2
reader, side by side in one process on the same fully allocated qcow2.

The image is qemu-img's conversion of a raw file of random data (every cluster allocated). Both readers are
first checked against the raw file (SHA-256 of a full sequential read, and of the random reads); then each
run times, alternating the two readers, a full sequential read in 1 MiB reads and ``--reads`` random 4 KiB
reads (4 KiB aligned, the same offsets for both). Both return ``bytes`` from ``read``; blockgraph's
``readinto`` (no copy into a new object) is shown as well. The image is read into the page cache first.

    pip install -e '.[bench]'   # dissect.hypervisor
    .venv/bin/python benchmarks/bench_qcow2_api.py [--size MiB] [--reads N] [--runs N]

Target (issue 3): with ``--size 1024``, blockgraph at least 2x dissect's rate for both patterns.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import machine, need, scratch_dir

MiB = 1 << 20


def build(size_mib: int) -> tuple[Path, Path]:
    """A raw file of random data and qemu-img's qcow2 of it (64 KiB clusters), reused when present."""
    d = scratch_dir()
    raw, qcow2 = d / f"api-{size_mib}m.raw", d / f"api-{size_mib}m.qcow2"
    if not (raw.exists() and raw.stat().st_size == size_mib * MiB):
        with open(raw, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MiB))
        qcow2.unlink(missing_ok=True)
    if not qcow2.exists():
        subprocess.run([need("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    return raw, qcow2


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


class Reader:
    """One open image: ``read(offset, length) -> bytes`` and ``readinto(offset, buf)``."""

    def __init__(self, name: str, read: Callable[[int, int], bytes],
                 readinto: Callable[[int, bytearray], Any] | None, close: Callable[[], None]) -> None:
        self.name, self.read, self.readinto, self.close = name, read, readinto, close


def open_blockgraph(path: Path) -> Reader:
    import blockgraph

    d = blockgraph.open(str(path), "qcow2", read_only=True)
    return Reader("blockgraph", d.read, d.readinto, d.close)


def open_dissect(path: Path) -> Reader:
    try:
        from dissect.hypervisor.disk.qcow2 import QCow2
    except ImportError:
        sys.exit("dissect.hypervisor is not installed: .venv/bin/pip install -e '.[bench]'")
    fh = open(path, "rb")  # closed by the Reader
    stream = QCow2(fh).open()

    def read(offset: int, length: int) -> bytes:
        stream.seek(offset)
        return stream.read(length)

    return Reader("dissect", read, None, fh.close)


def seq_digest(read: Callable[[int, int], bytes], size: int) -> str:
    h = hashlib.sha256()
    for off in range(0, size, MiB):
        h.update(read(off, MiB))
    return h.hexdigest()


def rnd_digest(read: Callable[[int, int], bytes], offsets: list[int]) -> str:
    h = hashlib.sha256()
    for off in offsets:
        h.update(read(off, 4096))
    return h.hexdigest()


def time_seq(r: Reader, size: int, into: bool) -> float:
    """MiB/s of one full sequential read in 1 MiB requests."""
    read, buf = r.read, bytearray(MiB)
    t = time.perf_counter()
    if into:
        readinto = r.readinto
        for off in range(0, size, MiB):
            readinto(off, buf)
    else:
        for off in range(0, size, MiB):
            read(off, MiB)
    return size / MiB / (time.perf_counter() - t)


def time_rnd(r: Reader, offsets: list[int], into: bool) -> float:
    """Reads per second of 4 KiB reads at ``offsets``."""
    read, buf = r.read, bytearray(4096)
    t = time.perf_counter()
    if into:
        readinto = r.readinto
        for off in offsets:
            readinto(off, buf)
    else:
        for off in offsets:
            read(off, 4096)
    return len(offsets) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image size in MiB (the issue's figure: 1024)")
    ap.add_argument("--reads", type=int, default=20000, help="random 4 KiB reads per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    size = args.size * MiB
    print(machine())
    raw, qcow2 = build(args.size)
    rng = random.Random(args.seed)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(args.reads)]
    print(f"image: {qcow2} ({args.size} MiB, fully allocated, 64 KiB clusters); {args.reads} random reads")

    readers = [open_blockgraph(qcow2), open_dissect(qcow2)]
    with open(raw, "rb") as f:
        def raw_read(off: int, n: int) -> bytes:
            return os.pread(f.fileno(), n, off)

        want = (seq_digest(raw_read, size), rnd_digest(raw_read, offsets))
    for r in readers:
        got = (seq_digest(r.read, size), rnd_digest(r.read, offsets))
        print(f"  {r.name:10s} sha256 sequential {got[0][:16]}…, random {got[1][:16]}… "
              f"{'= raw' if got == want else 'DIFFERS FROM THE RAW SOURCE'}")
        if got != want:
            sys.exit(1)
    for r in readers:
        r.close()

    warm(qcow2)
    res: dict[str, list[float]] = {k: [] for k in ("bg seq", "bg seq into", "di seq", "bg rnd", "bg rnd into",
                                                      "di rnd")}
    for _ in range(args.runs):
        # Fresh opens every run, so each starts with cold metadata caches; the order alternates.
        bg, di = open_blockgraph(qcow2), open_dissect(qcow2)
        res["di seq"].append(time_seq(di, size, False))
        res["bg seq"].append(time_seq(bg, size, False))
        res["bg seq into"].append(time_seq(bg, size, True))
        res["bg rnd"].append(time_rnd(bg, offsets, False))
        res["di rnd"].append(time_rnd(di, offsets, False))
        res["bg rnd into"].append(time_rnd(bg, offsets, True))
        bg.close()
        di.close()

    def line(label: str, key: str, unit: str) -> str:
        v = res[key]
        return f"  {label:34s} median {statistics.median(v):10,.0f} {unit} [min {min(v):,.0f}, max {max(v):,.0f}]"

    print(f"\nsequential 1 MiB reads ({args.runs} runs):")
    print(line("dissect.hypervisor QCow2 read()", "di seq", "MiB/s"))
    print(line("blockgraph.open read()", "bg seq", "MiB/s"))
    print(line("blockgraph.open readinto()", "bg seq into", "MiB/s"))
    print(f"random 4 KiB reads ({args.runs} runs of {args.reads}):")
    print(line("dissect.hypervisor QCow2 read()", "di rnd", "reads/s"))
    print(line("blockgraph.open read()", "bg rnd", "reads/s"))
    print(line("blockgraph.open readinto()", "bg rnd into", "reads/s"))
    seq = statistics.median(res["bg seq"]) / statistics.median(res["di seq"])
    rnd = statistics.median(res["bg rnd"]) / statistics.median(res["di rnd"])
    print(f"\nratio blockgraph/dissect (medians, read()): sequential {seq:.2f}x, random {rnd:.2f}x (target >= 2x)")
    # Paired per run (the two readers ran back to back), less exposed to a noisy machine's drifts.
    pseq = statistics.median(b / d for b, d in zip(res["bg seq"], res["di seq"], strict=True))
    prnd = statistics.median(b / d for b, d in zip(res["bg rnd"], res["di rnd"], strict=True))
    print(f"median of per-run ratios (read()):        sequential {pseq:.2f}x, random {prnd:.2f}x")


if __name__ == "__main__":
    main()
